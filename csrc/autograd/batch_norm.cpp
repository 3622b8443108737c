// Autograd for bmkernels::batch_norm_act_fwd, registered for the Autograd dispatch key (every device),
// in C++ for the reason given in csrc/autograd/attention.cpp. The backward is the registered op
// bmkernels::batch_norm_act_bwd, so torch.compile traces both. Saved: x, weight, the batch mean and
// invstd, and relu's output or the other activations' pre-activation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd/saved_args.h"
#include "common/activations.h"
#include "common/batch_norm_params.h"

namespace bmk::autograd {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The forward's arguments are those of the op's schema (autograd sees each tensor as an input).
class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  template <typename... A>
  static variable_list forward(AutogradContext* ctx, const A&... a) {
    static const auto op = typed_op<BatchNormActFwdArgs>("bmkernels::batch_norm_act_fwd");
    const BatchNormActFwdArgs args{a...};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd, var, preact] = call_op(op, args);
    // the output only for relu (as torch's relu saves its own), nothing for none: a caller may then
    // modify the output in place, as it may torch's BatchNorm or leaky_relu output
    const auto act = static_cast<bmk::Activation>(args.activation);
    const bool from_output = act == bmk::Activation::relu || act == bmk::Activation::none;
    const at::Tensor act_saved =
        act == bmk::Activation::relu ? out : (act == bmk::Activation::none ? at::Tensor() : preact);
    ctx->save_for_backward({args.x, args.weight.value_or(at::Tensor()), mean, invstd, act_saved});
    ctx->saved_data["activation"] = args.activation;
    ctx->saved_data["slope"] = args.slope;
    ctx->saved_data["from_output"] = from_output;
    ctx->saved_data["has_weight"] = args.weight.has_value();
    ctx->saved_data["has_bias"] = args.bias.has_value();
    ctx->saved_data["has_residual"] = args.residual.has_value();
    ctx->mark_non_differentiable({mean, invstd, var, preact});
    ctx->set_materialize_grads(false);
    return {out, mean, invstd, var, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<BatchNormActBwdArgs>("bmkernels::batch_norm_act_bwd");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grads[0];
    const at::Tensor none;
    if (!grad_out.defined()) return variable_list(BatchNormActFwdArgs::kArity, none);
    const bool identity = ctx->saved_data["activation"].toInt() == static_cast<int64_t>(bmk::Activation::none);
    // no activation: act' = 1 reads nothing, any tensor of x's shape stands in
    const at::Tensor &x = saved[0], &mean = saved[2], &invstd = saved[3], &act_saved = identity ? grad_out : saved[4];
    const bool from_output = ctx->saved_data["from_output"].toBool();
    TORCH_CHECK(from_output || act_saved.sizes() == grad_out.sizes(),
                "batch_norm_act: backward needs the pre-activation, which the forward did not save (it ran without "
                "any input requiring grad)");
    // needs_input_grad counts the tensors given only: each absent optional shifts the later indices down
    const bool has_weight = ctx->saved_data["has_weight"].toBool(), has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const int64_t bias_index = has_weight ? 2 : 1, residual_index = bias_index + (has_bias ? 1 : 0);
    const bmk::BatchNormActGradMask mask{ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
                                         has_bias && ctx->needs_input_grad(bias_index),
                                         has_residual && ctx->needs_input_grad(residual_index)};
    const std::optional<at::Tensor> weight = has_weight ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [dx, dw, db, dres] = call_op(
        op, BatchNormActBwdArgs{grad_out, x, weight, mean, invstd, act_saved, ctx->saved_data["activation"].toInt(),
                                ctx->saved_data["slope"].toDouble(), from_output, mask});
    variable_list result(BatchNormActFwdArgs::kArity, none);
    result[0] = mask[0] ? dx : none;
    result[1] = mask[1] ? dw : none;
    result[2] = mask[2] ? db : none;
    result[3] = mask[3] ? dres : none;
    return result;
  }
};

BatchNormActFwdResult batch_norm_act_fwd_autograd(const BatchNormActFwdArgs& args) {
  auto r = apply_args<BatchNormActFunction>(args);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("batch_norm_act_fwd", &BatchNormActFwdArgs::entry<&batch_norm_act_fwd_autograd>);
}

}  // namespace bmk::autograd
