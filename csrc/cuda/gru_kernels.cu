// The fused GRU gate kernels of one step on the architecture layer (docs/cuda.md, "conv and GRU"): forward
// r, z, n and h' from the two projections (csrc/common/gru_math.h), the output and the workspace; backward
// the gate gradients and the direct part of dL/dh. One thread per (direction, batch row, unit); float32 math.
#include "common/gru_math.h"
#include "cuda/arch.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gru.h"
#include "cuda/gru_gates.cuh"

namespace bmk::BMK_CUDA_NS {
namespace {

template <typename T>
struct GruFwdStepKernel {
  static BMK_DEVICE void run(const GruFwdStepParams& p) {
    const int64_t H = p.hidden, B = p.batch, D = p.directions;
    const int64_t e = int64_t(arch::block_x()) * kGruThreads + arch::thread_x();
    if (e >= D * B * H) return;
    const int64_t d = e / (B * H), b = (e / H) % B, j = e % H, gh = (d * B + b) * 3 * H + j;
    const float h_new = gru_unit_forward<T>(p, d, b, j, p.step, p.h[e], load<T>(p.gh, gh), load<T>(p.gh, gh + H),
                                            load<T>(p.gh, gh + 2 * H));
    if (p.h_next) p.h_next[e] = h_new;
    if (p.h_next_lp) store<T>(p.h_next_lp, e, h_new);
  }
};

template <typename T>
struct GruBwdStepKernel {
  static BMK_DEVICE void run(const GruBwdStepParams& p) {
    const int64_t H = p.hidden, B = p.batch, D = p.directions;
    const int64_t e = int64_t(arch::block_x()) * kGruThreads + arch::thread_x();
    if (e >= D * B * H) return;
    const int64_t d = e / (B * H), b = (e / H) % B, j = e % H;
    const int64_t t = d == 0 ? p.steps - 1 - p.step : p.step;
    const float carried = p.dh[e] + (p.dh_gemm ? load<T>(p.dh_gemm, e) : 0.0f);  // dL/dh' from later steps
    const int64_t gi = ((t * B + b) * D + d) * 3 * H + j, gh = ((d * p.steps + t) * B + b) * 3 * H + j;
    float d_r = 0.0f, d_z = 0.0f, d_in = 0.0f, d_hn = 0.0f, d_h = carried;  // past the end: the state passes
    if (!p.lengths || t < p.lengths[b]) {
      const float* ws = p.ws + ((d * p.steps + t) * B + b) * kGruWorkspaceGates * H + j;
      const float g = carried + load<T>(p.grad_out, (t * B + b) * D * H + d * H + j);
      gru_gates_backward(g, ws[0], ws[H], ws[2 * H], ws[3 * H], ws[4 * H], d_r, d_z, d_in, d_hn, d_h);
    }
    store<T>(p.dgi, gi, d_r), store<T>(p.dgi, gi + H, d_z), store<T>(p.dgi, gi + 2 * H, d_in);
    store<T>(p.dgh, gh, d_r), store<T>(p.dgh, gh + H, d_z), store<T>(p.dgh, gh + 2 * H, d_hn);
    p.dh_next[e] = d_h;
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T>
BMK_KERNEL_ATTRS(kGruThreads)
gru_fwd_step_kernel(const __grid_constant__ GruFwdStepParams p) {
  GruFwdStepKernel<T>::run(p);
}
template <typename T>
BMK_KERNEL_ATTRS(kGruThreads)
gru_bwd_step_kernel(const __grid_constant__ GruBwdStepParams p) {
  GruBwdStepKernel<T>::run(p);
}
#endif

template <typename T>
int launch_fwd(const GruFwdStepParams& p, const GruGatesPlan& plan, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.blocks), 1, 1}, {kGruThreads, 1, 1}, 0, [&] { GruFwdStepKernel<T>::run(p); });
  return 0;
#else
  auto* kernel = gru_fwd_step_kernel<T>;
  // clang-format off
  kernel<<<unsigned(plan.blocks), kGruThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

template <typename T>
int launch_bwd(const GruBwdStepParams& p, const GruGatesPlan& plan, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.blocks), 1, 1}, {kGruThreads, 1, 1}, 0, [&] { GruBwdStepKernel<T>::run(p); });
  return 0;
#else
  auto* kernel = gru_bwd_step_kernel<T>;
  // clang-format off
  kernel<<<unsigned(plan.blocks), kGruThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

}  // namespace

int launch_gru_fwd_step(const GruFwdStepParams& p, const GruGatesPlan& plan, Stream stream) {
  if (plan.empty()) return 0;
  return by_dtype(p.dtype, [&]<typename T>() { return launch_fwd<T>(p, plan, stream); });
}

int launch_gru_bwd_step(const GruBwdStepParams& p, const GruGatesPlan& plan, Stream stream) {
  if (plan.empty()) return 0;
  return by_dtype(p.dtype, [&]<typename T>() { return launch_bwd<T>(p, plan, stream); });
}

}  // namespace bmk::BMK_CUDA_NS
