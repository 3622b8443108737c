// CPU implementations of the bmkernels ops: each forwards to the build of its kernel for the
// instruction set chosen at run time (BMK_CPU_ISA, else the best this CPU supports).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/attention.h"
#include "cpu/batch_norm.h"
#include "cpu/conv.h"
#include "cpu/conv_engine.h"
#include "cpu/gru.h"
#include "cpu/isa.h"

namespace bmk::cpu {

namespace {
bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
}
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa active_isa() {
  // Read on every call (a getenv is far cheaper than any kernel) so tests can switch paths.
  const char* forced = std::getenv("BMK_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) {
      if (std::strcmp(forced, isa_name(isa)) == 0) {
        TORCH_CHECK(cpu_supports(isa), "BMK_CPU_ISA=", forced, " but this CPU does not support ", forced);
        return isa;
      }
    }
    TORCH_CHECK(false, "BMK_CPU_ISA must be one of scalar, avx2, avx512; got '", forced, "'");
  }
  if (cpu_supports(Isa::avx512)) return Isa::avx512;
  if (cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

namespace {

AttentionFwdResult attention_fwd(const AttentionFwdArgs& args) { return BMK_ISA_CALL(attention_fwd, args); }

AttentionBwdResult attention_bwd(const AttentionBwdArgs& args) { return BMK_ISA_CALL(attention_bwd, args); }

AttentionFwdResult attention_kvcache_fwd(const AttentionKvcacheFwdArgs& args) {
  return BMK_ISA_CALL(attention_kvcache_fwd, args);
}

at::Tensor attention_dropout_mask(const AttentionDropoutMaskArgs& args) {
  return BMK_ISA_CALL(attention_dropout_mask, args);
}

GruCellFwdResult gru_cell_fwd(const GruCellFwdArgs& args) { return BMK_ISA_CALL(gru_cell_fwd, args); }

GruLayerFwdResult gru_layer_fwd(const GruLayerFwdArgs& args) { return BMK_ISA_CALL(gru_layer_fwd, args); }

GruLayerBwdResult gru_layer_bwd(const GruLayerBwdArgs& args) { return BMK_ISA_CALL(gru_layer_bwd, args); }

ConvFwdResult own_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                             bool save_preact) {
  return BMK_ISA_CALL(conv2d_fwd, x, weight, bias, residual, stride, padding, dilation, groups, activation, slope,
                      save_preact);
}

ConvBwdResult own_conv2d_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                             bool saved_is_output, std::array<bool, 4> output_mask) {
  return BMK_ISA_CALL(conv2d_bwd, grad_out, x, weight, act_saved, stride, padding, dilation, groups, activation, slope,
                      saved_is_output, output_mask);
}

// The operators: the faster of bmkernels' kernels and ATen's convolution per shape (csrc/cpu/conv_engine.h).
ConvFwdResult conv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope, bool save_preact) {
  return conv2d_fwd_engine(x, weight, bias, residual, stride, padding, dilation, groups, activation, slope, save_preact,
                           &own_conv2d_fwd);
}

ConvBwdResult conv2d_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                         bool saved_is_output, std::array<bool, 4> output_mask) {
  return conv2d_bwd_engine(grad_out, x, weight, act_saved, stride, padding, dilation, groups, activation, slope,
                           saved_is_output, output_mask, &own_conv2d_bwd);
}

BatchNormActFwdResult batch_norm_act_fwd(const BatchNormActFwdArgs& args) {
  return BMK_ISA_CALL(batch_norm_act_fwd, args);
}

BatchNormActBwdResult batch_norm_act_bwd(const BatchNormActBwdArgs& args) {
  return BMK_ISA_CALL(batch_norm_act_bwd, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
  // entry<fn>: the schema's arguments gathered into the op's argument struct (csrc/common/op_params.h)
  m.impl("attention_fwd", &AttentionFwdArgs::entry<&attention_fwd>);
  m.impl("attention_bwd", &AttentionBwdArgs::entry<&attention_bwd>);
  m.impl("attention_dropout_mask", &AttentionDropoutMaskArgs::entry<&attention_dropout_mask>);
  m.impl("attention_kvcache_fwd", &AttentionKvcacheFwdArgs::entry<&attention_kvcache_fwd>);
  m.impl("gru_cell_fwd", &GruCellFwdArgs::entry<&gru_cell_fwd>);
  m.impl("gru_layer_fwd", &GruLayerFwdArgs::entry<&gru_layer_fwd>);
  m.impl("gru_layer_bwd", &GruLayerBwdArgs::entry<&gru_layer_bwd>);
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
  m.impl("batch_norm_act_fwd", &BatchNormActFwdArgs::entry<&batch_norm_act_fwd>);
  m.impl("batch_norm_act_bwd", &BatchNormActBwdArgs::entry<&batch_norm_act_bwd>);
}

}  // namespace bmk::cpu
