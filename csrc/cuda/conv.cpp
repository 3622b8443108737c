// Torch glue of the CUDA conv2d kernels (v1): the convolution itself through ATen (at::convolution /
// at::convolution_backward: cuDNN on the GPU, on torch's current stream with its TF32, benchmark and
// determinism flags; ATen's CPU convolution under the emulator), our fused kernels for the rest
// (csrc/cuda/conv_kernels.cu). Compiled twice, as csrc/cuda/attention.cpp: for CUDA tensors
// (TORCH_LIBRARY_IMPL(bmkernels, CUDA): conv2d_fwd / conv2d_bwd) and, with BMK_CUDA_EMULATOR, for CPU
// tensors as conv2d_emulated_fwd / conv2d_emulated_bwd (backend "cuda_emulated").
#include "cuda/conv.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/activations.h"
#include "cuda/torch_launch.h"

namespace bmk::BMK_CUDA_NS {
namespace {

#if defined(BMK_CUDA_EMULATOR)
constexpr const char* kWhat = "bmkernels conv2d (CUDA kernel, emulated)";
#else
constexpr const char* kWhat = "bmkernels conv2d (CUDA kernel)";
#endif

CudaDtype dtype_code(at::ScalarType t) { return BMK_CUDA_NS::dtype_code(t, kWhat, "x"); }

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(on_device(t) && t.device() == x.device(), kWhat, ": ", name, " must be on x's device ", x.device(),
              "; got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kWhat, ": ", name, " must have x's dtype ", x.scalar_type(), "; got ",
              t.scalar_type());
}

// The convolution as ATen runs it: padding (top, bottom, left, right) split into the symmetric part ATen
// takes and an explicit zero pad of x for the rest (padding="same" with an even kernel).
struct Geometry {
  std::vector<int64_t> pad;        // symmetric (h, w)
  std::array<int64_t, 4> extra{};  // (left, right, top, bottom) pad of x, at::constant_pad_nd's order
  bool padded() const { return extra[0] || extra[1] || extra[2] || extra[3]; }
  at::Tensor input(const at::Tensor& x) const {
    return padded() ? at::constant_pad_nd(x, extra).contiguous(format_of(x)) : x;
  }
};

Geometry check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(on_device(x), kWhat, ": x must be a ", kDeviceName, " tensor; got ", x.device());
  check_tensor("weight", weight, x);
  dtype_code(x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, kWhat, ": x (N, C, H, W) and weight (C_out, C_in / groups, kH, kW) ",
              "must be 4-D; got x ", x.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2, kWhat,
              ": stride and dilation need 2 values, padding 4 (top, bottom, left, right)");
  TORCH_CHECK(
      groups > 0 && x.size(1) % groups == 0 && weight.size(0) % groups == 0 && weight.size(1) * groups == x.size(1),
      kWhat, ": channels do not match groups ", groups, ": x ", x.sizes(), ", weight ", weight.sizes());
  for (int d = 0; d < 2; ++d) {
    const int64_t size = x.size(2 + d) + padding[2 * d] + padding[2 * d + 1] - dilation[d] * (weight.size(2 + d) - 1);
    TORCH_CHECK(stride[d] >= 1 && dilation[d] >= 1 && padding[2 * d] >= 0 && padding[2 * d + 1] >= 0 && size >= 1,
                kWhat, ": output size must be positive; got x ", x.sizes(), ", weight ", weight.sizes());
  }
  Geometry g;
  g.pad = {std::min(padding[0], padding[1]), std::min(padding[2], padding[3])};
  g.extra = {padding[2] - g.pad[1], padding[3] - g.pad[1], padding[0] - g.pad[0], padding[1] - g.pad[0]};
  return g;
}

// The `inner` of conv.h's [outer, C, inner] view of a dense 4-D tensor in format fmt.
int64_t channels_inner(const at::Tensor& t, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast ? 1 : t.size(2) * t.size(3);
}

