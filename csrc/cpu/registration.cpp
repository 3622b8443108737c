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

AttentionFwdResult attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& alibi_slopes,
                                 const std::optional<at::Tensor>& rng_seed, double scale, double softcap,
                                 int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
                                 const std::optional<at::Tensor>& key_range,
                                 const std::optional<at::Tensor>& segments) {
  return BMK_ISA_CALL(attention_fwd, q, k, v, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left,
                      window_right, diag_offset, dropout_p, key_range, segments);
}

AttentionBwdResult attention_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                                 const std::optional<at::Tensor>& rng_seed, double scale, double softcap,
                                 int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
                                 bool bias_grad, const std::optional<at::Tensor>& key_range,
                                 const std::optional<at::Tensor>& segments) {
  return BMK_ISA_CALL(attention_bwd, grad_out, q, k, v, out, lse, grad_lse, bias, mask, alibi_slopes, rng_seed, scale,
                      softcap, window_left, window_right, diag_offset, dropout_p, bias_grad, key_range, segments);
}

AttentionFwdResult attention_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                         const std::optional<at::Tensor>& cache_batch_idx,
                                         const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                         int64_t window_left, int64_t window_right) {
  return BMK_ISA_CALL(attention_kvcache_fwd, q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx,
                      alibi_slopes, scale, softcap, window_left, window_right);
}

at::Tensor attention_dropout_mask(const at::Tensor& rng_seed, int64_t batch, int64_t heads, int64_t q_len,
                                  int64_t k_len, double dropout_p) {
  return BMK_ISA_CALL(attention_dropout_mask, rng_seed, batch, heads, q_len, k_len, dropout_p);
}

GruCellFwdResult gru_cell_fwd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                              bool save_workspace) {
  return BMK_ISA_CALL(gru_cell_fwd, x, h, w_ih, w_hh, b_ih, b_hh, save_workspace);
}

GruLayerFwdResult gru_layer_fwd(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths,
                                bool save_workspace) {
  return BMK_ISA_CALL(gru_layer_fwd, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save_workspace);
}

GruLayerBwdResult gru_layer_bwd(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& x,
                                const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& lengths, const at::Tensor& workspace, bool has_bias) {
  return BMK_ISA_CALL(gru_layer_bwd, grad_out, grad_h_n, x, h0, w_ih, w_hh, lengths, workspace, has_bias);
}

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

BatchNormActFwdResult batch_norm_act_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& residual, double eps, int64_t activation,
                                         double slope, bool save_preact) {
  return BMK_ISA_CALL(batch_norm_act_fwd, x, weight, bias, residual, eps, activation, slope, save_preact);
}

BatchNormActBwdResult batch_norm_act_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                         const at::Tensor& invstd, const at::Tensor& act_saved, int64_t activation,
                                         double slope, bool saved_is_output, std::array<bool, 4> output_mask) {
  return BMK_ISA_CALL(batch_norm_act_bwd, grad_out, x, weight, mean, invstd, act_saved, activation, slope,
                      saved_is_output, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_dropout_mask", &attention_dropout_mask);
  m.impl("attention_kvcache_fwd", &attention_kvcache_fwd);
  m.impl("gru_cell_fwd", &gru_cell_fwd);
  m.impl("gru_layer_fwd", &gru_layer_fwd);
  m.impl("gru_layer_bwd", &gru_layer_bwd);
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
  m.impl("batch_norm_act_fwd", &batch_norm_act_fwd);
  m.impl("batch_norm_act_bwd", &batch_norm_act_bwd);
}

}  // namespace bmk::cpu
