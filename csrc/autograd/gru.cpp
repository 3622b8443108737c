// Autograd of bmkernels::gru_cell_fwd and bmkernels::gru_layer_fwd, in C++ (torch::autograd::Function
// registered for the Autograd key): a GRUCell stepped from Python pays no Python on its way through
// autograd, with or without grad. Both backwards run bmkernels::gru_layer_bwd (a cell step is a
// one-step, one-direction layer). Fake kernels for torch.compile: bmkernels/ops/gru.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "autograd/saved_args.h"
#include "common/gru_params.h"

namespace {

using bmk::GruCellFwdArgs;
using bmk::GruCellFwdResult;
using bmk::GruLayerBwdArgs;
using bmk::GruLayerBwdResult;
using bmk::GruLayerFwdArgs;
using bmk::GruLayerFwdResult;
using bmk::autograd::apply_args;
using bmk::autograd::load_args;
using bmk::autograd::save_args;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The operators of one GRU implementation (the kernels, or the emulated CUDA ones).
struct KernelOps {
  static constexpr const char* cell_fwd = "bmkernels::gru_cell_fwd";
  static constexpr const char* layer_fwd = "bmkernels::gru_layer_fwd";
  static constexpr const char* layer_bwd = "bmkernels::gru_layer_bwd";
};
struct EmulatedOps {
  static constexpr const char* cell_fwd = "bmkernels::gru_cell_emulated_fwd";
  static constexpr const char* layer_fwd = "bmkernels::gru_layer_emulated_fwd";
  static constexpr const char* layer_bwd = "bmkernels::gru_layer_emulated_bwd";
};

template <typename Ops>
GruCellFwdResult cell_fwd_op(const GruCellFwdArgs& args) {
  static const auto op = bmk::typed_op<GruCellFwdArgs>(Ops::cell_fwd);
  return bmk::call_op(op, args);
}

template <typename Ops>
GruLayerFwdResult layer_fwd_op(const GruLayerFwdArgs& args) {
  static const auto op = bmk::typed_op<GruLayerFwdArgs>(Ops::layer_fwd);
  return bmk::call_op(op, args);
}

template <typename Ops>
GruLayerBwdResult layer_bwd_op(const GruLayerBwdArgs& args) {
  static const auto op = bmk::typed_op<GruLayerBwdArgs>(Ops::layer_bwd);
  return bmk::call_op(op, args);
}

// state: the saved h / h0; an empty batch has an empty workspace even when it was saved.
void check_workspace(const at::Tensor& workspace, const at::Tensor& state) {
  TORCH_CHECK(workspace.sym_numel() != 0 || state.sym_numel() == 0,
              "bmkernels gru: backward needs the forward's workspace, which was not saved (the forward ran with "
              "save_workspace=False)");
}

at::Tensor grad_or_zeros(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// The forward's arguments are those of the op's schema (autograd sees each tensor as an input).
template <typename Ops>
class GruCellFunction : public torch::autograd::Function<GruCellFunction<Ops>> {
 public:
  template <typename... A>
  static variable_list forward(AutogradContext* ctx, const A&... a) {
    const GruCellFwdArgs args{a...};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h_next, workspace] = cell_fwd_op<Ops>(args);
    save_args(ctx, args, {workspace});
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the workspace output
    return {h_next, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [args, outputs] = load_args<GruCellFwdArgs>(ctx);
    const at::Tensor &h = args.h, &workspace = outputs[0];
    check_workspace(workspace, h);
    const bool has_bias = args.b_ih.has_value();
    auto [dx, dh, dw_ih, dw_hh, db_ih, db_hh] =
        layer_bwd_op<Ops>({grad_or_zeros(grads[0], h).unsqueeze(0), at::zeros_like(h).unsqueeze(0), args.x.unsqueeze(0),
                           h.unsqueeze(0), args.w_ih.unsqueeze(0), args.w_hh.unsqueeze(0), std::nullopt,
                           workspace.view_symint({1, 1, h.sym_size(0), workspace.sym_size(1)}), has_bias});
    variable_list result(GruCellFwdArgs::kArity);
    result[0] = dx[0];
    result[1] = dh[0];
    result[2] = dw_ih[0];
    result[3] = dw_hh[0];
    if (has_bias) {
      result[4] = db_ih[0];
      result[5] = db_hh[0];
    }
    return result;
  }
};

template <typename Ops>
class GruLayerFunction : public torch::autograd::Function<GruLayerFunction<Ops>> {
 public:
  template <typename... A>
  static variable_list forward(AutogradContext* ctx, const A&... a) {
    const GruLayerFwdArgs args{a...};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, h_n, workspace] = layer_fwd_op<Ops>(args);
    save_args(ctx, args, {workspace});
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the workspace (42 MB at T=B=64, H=512)
    return {out, h_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [args, outputs] = load_args<GruLayerFwdArgs>(ctx);
    const at::Tensor &x = args.x, &h0 = args.h0, &workspace = outputs[0];
    check_workspace(workspace, h0);
    const bool has_bias = args.b_ih.has_value();
    const at::Tensor grad_out =
        grads[0].defined()
            ? grads[0]
            : at::zeros_symint({x.sym_size(0), x.sym_size(1), h0.sym_size(0) * h0.sym_size(2)}, h0.options());
    auto [dx, dh0, dw_ih, dw_hh, db_ih, db_hh] = layer_bwd_op<Ops>(
        {grad_out, grad_or_zeros(grads[1], h0), x, h0, args.w_ih, args.w_hh, args.lengths, workspace, has_bias});
    variable_list result(GruLayerFwdArgs::kArity);
    result[0] = dx;
    result[1] = dh0;
    result[2] = dw_ih;
    result[3] = dw_hh;
    if (has_bias) {
      result[4] = db_ih;
      result[5] = db_hh;
    }
    return result;
  }
};

// Whether autograd has anything to record: grad mode on and some input requiring grad.
template <typename Args>
bool records_grad(const Args& args) {
  if (!at::GradMode::is_enabled()) return false;
  bool any = false;
  auto check = [&](const auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, at::Tensor>) any = any || a.requires_grad();
    if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) any = any || (a.has_value() && a->requires_grad());
  };
  std::apply([&](const auto&... a) { (check(a), ...); }, args.fields());
  return any;
}

template <typename Ops>
GruCellFwdResult gru_cell_fwd_autograd(const GruCellFwdArgs& args) {
  if (!records_grad(args)) {
    // nothing to record (inference, a decoder step under no_grad): skip building an autograd node
    at::AutoDispatchBelowADInplaceOrView guard;
    return cell_fwd_op<Ops>(args);
  }
  auto result = apply_args<GruCellFunction<Ops>>(args);
  return {result[0], result[1]};
}

template <typename Ops>
GruLayerFwdResult gru_layer_fwd_autograd(const GruLayerFwdArgs& args) {
  if (!records_grad(args)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_fwd_op<Ops>(args);
  }
  auto result = apply_args<GruLayerFunction<Ops>>(args);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("gru_cell_fwd", &GruCellFwdArgs::entry<&gru_cell_fwd_autograd<KernelOps>>);
  m.impl("gru_layer_fwd", &GruLayerFwdArgs::entry<&gru_layer_fwd_autograd<KernelOps>>);
  m.impl("gru_cell_emulated_fwd", &GruCellFwdArgs::entry<&gru_cell_fwd_autograd<EmulatedOps>>);
  m.impl("gru_layer_emulated_fwd", &GruLayerFwdArgs::entry<&gru_layer_fwd_autograd<EmulatedOps>>);
}
