// Autograd for bmkernels::attention_fwd, registered for the Autograd dispatch key (every device).
// Written in C++ rather than with Python's torch.library.register_autograd because the Python
// path costs more per call than the whole kernel at small shapes.
// The backward is the registered op bmkernels::attention_bwd, so torch.compile traces both.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bmk::autograd {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AttentionFwdResult = std::tuple<at::Tensor, at::Tensor>;

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The forward and backward operators of one attention implementation (the kernels, or the emulated CUDA ones).
struct KernelOps {
  static constexpr const char* fwd = "bmkernels::attention_fwd";
  static constexpr const char* bwd = "bmkernels::attention_bwd";
};
struct EmulatedOps {
  static constexpr const char* fwd = "bmkernels::attention_emulated_fwd";
  static constexpr const char* bwd = "bmkernels::attention_emulated_bwd";
};

template <typename Ops>
class AttentionFunction : public torch::autograd::Function<AttentionFunction<Ops>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& rng_seed,
                               double scale, double softcap, int64_t window_left, int64_t window_right,
                               int64_t diag_offset, double dropout_p, const std::optional<at::Tensor>& key_range,
                               const std::optional<at::Tensor>& segments) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(Ops::fwd, "")
                         .template typed<AttentionFwdResult(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, double, double, int64_t, int64_t, int64_t, double,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(q, k, v, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left, window_right,
                              diag_offset, dropout_p, key_range, segments);
    // Absent optionals are saved as undefined tensors.
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(bias), or_undefined(mask), or_undefined(alibi_slopes),
                            or_undefined(rng_seed), or_undefined(key_range), or_undefined(segments)});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["diag_offset"] = diag_offset;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->set_materialize_grads(false);  // an unused lse gets no zero-filled gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(Ops::bwd, "")
            .template typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                double, double, int64_t, int64_t, int64_t, double, bool, const std::optional<at::Tensor>&,
                const std::optional<at::Tensor>&)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &bias = saved[5], &mask = saved[6], &alibi = saved[7], &rng_seed = saved[8];
    const at::Tensor &key_range = saved[9], &segments = saved[10];
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const bool bias_grad = bias.defined() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dbias] =
        op.call(grad_out, q, k, v, out, lse, or_none(grads[1]), or_none(bias), or_none(mask), or_none(alibi),
                or_none(rng_seed), ctx->saved_data["scale"].toDouble(), ctx->saved_data["softcap"].toDouble(),
                ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                ctx->saved_data["diag_offset"].toInt(), ctx->saved_data["dropout_p"].toDouble(), bias_grad,
                or_none(key_range), or_none(segments));
    // The kernel's dbias is (B, Hq, Lq, Lk) in the accumulation dtype; the bias may broadcast.
    at::Tensor grad_bias = bias_grad ? dbias.sum_to_size(bias.sizes()).to(bias.scalar_type()) : at::Tensor();
    return {dq,           dk,           dv,           grad_bias,    at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <typename Ops>
AttentionFwdResult attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                          const std::optional<at::Tensor>& alibi_slopes,
                                          const std::optional<at::Tensor>& rng_seed, double scale, double softcap,
                                          int64_t window_left, int64_t window_right, int64_t diag_offset,
                                          double dropout_p, const std::optional<at::Tensor>& key_range,
                                          const std::optional<at::Tensor>& segments) {
  auto result = AttentionFunction<Ops>::apply(q, k, v, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left,
                                              window_right, diag_offset, dropout_p, key_range, segments);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bmkernels, Autograd, m) {
  m.impl("attention_fwd", &attention_fwd_autograd<KernelOps>);
  m.impl("attention_emulated_fwd", &attention_fwd_autograd<EmulatedOps>);
}

}  // namespace bmk::autograd
