// Autograd for bmkernels::attention_fwd, registered for the Autograd dispatch key (every device).
// Written in C++ rather than with Python's torch.library.register_autograd because the Python
// path costs more per call than the whole kernel at small shapes.
// The backward is the registered op bmkernels::attention_bwd, so torch.compile traces both.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "autograd/saved_args.h"
#include "common/attention_params.h"

namespace bmk::autograd {

namespace {

using bmk::autograd::needs_grad;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The forward and backward operators of one attention implementation (the kernels, or the emulated CUDA ones).
struct KernelOps {
  static constexpr const char* fwd = "bmkernels::attention_fwd";
  static constexpr const char* bwd = "bmkernels::attention_bwd";
};
struct EmulatedOps {
  static constexpr const char* fwd = "bmkernels::attention_emulated_fwd";
  static constexpr const char* bwd = "bmkernels::attention_emulated_bwd";
};

// The forward's arguments are those of the op's schema (autograd sees each tensor as an input).
template <typename Ops>
class AttentionFunction : public torch::autograd::Function<AttentionFunction<Ops>> {
 public:
  template <typename... A>
  static variable_list forward(AutogradContext* ctx, const A&... a) {
    static const auto op = typed_op<AttentionFwdArgs>(Ops::fwd);
    const AttentionFwdArgs args{a...};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_op(op, args);
    save_args(ctx, args, {out, lse});
    ctx->set_materialize_grads(false);  // an unused lse gets no zero-filled gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<AttentionBwdArgs>(Ops::bwd);
    const auto [f, outputs] = load_args<AttentionFwdArgs>(ctx);
    const at::Tensor &out = outputs[0], &lse = outputs[1];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const std::optional<at::Tensor> grad_lse = grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    const bool bias_grad = needs_grad(ctx, f, &AttentionFwdArgs::bias);
    auto [dq, dk, dv, dbias] =
        call_op(op, AttentionBwdArgs{grad_out,      f.q,         f.k,       f.v,           out,
                                     lse,           grad_lse,    f.bias,    f.mask,        f.alibi_slopes,
                                     f.rng_seed,    f.scale,     f.softcap, f.window_left, f.window_right,
                                     f.diag_offset, f.dropout_p, bias_grad, f.key_range,   f.segments});
    variable_list result(AttentionFwdArgs::kArity);
    result[0] = dq;
    result[1] = dk;
    result[2] = dv;
    // The kernel's dbias is (B, Hq, Lq, Lk) in the accumulation dtype; the bias may broadcast.
    if (bias_grad) result[3] = dbias.sum_to_size(f.bias->sizes()).to(f.bias->scalar_type());
    if (needs_grad(ctx, f, &AttentionFwdArgs::sinks)) {
      // a sink takes no value: d sink_h = -sum over (b, i) of P(sink) (rowsum(dO * O) - grad_lse)
      const auto acc = lse.scalar_type();
      at::Tensor delta = grad_out.to(acc).mul(out.to(acc)).sum(-1);
      if (grad_lse) delta = delta.sub(grad_lse->to(acc));
      const at::Tensor p_sink = f.sinks->to(acc).view({1, -1, 1}).sub(lse).exp();
      result[15] = p_sink.mul(delta).sum(at::IntArrayRef{0, 2}).neg().to(f.sinks->scalar_type());
    }
    return result;
  }
};

template <typename Ops>
AttentionFwdResult attention_fwd_autograd(const AttentionFwdArgs& args) {
  auto result = apply_args<AttentionFunction<Ops>>(args);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("attention_fwd", &AttentionFwdArgs::entry<&attention_fwd_autograd<KernelOps>>);
  m.impl("attention_emulated_fwd", &AttentionFwdArgs::entry<&attention_fwd_autograd<EmulatedOps>>);
}

}  // namespace bmk::autograd
