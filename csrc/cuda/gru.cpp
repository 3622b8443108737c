// Torch glue of the CUDA GRU kernels: the GEMMs through ATen (cuBLAS on the GPU, on torch's current stream;
// ATen's CPU GEMMs under the emulator), our fused gate kernel per step (csrc/cuda/gru_kernels.cu). Forward:
// one GEMM for the input projections of every step and direction, then per step one batched GEMM of both
// directions' hidden projections and one gate kernel. Backward: per step (reverse order) the gate kernel and
// one batched GEMM for dL/dh, then the weight GEMMs once over all steps. Arguments and results as the CPU
// op's (csrc/cpu/gru.cpp). Compiled twice, as csrc/cuda/attention.cpp: for CUDA tensors (gru_cell_fwd,
// gru_layer_fwd, gru_layer_bwd) and, with BMK_CUDA_EMULATOR, for CPU tensors (gru_*_emulated_*).
#include "cuda/gru.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "common/gru_params.h"
#include "cuda/torch_launch.h"

namespace bmk::BMK_CUDA_NS {
namespace {

#if defined(BMK_CUDA_EMULATOR)
constexpr const char* kWhat = "bmkernels gru (CUDA kernel, emulated)";
#else
constexpr const char* kWhat = "bmkernels gru (CUDA kernel)";
#endif

using OptTensor = std::optional<at::Tensor>;

CudaDtype dtype_code(at::ScalarType t) { return BMK_CUDA_NS::dtype_code(t, kWhat, "x"); }

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(on_device(t) && t.device() == x.device(), kWhat, ": ", name, " must be on x's device ", x.device(),
              "; got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kWhat, ": ", name, " must have x's dtype ", x.scalar_type(), "; got ",
              t.scalar_type());
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, kWhat, ": ", name, " must have shape ", shape, "; got ", t.sizes());
}

// The layer's arguments (x (T, B, I), h0 (D, B, H), w_ih (D, 3H, I), w_hh (D, 3H, H), biases (D, 3H), lengths
// (B,) int64) checked; lengths on x's device. The kernels only compare steps with lengths, so any value is safe
// (bmkernels.gru checks their range): no host sync here.
OptTensor check_layer(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& lengths) {
  TORCH_CHECK(on_device(x), kWhat, ": x must be a ", kDeviceName, " tensor; got ", x.device());
  dtype_code(x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 3 && w_ih.dim() == 3 && w_hh.dim() == 3, kWhat,
              ": expected x (T, B, I), h0 (D, B, H), w_ih (D, 3H, I), w_hh (D, 3H, H); got ", x.sizes(), ", ",
              h0.sizes(), ", ", w_ih.sizes(), ", ", w_hh.sizes());
  const int64_t D = w_ih.size(0), H = w_hh.size(2);
  TORCH_CHECK((D == 1 || D == 2) && H >= 1 && x.size(0) >= 1, kWhat,
              ": 1 or 2 directions, hidden size and sequence length >= 1; got w_hh ", w_hh.sizes(), ", x ", x.sizes());
  for (const auto& [name, t] : {std::pair{"h0", &h0}, std::pair{"w_ih", &w_ih}, std::pair{"w_hh", &w_hh}})
    check_tensor(name, *t, x);
  check_shape("w_ih", w_ih, {D, 3 * H, x.size(2)});
  check_shape("w_hh", w_hh, {D, 3 * H, H});
  check_shape("h0", h0, {D, x.size(1), H});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), kWhat, ": pass both b_ih and b_hh or neither");
  for (const auto& [name, bias] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
    if (!bias->has_value()) continue;
    check_tensor(name, **bias, x);
    check_shape(name, **bias, {D, 3 * H});
  }
  if (!lengths) return std::nullopt;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == x.size(1), kWhat,
              ": lengths must be int64 (B,) = (", x.size(1), ",); got ", lengths->scalar_type(), " ", lengths->sizes());
  return lengths->to(x.device()).contiguous();
}

// [b_ir + b_hr, b_iz + b_hz, b_in, b_hn] in float32, (D, 4H): b_hn stays apart, inside the reset product.
at::Tensor gate_bias(const at::Tensor& b_ih, const at::Tensor& b_hh, int64_t H) {
  const at::Tensor bi = b_ih.to(at::kFloat), bh = b_hh.to(at::kFloat);
  return at::cat({bi.narrow(1, 0, 2 * H) + bh.narrow(1, 0, 2 * H), bi.narrow(1, 2 * H, H), bh.narrow(1, 2 * H, H)}, 1)
      .contiguous();
}

