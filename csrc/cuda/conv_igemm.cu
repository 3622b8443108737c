// conv2d v2 (docs/cuda.md, "conv2d and GRU"): the forward as an implicit GEMM over NHWC f16/bf16 tensors on the
// architecture layer's tensor cores, out = act(x * w + bias + residual) with the whole epilogue applied to the f32
// accumulators in registers. A block computes 64 output pixels (4 warps x 16 rows) x BlockN output channels; the
// reduction over (r, s, c) streams through shared memory in tiles of 32, double-buffered: 16-byte cp.async
// copies, zero-filled where a tap falls in the padding or past an edge. Warp fragments as the attention's S = Q K^T:
// ldmatrix of the pixel rows (A) and of the weight rows (B, "col-major" as the mma wants it), mma m16n8k16.
#include "common/activations.h"
#include "cuda/arch.cuh"
#include "cuda/conv.h"
#include "cuda/elementwise.cuh"

namespace bmk::BMK_CUDA_NS {
namespace {

template <typename T, int BlockN>
struct ConvIgemmKernel {
  using storage = typename T::storage;
  static constexpr int kNTiles = BlockN / 8;  // 8-channel accumulator tiles per warp
  static constexpr int kChunksPerRow = kConvIgemmBlockK / kConvIgemmChunk;
  static constexpr int kAChunks = kConvIgemmBlockM * kChunksPerRow / kConvIgemmThreads;  // per thread and stage
  static constexpr int kBChunks = BlockN * kChunksPerRow / kConvIgemmThreads;
  static constexpr int kStageElems = (kConvIgemmBlockM + BlockN) * kConvIgemmPitch;
  static_assert(kAChunks >= 1 && kBChunks >= 1, "every thread copies whole chunks");

  // The input row of one of this thread's A chunks: output pixel (n, p, q) -> x's image n and the tap origin.
  struct Row {
    const storage* image;  // x + n H W C
    int64_t ih0, iw0;      // p stride - pad_top, q stride - pad_left
    bool valid;            // pixel < M
  };

  static BMK_DEVICE void load_stage(const ConvIgemmParams& p, const Row (&rows)[kAChunks], storage* stage,
                                    int64_t k_tile, int64_t n0, int64_t gemm_k) {
    const int tid = arch::thread_x();
    const auto* w = static_cast<const storage*>(p.weight);
    BMK_UNROLL
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kConvIgemmThreads, r = c / kChunksPerRow;
      const int64_t k = k_tile * kConvIgemmBlockK + (c % kChunksPerRow) * kConvIgemmChunk;
      const storage* src = nullptr;
      if (rows[i].valid && k < gemm_k) {
        // C % 8 == 0: a chunk lies within one tap (r, s)
        const int64_t tap = k / p.channels, ch = k - tap * p.channels;
        const int64_t ih = rows[i].ih0 + (tap / p.kernel_w) * p.dilation_h;
        const int64_t iw = rows[i].iw0 + (tap % p.kernel_w) * p.dilation_w;
        if (ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w)
          src = rows[i].image + (ih * p.in_w + iw) * p.channels + ch;
      }
      arch::cp_async16(stage + r * kConvIgemmPitch + (c % kChunksPerRow) * kConvIgemmChunk, src ? src : w,
                       src ? 16 : 0);
    }
    storage* sb = stage + kConvIgemmBlockM * kConvIgemmPitch;
    BMK_UNROLL
    for (int i = 0; i < kBChunks; ++i) {
      const int c = tid + i * kConvIgemmThreads, r = c / kChunksPerRow;
      const int64_t k = k_tile * kConvIgemmBlockK + (c % kChunksPerRow) * kConvIgemmChunk;
      const bool ok = n0 + r < p.out_channels && k < gemm_k;
      arch::cp_async16(sb + r * kConvIgemmPitch + (c % kChunksPerRow) * kConvIgemmChunk,
                       ok ? w + (n0 + r) * gemm_k + k : w, ok ? 16 : 0);
    }
  }

