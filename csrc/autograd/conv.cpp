// Autograd for bmkernels::conv2d_fwd, registered for the Autograd dispatch key (every device), in C++
// for the reason given in csrc/autograd/attention.cpp (Python's register_autograd costs more per call
// than a small kernel). The backward is the registered op bmkernels::conv2d_bwd, so torch.compile traces both.
// Saved: x, weight and the activation's output (when act' is readable from it) or its pre-activation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/activations.h"

namespace bmk::autograd {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The forward and backward operators of one conv2d implementation (the kernels, or the emulated CUDA ones).
struct KernelOps {
  static constexpr const char* fwd = "bmkernels::conv2d_fwd";
  static constexpr const char* bwd = "bmkernels::conv2d_bwd";
};
struct EmulatedOps {
  static constexpr const char* fwd = "bmkernels::conv2d_emulated_fwd";
  static constexpr const char* bwd = "bmkernels::conv2d_emulated_bwd";
};

// The forward operator below the Autograd key.
template <typename Ops>
const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Ops::fwd, "")
          .template typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                             const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                                                             c10::IntArrayRef, int64_t, int64_t, double, bool)>();
  return op;
}

template <typename Ops>
class Conv2dFunction : public torch::autograd::Function<Conv2dFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& residual, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, int64_t activation,
                               double slope, bool save_preact) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, preact] = forward_op<Ops>().call(x, weight, bias, residual, stride, padding, dilation, groups,
                                                activation, slope, save_preact);
    const bool from_output = bmk::derivative_from_output(static_cast<bmk::Activation>(activation), slope);
    ctx->save_for_backward({x, weight, from_output ? out : preact});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["from_output"] = from_output;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->mark_non_differentiable({preact});
    // no zero-filled gradient for an unused output (the pre-activation is one, as large as the output)
    ctx->set_materialize_grads(false);
    return {out, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(Ops::bwd, "")
            .template typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                c10::IntArrayRef, c10::IntArrayRef, int64_t, int64_t, double, bool, std::array<bool, 4>)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &act_saved = saved[2];
    const at::Tensor& grad_out = grads[0];
    const at::Tensor none;
    if (!grad_out.defined()) return variable_list(11, none);  // the output was not used: no gradient flows
    const bool from_output = ctx->saved_data["from_output"].toBool();
    // an empty batch's saved pre-activation is empty too
    TORCH_CHECK(from_output || act_saved.sizes() == grad_out.sizes(),
                "conv2d: backward needs the pre-activation, which the forward did not save (it ran without any "
                "input requiring grad)");
    // needs_input_grad counts tensor inputs only: an absent bias shifts the residual's index down.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2),
                                   ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(has_bias ? 3 : 2)};
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    auto [dx, dw, db, dres] =
        op.call(grad_out, x, weight, act_saved, stride, padding, dilation, ctx->saved_data["groups"].toInt(),
                ctx->saved_data["activation"].toInt(), ctx->saved_data["slope"].toDouble(), from_output, mask);
    return {mask[0] ? dx : none,
            mask[1] ? dw : none,
            mask[2] ? db : none,
            mask[3] ? dres : none,
            none,
            none,
            none,
            none,
            none,
            none,
            none};
  }
};

template <typename Ops>
std::tuple<at::Tensor, at::Tensor> conv2d_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                       const OptTensor& bias, const OptTensor& residual,
                                                       c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                       c10::IntArrayRef dilation, int64_t groups, int64_t activation,
                                                       double slope, bool save_preact) {
  const auto wants_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(wants_grad(x) || wants_grad(weight) || (bias && wants_grad(*bias)) || (residual && wants_grad(*residual)))) {
    // no graph node (eval, no_grad): its context, saved tensors and bookkeeping cost microseconds per call
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op<Ops>().call(x, weight, bias, residual, stride, padding, dilation, groups, activation, slope,
                                  save_preact);
  }
  auto result = Conv2dFunction<Ops>::apply(x, weight, bias, residual, stride, padding, dilation, groups, activation,
                                           slope, save_preact);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("conv2d_fwd", &conv2d_fwd_autograd<KernelOps>);
  m.impl("conv2d_emulated_fwd", &conv2d_fwd_autograd<EmulatedOps>);
}

}  // namespace bmk::autograd