GruGatesPlan gates_plan(int64_t D, int64_t B, int64_t H) {
  std::string error;
  const GruGatesPlan plan = plan_gru_gates(D, B, H, error);
  TORCH_CHECK(error.empty(), kWhat, ": ", error);
  return plan;
}

// Runs the forward steps: gi (T B, D 3H) the input projections, h0 (D, B, H). Returns out, h_n, workspace.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_steps(const at::Tensor& gi, const at::Tensor& h0,
                                                             const at::Tensor& w_hh, const OptTensor& bias,
                                                             const OptTensor& lengths, int64_t T, bool save) {
  const int64_t D = h0.size(0), B = h0.size(1), H = h0.size(2);
  const auto opts = gi.options();
  const bool low = gi.scalar_type() != at::kFloat;
  at::Tensor out = at::empty({T, B, D * H}, opts);
  at::Tensor state = at::empty({2, D, B, H}, opts.dtype(at::kFloat));
  state[0].copy_(h0);
  at::Tensor h_lp = low ? h0.clone(at::MemoryFormat::Contiguous) : at::Tensor();  // the GEMM operand, x's dtype
  at::Tensor gh = at::empty({D, B, 3 * H}, opts);
  at::Tensor ws = save ? at::empty({D, T, B, kGruWorkspaceGates * H}, opts.dtype(at::kFloat))
                       : at::empty({0}, opts.dtype(at::kFloat));
  const at::Tensor w_hh_t = w_hh.transpose(1, 2);
  const GruGatesPlan plan = gates_plan(D, B, H);
  GruFwdStepParams p{};
  p.gi = gi.const_data_ptr(), p.gh = gh.const_data_ptr(), p.out = out.mutable_data_ptr();
  p.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  p.ws = save ? ws.mutable_data_ptr<float>() : nullptr;
  p.lengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  p.h_next_lp = low ? h_lp.mutable_data_ptr() : nullptr;
  p.steps = T, p.batch = B, p.hidden = H, p.directions = D, p.dtype = dtype_code(gi.scalar_type());
  for (int64_t s = 0; s < T; ++s) {
    const at::Tensor cur = state[s & 1], next = state[(s + 1) & 1];
    at::bmm_out(gh, low ? h_lp : cur, w_hh_t);  // both directions' hidden projections, one batched GEMM
    p.step = s, p.h = cur.const_data_ptr<float>(), p.h_next = next.mutable_data_ptr<float>();
    run_launch(kWhat, [&](Stream st) { return launch_gru_fwd_step(p, plan, st); });
  }
  return {out, state[T & 1].to(h0.scalar_type()), ws};
}

// BMK_CUDA_GRU_ENGINE, read per call so that it can be switched at run time: "steps" (default: per step a batched
// GEMM and the gate kernel) or "persistent" (one cooperative launch where plan_gru_persistent fits the layer, the
// steps elsewhere). No GPU measurement chooses the persistent kernel yet.
bool persistent_engine() {
  const char* env = std::getenv("BMK_CUDA_GRU_ENGINE");
  const std::string name = env && *env ? env : "steps";
  TORCH_CHECK(name == "steps" || name == "persistent", kWhat,
              ": BMK_CUDA_GRU_ENGINE must be steps or persistent; got '", name, "'");
  return name == "persistent";
}

// The persistent plan on this device (the emulator: 4 "SMs", so that small layers still split into several CTAs).
GruPersistentPlan persistent_plan(const at::Tensor& x, int64_t D, int64_t B, int64_t H, std::string& why) {
#if defined(BMK_CUDA_EMULATOR)
  const int64_t sms = 4;
  const size_t shared_limit = 227 * 1024;
#else
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = prop->multiProcessorCount;
  const size_t shared_limit = prop->sharedMemPerBlockOptin;
#endif
  return plan_gru_persistent(D, B, H, x.element_size(), sms, shared_limit, why);
}