  // acc[j] += this warp's 16 pixel rows x channel tile j over the stage's 32 reduction columns.
  static BMK_DEVICE void compute_stage(float (&acc)[kNTiles][4], const storage* stage, int warp, int lane) {
    const storage* sa = stage + warp * 16 * kConvIgemmPitch;
    const storage* sb = stage + kConvIgemmBlockM * kConvIgemmPitch;
    BMK_UNROLL
    for (int kk = 0; kk < kConvIgemmBlockK / 16; ++kk) {
      uint32_t a[4];
      arch::ldmatrix_x4<false>(a, sa + (lane % 16) * kConvIgemmPitch + kk * 16 + (lane / 16) * 8);
      BMK_UNROLL
      for (int j = 0; j < kNTiles; j += 2) {
        // matrices: channels j*8.. at k kk*16, at kk*16+8, channels (j+1)*8.. at both: b of tiles j and j+1
        const int m = lane / 8;
        uint32_t r[4];
        arch::ldmatrix_x4<false>(r, sb + (j * 8 + (m / 2) * 8 + lane % 8) * kConvIgemmPitch + kk * 16 + (m % 2) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        arch::mma_16816<T>(acc[j], a, b0);
        arch::mma_16816<T>(acc[j + 1], a, b1);
      }
    }
  }

  static BMK_DEVICE void run(const ConvIgemmParams& p, int64_t k_tiles) {
    const int tid = arch::thread_x(), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t m0 = int64_t(arch::block_x()) * kConvIgemmBlockM, n0 = int64_t(arch::block_y()) * BlockN;
    const int64_t pixels = p.out_h * p.out_w, gemm_m = p.batch * pixels;
    const int64_t gemm_k = p.kernel_h * p.kernel_w * p.channels;
    Row rows[kAChunks];
    BMK_UNROLL
    for (int i = 0; i < kAChunks; ++i) {
      const int64_t m = m0 + (tid + i * kConvIgemmThreads) / kChunksPerRow;
      const int64_t n = m / pixels, pq = m - n * pixels, oh = pq / p.out_w, ow = pq - oh * p.out_w;
      const auto* x = static_cast<const storage*>(p.x);
      rows[i] = {m < gemm_m ? x + n * p.in_h * p.in_w * p.channels : x, oh * p.stride_h - p.pad_top,
                 ow * p.stride_w - p.pad_left, m < gemm_m};
    }
    auto* smem = reinterpret_cast<storage*>(arch::shared_base());
    float acc[kNTiles][4] = {};
    load_stage(p, rows, smem, 0, n0, gemm_k);
    arch::cp_async_commit();
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      if (kt + 1 < k_tiles) {
        load_stage(p, rows, smem + ((kt + 1) % kConvIgemmStages) * kStageElems, kt + 1, n0, gemm_k);
        arch::cp_async_commit();
        arch::cp_async_wait<1>();  // tile kt has landed; kt + 1 may still be in flight
      } else {
        arch::cp_async_wait<0>();
      }
      arch::syncthreads();
      compute_stage(acc, smem + (kt % kConvIgemmStages) * kStageElems, warp, lane);
      arch::syncthreads();  // the next iteration's copies overwrite this stage
    }

    // the epilogue on the accumulators: lane (g, t) holds rows g, g + 8 and columns 2t, 2t + 1 of each tile
    const Activation act = static_cast<Activation>(p.activation);
    BMK_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int64_t m = m0 + warp * 16 + g + (e / 2) * 8;
      if (m >= gemm_m) continue;
      BMK_UNROLL
      for (int j = 0; j < kNTiles; ++j) {
        const int64_t col = n0 + j * 8 + 2 * t + (e & 1);
        if (col >= p.out_channels) continue;
        const int64_t i = m * p.out_channels + col;
        float v = acc[j][e];
        if (p.bias) v += p.bias[col];
        if (p.residual) v += load<T>(p.residual, i);
        if (p.preact) store<T>(p.preact, i, v);
        store<T>(p.out, i, activation_forward(act, v, p.slope));
      }
    }
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T, int BlockN>
BMK_KERNEL_ATTRS(kConvIgemmThreads)
conv_igemm_kernel(const __grid_constant__ ConvIgemmParams p, int64_t k_tiles) {
  ConvIgemmKernel<T, BlockN>::run(p, k_tiles);
}
#endif

template <typename T, int BlockN>
int launch_igemm(const ConvIgemmParams& p, const ConvIgemmPlan& plan, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.grid[0]), unsigned(plan.grid[1]), 1}, {kConvIgemmThreads, 1, 1}, plan.shared_bytes,
              [&] { ConvIgemmKernel<T, BlockN>::run(p, plan.k_tiles); });
  return 0;
#else
  auto* kernel = conv_igemm_kernel<T, BlockN>;
  // clang-format off
  kernel<<<dim3(unsigned(plan.grid[0]), unsigned(plan.grid[1])), kConvIgemmThreads, plan.shared_bytes,
           static_cast<cudaStream_t>(stream)>>>(p, plan.k_tiles);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

template <typename T>
int launch_igemm_dtype(const ConvIgemmParams& p, const ConvIgemmPlan& plan, Stream stream) {
  return plan.block_n == 32 ? launch_igemm<T, 32>(p, plan, stream) : launch_igemm<T, 64>(p, plan, stream);
}

}  // namespace

int launch_conv_igemm(const ConvIgemmParams& p, const ConvIgemmPlan& plan, Stream stream) {
  if (plan.empty()) return 0;
  return p.dtype == CudaDtype::f16 ? launch_igemm_dtype<arch::f16>(p, plan, stream)
                                   : launch_igemm_dtype<arch::bf16>(p, plan, stream);
}

}  // namespace bmk::BMK_CUDA_NS
