// The persistent small-batch GRU forward (docs/cuda.md, "conv2d and GRU"): one cooperative launch for every step of
// a layer. CTA c runs direction c / slices and hidden units [j0, j0 + units) of it; their W_hh rows (r, z, n) stay
// in shared memory for the whole sequence. Per step the CTA loads its direction's state h (B, H, float32) into
// shared memory, computes W_hh h for its units in float32 and the gates (gru_gates.cuh, as the per-step kernel), and
// writes h' to the other half of a global ping-pong buffer; a grid barrier then makes every CTA's h' visible
// before the next step reads it. The input projections come from one GEMM before the launch, as in the per-step path.
#include "cuda/arch.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gru.h"
#include "cuda/gru_gates.cuh"

#if !defined(BMK_CUDA_EMULATOR)
#include <cooperative_groups.h>
#endif

namespace bmk::BMK_CUDA_NS {
namespace {

// Another CTA's h' of the last step: past L1 (not coherent across SMs), from L2.
BMK_DEVICE float load_state(const float* p) {
#if defined(BMK_CUDA_EMULATOR)
  return *p;
#else
  return __ldcg(p);
#endif
}

BMK_DEVICE void grid_sync() {
#if defined(BMK_CUDA_EMULATOR)
  emu::grid_sync();
#else
  cooperative_groups::this_grid().sync();
#endif
}

template <typename T>
struct GruPersistentKernel {
  using storage = typename T::storage;

  static BMK_DEVICE void run(const GruPersistentParams& p) {
    const GruFwdStepParams& s = p.step;
    const int64_t H = s.hidden, B = s.batch, D = s.directions;
    const int tid = arch::thread_x();
    const int64_t d = arch::block_x() / p.slices, j0 = (arch::block_x() % p.slices) * p.units;
    const int64_t units = p.units < H - j0 ? p.units : H - j0;
    // shared memory: W_hh rows [gate][unit][H] in x's dtype, then the state (B, H) in float32
    auto* sw = reinterpret_cast<storage*>(arch::shared_base());
    float* sh = reinterpret_cast<float*>(arch::shared_base() + p.weight_bytes);
    const auto* w = static_cast<const storage*>(p.w_hh) + d * 3 * H * H;
    for (int64_t i = tid; i < 3 * units * H; i += kGruPersistentThreads) {
      const int64_t g = i / (units * H), u = (i / H) % units, k = i % H;
      arch::st_shared(sw + i, w[(g * H + j0 + u) * H + k]);
    }
    for (int64_t step = 0; step < s.steps; ++step) {
      const float* h = p.state + ((step & 1) * D + d) * B * H;
      float* h_next = p.state + (((step + 1) & 1) * D + d) * B * H;
      for (int64_t i = tid; i < B * H; i += kGruPersistentThreads) arch::st_shared(sh + i, load_state(h + i));
      arch::syncthreads();
      for (int64_t i = tid; i < B * units; i += kGruPersistentThreads) {
        const int64_t b = i / units, u = i % units;
        const float* hb = sh + b * H;
        float acc[3] = {0.0f, 0.0f, 0.0f};
        for (int64_t k = 0; k < H; ++k) {
          const float hk = arch::ld_shared(hb + k);
          BMK_UNROLL
          for (int g = 0; g < 3; ++g)
            acc[g] = arch::fma(arch::to_float(T{}, arch::ld_shared(sw + (g * units + u) * H + k)), hk, acc[g]);
        }
        h_next[b * H + j0 + u] =
            gru_unit_forward<T>(s, d, b, j0 + u, step, arch::ld_shared(hb + j0 + u), acc[0], acc[1], acc[2]);
      }
      grid_sync();  // every CTA's h' is written before any CTA reads it, and sh may be overwritten
    }
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T>
BMK_KERNEL_ATTRS(kGruPersistentThreads)
gru_persistent_kernel(const __grid_constant__ GruPersistentParams p) {
  GruPersistentKernel<T>::run(p);
}
#endif

template <typename T>
int launch_persistent(const GruPersistentParams& p, const GruPersistentPlan& plan, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch_cooperative({unsigned(plan.blocks), 1, 1}, {kGruPersistentThreads, 1, 1}, plan.shared_bytes,
                          [&] { GruPersistentKernel<T>::run(p); });
  return 0;
#else
  auto* kernel = gru_persistent_kernel<T>;
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes));
    if (err != cudaSuccess) return int(err);
  }
  void* args[] = {const_cast<GruPersistentParams*>(&p)};
  // every CTA resident at once (at most one per SM): the grid barrier needs a cooperative launch
  return int(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(plan.blocks)),
                                         dim3(kGruPersistentThreads), args, plan.shared_bytes,
                                         static_cast<cudaStream_t>(stream)));
#endif
}

}  // namespace

int launch_gru_persistent(const GruPersistentParams& p, const GruPersistentPlan& plan, Stream stream) {
  if (plan.blocks == 0 || p.step.steps == 0) return 0;
  return by_dtype(p.step.dtype, [&]<typename T>() { return launch_persistent<T>(p, plan, stream); });
}

}  // namespace bmk::BMK_CUDA_NS