// forward_steps' results from one persistent launch: gi the input projections (T B, D 3H).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_persistent(const at::Tensor& gi, const at::Tensor& h0,
                                                                  const at::Tensor& w_hh, const OptTensor& bias,
                                                                  const OptTensor& lengths, int64_t T, bool save,
                                                                  const GruPersistentPlan& plan) {
  const int64_t D = h0.size(0), B = h0.size(1), H = h0.size(2);
  const auto opts = gi.options();
  at::Tensor out = at::empty({T, B, D * H}, opts);
  at::Tensor state = at::empty({2, D, B, H}, opts.dtype(at::kFloat));
  state[0].copy_(h0);
  at::Tensor ws = save ? at::empty({D, T, B, kGruWorkspaceGates * H}, opts.dtype(at::kFloat))
                       : at::empty({0}, opts.dtype(at::kFloat));
  const at::Tensor w = w_hh.contiguous();
  GruPersistentParams p{};
  p.step.gi = gi.const_data_ptr(), p.step.out = out.mutable_data_ptr();
  p.step.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  p.step.ws = save ? ws.mutable_data_ptr<float>() : nullptr;
  p.step.lengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  p.step.steps = T, p.step.batch = B, p.step.hidden = H, p.step.directions = D;
  p.step.dtype = dtype_code(gi.scalar_type());
  p.w_hh = w.const_data_ptr(), p.state = state.mutable_data_ptr<float>();
  p.slices = plan.slices, p.units = plan.units, p.weight_bytes = plan.weight_bytes;
  run_launch(kWhat, [&](Stream st) { return launch_gru_persistent(p, plan, st); });
  return {out, state[T & 1].to(h0.scalar_type()), ws};
}

GruLayerFwdResult gru_layer_fwd(const GruLayerFwdArgs& args) {
  const auto& [x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save_workspace] = args;
  const OptTensor len = check_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), D = w_ih.size(0), H = w_hh.size(2);
  // the input projections of every step and direction: one GEMM, (T B, D 3H)
  const at::Tensor gi = at::mm(x.reshape({T * B, I}), w_ih.reshape({D * 3 * H, I}).t());
  const OptTensor bias = b_ih ? OptTensor(gate_bias(*b_ih, *b_hh, H)) : std::nullopt;
  if (B > 0 && persistent_engine()) {
    std::string why;
    const GruPersistentPlan plan = persistent_plan(x, D, B, H, why);
    if (why.empty()) return forward_persistent(gi, h0, w_hh, bias, len, T, save_workspace, plan);
  }
  return forward_steps(gi, h0, w_hh, bias, len, T, save_workspace);
}

GruCellFwdResult gru_cell_fwd(const GruCellFwdArgs& args) {
  const auto& [x, h, w_ih, w_hh, b_ih, b_hh, save_workspace] = args;
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2, kWhat,
              ": expected x (B, I), h (B, H), w_ih (3H, I), w_hh (3H, H); got ", x.sizes(), ", ", h.sizes(), ", ",
              w_ih.sizes(), ", ", w_hh.sizes());
  const auto unsqueezed = [](const OptTensor& t) { return t ? OptTensor(t->unsqueeze(0)) : std::nullopt; };
  const at::Tensor w_ih1 = w_ih.unsqueeze(0), w_hh1 = w_hh.unsqueeze(0), h1 = h.unsqueeze(0);
  const OptTensor b_ih1 = unsqueezed(b_ih), b_hh1 = unsqueezed(b_hh);
  check_layer(x.unsqueeze(0), h1, w_ih1, w_hh1, b_ih1, b_hh1, std::nullopt);
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const int64_t H = w_hh.size(1);
  const OptTensor bias = b_ih ? OptTensor(gate_bias(*b_ih1, *b_hh1, H)) : std::nullopt;
  auto [out, h_n, ws] = forward_steps(at::mm(x, w_ih.t()), h1, w_hh1, bias, std::nullopt, 1, save_workspace);
  return {out[0], save_workspace ? ws.view({x.size(0), kGruWorkspaceGates * H})
                                 : at::empty({0, kGruWorkspaceGates * H}, ws.options())};
}