// BMK_CUDA_CONV_ENGINE, read per call (cheap) so that it can be switched at run time: "aten" (default, v1) or
// "igemm" (v2 where plan_conv_igemm takes the problem, v1 elsewhere). No GPU measurement chooses v2 yet.
bool igemm_engine() {
  const char* env = std::getenv("BMK_CUDA_CONV_ENGINE");
  const std::string name = env && *env ? env : "aten";
  TORCH_CHECK(name == "aten" || name == "igemm", kWhat, ": BMK_CUDA_CONV_ENGINE must be aten or igemm; got '", name,
              "'");
  return name == "igemm";
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// v2 (csrc/cuda/conv_igemm.cu) on NHWC copies of x and weight; the outputs in x's memory format.
std::tuple<at::Tensor, at::Tensor> conv2d_igemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_f,
                                                const at::Tensor& residual, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                at::IntArrayRef out_size, int64_t activation, double slope,
                                                bool save_preact, const ConvIgemmPlan& plan, const at::Tensor& xc,
                                                const at::Tensor& wc) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty(out_size, x.options().memory_format(cl));
  at::Tensor preact = save_preact ? at::empty_like(out) : at::empty({0}, x.options());
  const at::Tensor res = residual.defined() ? residual.contiguous(cl) : residual;
  ConvIgemmParams p{};
  p.x = xc.const_data_ptr(), p.weight = wc.const_data_ptr();
  p.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  p.residual = res.defined() ? res.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr(), p.preact = save_preact ? preact.mutable_data_ptr() : nullptr;
  p.batch = x.size(0), p.in_h = x.size(2), p.in_w = x.size(3), p.channels = x.size(1);
  p.out_h = out_size[2], p.out_w = out_size[3], p.out_channels = out_size[1];
  p.kernel_h = static_cast<int>(weight.size(2)), p.kernel_w = static_cast<int>(weight.size(3));
  p.stride_h = static_cast<int>(stride[0]), p.stride_w = static_cast<int>(stride[1]);
  p.pad_top = static_cast<int>(padding[0]), p.pad_left = static_cast<int>(padding[2]);
  p.dilation_h = static_cast<int>(dilation[0]), p.dilation_w = static_cast<int>(dilation[1]);
  p.activation = static_cast<int>(activation), p.slope = static_cast<float>(slope);
  p.dtype = dtype_code(x.scalar_type());
  run_launch(kWhat, [&](Stream s) { return launch_conv_igemm(p, plan, s); });
  const at::MemoryFormat fmt = format_of(x);
  return {out.contiguous(fmt), save_preact ? preact.contiguous(fmt) : preact};
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              int64_t activation, double slope, bool save_preact) {
  const Geometry g = check_conv(x, weight, stride, padding, dilation, groups);
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const int64_t C = weight.size(0);
  std::vector<int64_t> out_size = {x.size(0), C, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t span = x.size(2 + d) + padding[2 * d] + padding[2 * d + 1] - dilation[d] * (weight.size(2 + d) - 1);
    out_size[2 + d] = (span - 1) / stride[d] + 1;
  }
  if (bias) {
    check_tensor("bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, kWhat, ": bias must be (C_out,) = (", C, ",); got ",
                bias->sizes());
  }
  if (residual) {
    check_tensor("residual", *residual, x);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_size), kWhat, ": residual must have the output's shape ",
                out_size, "; got ", residual->sizes());
  }
  const at::Tensor bias_f = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (igemm_engine()) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor xc = x.contiguous(cl), wc = weight.contiguous(cl);
    std::string why;
    const ConvIgemmPlan plan =
        plan_conv_igemm(dtype_code(x.scalar_type()), x.size(0), x.size(1), C, weight.size(2), weight.size(3),
                        out_size[2], out_size[3], groups, aligned16(xc) && aligned16(wc), why);
    if (why.empty()) {
      return conv2d_igemm(x, weight, bias_f, residual ? *residual : at::Tensor(), stride, padding, dilation, out_size,
                          activation, slope, save_preact, plan, xc, wc);
    }
  }
  const at::MemoryFormat fmt = format_of(x);
  at::Tensor z =
      at::convolution(g.input(x), weight, std::nullopt, stride, g.pad, dilation, false, {0, 0}, groups).contiguous(fmt);
  const at::Tensor res = residual ? residual->contiguous(fmt) : at::Tensor();
  at::Tensor preact = save_preact ? at::empty_like(z) : at::empty({0}, x.options());
  const Activation act = static_cast<Activation>(activation);
  if (!bias && !residual && act == Activation::none) {
    if (save_preact) preact.copy_(z);
    return {z, preact};
  }
  ConvEpilogueParams p{};
  p.z = z.const_data_ptr(), p.out = z.mutable_data_ptr();  // in place: z is ours
  p.bias = bias ? bias_f.const_data_ptr<float>() : nullptr;
  p.residual = residual ? res.const_data_ptr() : nullptr;
  p.preact = save_preact ? preact.mutable_data_ptr() : nullptr;
  p.numel = z.numel(), p.channels = C, p.inner = channels_inner(z, fmt);
  p.activation = static_cast<int>(activation), p.slope = static_cast<float>(slope);
  p.dtype = dtype_code(x.scalar_type());
  const ConvEpiloguePlan plan = plan_conv_epilogue(p.numel);
  run_launch(kWhat, [&](Stream s) { return launch_conv_epilogue(p, plan, s); });
  return {z, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act_saved,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
    double slope, bool saved_is_output, std::array<bool, 4> output_mask) {
  const Geometry g = check_conv(x, weight, stride, padding, dilation, groups);
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  check_tensor("grad_out", grad_out, x);
  const auto [need_dx, need_dw, need_db, need_dres] = output_mask;
  const at::MemoryFormat fmt = format_of(x);
  const Activation act = static_cast<Activation>(activation);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0), kWhat,
              ": grad_out must be (N, C_out, H_out, W_out); got ", grad_out.sizes());
  const at::Tensor grad = grad_out.contiguous(fmt);
  const int64_t C = grad.size(1);
  at::Tensor saved;
  if (act != Activation::none) {
    check_tensor("act_saved", act_saved, x);
    TORCH_CHECK(act_saved.sizes() == grad.sizes(), kWhat, ": act_saved must have grad_out's shape ", grad.sizes(),
                "; got ", act_saved.sizes());
    saved = act_saved.contiguous(fmt);
  }
  const auto none = [&] { return at::empty({0}, x.options()); };
  const bool need_dz = need_dx || need_dw || need_dres;
  // dz: grad itself without an activation, else the grad pass writes it
  at::Tensor dz = act == Activation::none ? grad : (need_dz ? at::empty_like(grad) : at::Tensor());
  at::Tensor db = need_db ? at::empty({C}, x.options().dtype(at::kFloat)) : none();
  if ((act != Activation::none && need_dz) || need_db) {
    const int64_t inner = channels_inner(grad, fmt), pixels = C ? grad.numel() / C : 0;
    std::string error;
    const ConvGradPlan plan = plan_conv_grad(C, inner, pixels, error);
    TORCH_CHECK(error.empty(), kWhat, ": ", error);
    at::Tensor partial = at::empty({static_cast<int64_t>(need_db ? plan.partial_floats : 0)}, db.options());
    ConvGradParams p{};
    p.grad = grad.const_data_ptr();
    p.saved = saved.defined() ? saved.const_data_ptr() : nullptr;
    p.dz = act != Activation::none && need_dz ? dz.mutable_data_ptr() : nullptr;
    p.partial = need_db ? partial.mutable_data_ptr<float>() : nullptr;
    p.dbias = need_db ? db.mutable_data_ptr<float>() : nullptr;
    p.channels = C, p.inner = inner, p.pixels = pixels;
    p.activation = static_cast<int>(activation), p.slope = static_cast<float>(slope);
    p.saved_is_output = saved_is_output, p.dtype = dtype_code(x.scalar_type());
    if (need_db && plan.empty()) db.zero_();  // no pixels: nothing flows back
    run_launch(kWhat, [&](Stream s) { return launch_conv_grad(p, plan, s); });
  }
  at::Tensor dx = none(), dw = none();
  if (need_dx || need_dw) {
    const at::Tensor xin = g.input(x);
    auto [gx, gw, gb] = at::convolution_backward(dz, xin, weight, std::nullopt, stride, g.pad, dilation, false, {0, 0},
                                                 groups, {need_dx, need_dw, false});
    if (need_dx) {
      dx = g.padded() ? gx.narrow(2, g.extra[2], x.size(2)).narrow(3, g.extra[0], x.size(3)) : gx;
      dx = dx.contiguous(fmt);
    }
    if (need_dw) dw = gw.contiguous(fmt);  // as the CPU op and the fake kernel: in x's memory format
  }
  // dres is dz; a copy where dz is the incoming gradient itself (an operator's output must not alias its input)
  at::Tensor dres = need_dres ? (dz.is_same(grad_out) ? dz.clone() : dz) : none();
  if (need_db) db = db.to(weight.scalar_type());
  return {dx, dw, db, dres};
}

}  // namespace

#if defined(BMK_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
  m.impl("conv2d_emulated_fwd", &conv2d_fwd);
  m.impl("conv2d_emulated_bwd", &conv2d_bwd);
}
#else
TORCH_LIBRARY_IMPL(bmkernels, CUDA, m) {
  m.impl("conv2d_fwd", &conv2d_fwd);
  m.impl("conv2d_bwd", &conv2d_bwd);
}
#endif

}  // namespace bmk::BMK_CUDA_NS
