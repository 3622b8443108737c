// Autograd of bmkernels::gru_cell_fwd and bmkernels::gru_layer_fwd, in C++ (torch::autograd::Function
// registered for the Autograd key): a GRUCell stepped from Python pays no Python on its way through
// autograd, with or without grad. Both backwards run bmkernels::gru_layer_bwd (a cell step is a
// one-step, one-direction layer). Fake kernels for torch.compile: bmkernels/ops/gru.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

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
std::tuple<at::Tensor, at::Tensor> cell_fwd_op(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                               bool save) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(Ops::cell_fwd, "")
                             .template typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, bool)>();
  return op.call(x, h, w_ih, w_hh, b_ih, b_hh, save);
}

template <typename Ops>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_fwd_op(const at::Tensor& x, const at::Tensor& h0,
                                                            const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                            const OptTensor& b_ih, const OptTensor& b_hh,
                                                            const OptTensor& lengths, bool save) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(Ops::layer_fwd, "")
                             .template typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, bool)>();
  return op.call(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
}

using LayerGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Ops>
LayerGrads layer_bwd_op(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& x,
                        const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& lengths,
                        const at::Tensor& workspace, bool has_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(Ops::layer_bwd, "")
                             .template typed<LayerGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, const at::Tensor&, bool)>();
  return op.call(grad_out, grad_h_n, x, h0, w_ih, w_hh, lengths, workspace, has_bias);
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

template <typename Ops>
class GruCellFunction : public torch::autograd::Function<GruCellFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool save) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h_next, workspace] = cell_fwd_op<Ops>(x, h, w_ih, w_hh, b_ih, b_hh, save);
    ctx->save_for_backward({x, h, w_ih, w_hh, workspace});
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the workspace output
    return {h_next, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h = saved[1], &w_ih = saved[2], &w_hh = saved[3], &workspace = saved[4];
    check_workspace(workspace, h);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [dx, dh, dw_ih, dw_hh, db_ih, db_hh] =
        layer_bwd_op<Ops>(grad_or_zeros(grads[0], h).unsqueeze(0), at::zeros_like(h).unsqueeze(0), x.unsqueeze(0),
                          h.unsqueeze(0), w_ih.unsqueeze(0), w_hh.unsqueeze(0), std::nullopt,
                          workspace.view_symint({1, 1, h.sym_size(0), workspace.sym_size(1)}), has_bias);
    return {
        dx[0],       dh[0], dw_ih[0], dw_hh[0], has_bias ? db_ih[0] : at::Tensor(), has_bias ? db_hh[0] : at::Tensor(),
        at::Tensor()};
  }
};

template <typename Ops>
class GruLayerFunction : public torch::autograd::Function<GruLayerFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& lengths, bool save) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, h_n, workspace] = layer_fwd_op<Ops>(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
    ctx->save_for_backward({x, h0, w_ih, w_hh, workspace});
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->saved_data["lengths"] = lengths.has_value() ? c10::IValue(*lengths) : c10::IValue();
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for the workspace (42 MB at T=B=64, H=512)
    return {out, h_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &h0 = saved[1], &w_ih = saved[2], &w_hh = saved[3], &workspace = saved[4];
    check_workspace(workspace, h0);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const c10::IValue& lengths_value = ctx->saved_data["lengths"];
    const OptTensor lengths = lengths_value.isTensor() ? OptTensor(lengths_value.toTensor()) : std::nullopt;
    const at::Tensor grad_out =
        grads[0].defined()
            ? grads[0]
            : at::zeros_symint({x.sym_size(0), x.sym_size(1), h0.sym_size(0) * h0.sym_size(2)}, h0.options());
    auto [dx, dh0, dw_ih, dw_hh, db_ih, db_hh] =
        layer_bwd_op<Ops>(grad_out, grad_or_zeros(grads[1], h0), x, h0, w_ih, w_hh, lengths, workspace, has_bias);
    return {dx,           dh0,         dw_ih, dw_hh, has_bias ? db_ih : at::Tensor(), has_bias ? db_hh : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// Whether autograd has anything to record: grad mode on and some input requiring grad.
bool records_grad(std::initializer_list<const at::Tensor*> tensors, std::initializer_list<const OptTensor*> optional) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->requires_grad()) return true;
  for (const OptTensor* t : optional)
    if (t->has_value() && (*t)->requires_grad()) return true;
  return false;
}

template <typename Ops>
std::tuple<at::Tensor, at::Tensor> gru_cell_fwd_autograd(const at::Tensor& x, const at::Tensor& h,
                                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                         const OptTensor& b_ih, const OptTensor& b_hh, bool save) {
  if (!records_grad({&x, &h, &w_ih, &w_hh}, {&b_ih, &b_hh})) {
    // nothing to record (inference, a decoder step under no_grad): skip building an autograd node
    at::AutoDispatchBelowADInplaceOrView guard;
    return cell_fwd_op<Ops>(x, h, w_ih, w_hh, b_ih, b_hh, save);
  }
  auto result = GruCellFunction<Ops>::apply(x, h, w_ih, w_hh, b_ih, b_hh, save);
  return {result[0], result[1]};
}

template <typename Ops>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd_autograd(const at::Tensor& x, const at::Tensor& h0,
                                                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                                      const OptTensor& b_ih, const OptTensor& b_hh,
                                                                      const OptTensor& lengths, bool save) {
  if (!records_grad({&x, &h0, &w_ih, &w_hh}, {&b_ih, &b_hh})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_fwd_op<Ops>(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
  }
  auto result = GruLayerFunction<Ops>::apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("gru_cell_fwd", &gru_cell_fwd_autograd<KernelOps>);
  m.impl("gru_layer_fwd", &gru_layer_fwd_autograd<KernelOps>);
  m.impl("gru_cell_emulated_fwd", &gru_cell_fwd_autograd<EmulatedOps>);
  m.impl("gru_layer_emulated_fwd", &gru_layer_fwd_autograd<EmulatedOps>);
}