GruLayerBwdResult gru_layer_bwd(const GruLayerBwdArgs& args) {
  const auto& [grad_out, grad_h_n, x, h0, w_ih, w_hh, lengths, workspace, has_bias] = args;
  const OptTensor len = check_layer(x, h0, w_ih, w_hh, std::nullopt, std::nullopt, lengths);
#if !defined(BMK_CUDA_EMULATOR)
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), D = w_ih.size(0), H = w_hh.size(2);
  check_tensor("grad_out", grad_out, x);
  check_shape("grad_out", grad_out, {T, B, D * H});
  check_shape("grad_h_n", grad_h_n, {D, B, H});
  check_shape("workspace", workspace, {D, T, B, kGruWorkspaceGates * H});
  TORCH_CHECK(on_device(grad_h_n) && on_device(workspace), kWhat, ": grad_h_n and workspace must be on x's device");
  const auto opts = x.options();
  const at::Tensor go = grad_out.contiguous(), ws = workspace.to(at::kFloat).contiguous();
  at::Tensor dgi = at::empty({T, B, D, 3 * H}, opts);
  at::Tensor dgh = at::empty({D, T, B, 3 * H}, opts);
  at::Tensor dh = at::empty({2, D, B, H}, opts.dtype(at::kFloat));
  dh[0].copy_(grad_h_n);
  at::Tensor dh_gemm = at::empty({D, B, H}, opts);
  const GruGatesPlan plan = gates_plan(D, B, H);
  GruBwdStepParams p{};
  p.grad_out = go.const_data_ptr(), p.ws = ws.const_data_ptr<float>();
  p.dgi = dgi.mutable_data_ptr(), p.dgh = dgh.mutable_data_ptr();
  p.lengths = len ? len->const_data_ptr<int64_t>() : nullptr;
  p.steps = T, p.batch = B, p.hidden = H, p.directions = D, p.dtype = dtype_code(x.scalar_type());
  for (int64_t s = 0; s < T; ++s) {
    p.step = s, p.dh = dh[s & 1].const_data_ptr<float>(), p.dh_next = dh[(s + 1) & 1].mutable_data_ptr<float>();
    p.dh_gemm = s == 0 ? nullptr : dh_gemm.const_data_ptr();
    run_launch(kWhat, [&](Stream st) { return launch_gru_bwd_step(p, plan, st); });
    // dgh of this step for both directions (direction 0 at time T-1-s, direction 1 at time s) as one
    // (D, B, 3H) view: direction 1 lies (T + 2s + 1 - T) B 3H = (2s + 1) B 3H elements after direction 0
    const int64_t row = B * 3 * H;
    const at::Tensor dgh_step = dgh.as_strided({D, B, 3 * H}, {(2 * s + 1) * row, 3 * H, 1}, (T - 1 - s) * row);
    at::bmm_out(dh_gemm, dgh_step, w_hh);  // both directions' dL/dh through W_hh, one batched GEMM
  }
  const at::Tensor dh0 = (dh[T & 1] + dh_gemm.to(at::kFloat)).to(h0.scalar_type());
  const at::Tensor dgi2 = dgi.view({T * B, D * 3 * H});
  at::Tensor dx = at::mm(dgi2, w_ih.reshape({D * 3 * H, I})).view({T, B, I});
  at::Tensor dw_ih = at::mm(dgi2.t(), x.reshape({T * B, I})).view({D, 3 * H, I});
  const at::Tensor h_prev = ws.view({D, T * B, kGruWorkspaceGates * H}).narrow(2, 4 * H, H).to(x.scalar_type());
  at::Tensor dw_hh = at::bmm(dgh.view({D, T * B, 3 * H}).transpose(1, 2), h_prev);
  at::Tensor db_ih = has_bias ? dgi.view({T * B, D, 3 * H}).sum(0) : at::empty({0}, opts);
  at::Tensor db_hh = has_bias ? dgh.view({D, T * B, 3 * H}).sum(1) : at::empty({0}, opts);
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

}  // namespace

#if defined(BMK_CUDA_EMULATOR)
TORCH_LIBRARY_IMPL(bmkernels, CPU, m) {
  m.impl("gru_cell_emulated_fwd", &GruCellFwdArgs::entry<&gru_cell_fwd>);
  m.impl("gru_layer_emulated_fwd", &GruLayerFwdArgs::entry<&gru_layer_fwd>);
  m.impl("gru_layer_emulated_bwd", &GruLayerBwdArgs::entry<&gru_layer_bwd>);
}
#else
TORCH_LIBRARY_IMPL(bmkernels, CUDA, m) {
  m.impl("gru_cell_fwd", &GruCellFwdArgs::entry<&gru_cell_fwd>);
  m.impl("gru_layer_fwd", &GruLayerFwdArgs::entry<&gru_layer_fwd>);
  m.impl("gru_layer_bwd", &GruLayerBwdArgs::entry<&gru_layer_bwd>);
}
#endif

}  // namespace bmk::BMK_CUDA_NS
