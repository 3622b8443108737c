#pragma once
// Attention forward, FlashAttention-2 algorithm on the architecture layer (docs/cuda.md). A block of
// 4 warps owns 64 query rows (16 per warp) of one (batch, head); key blocks of BlockN stream through
// shared memory (cp.async), S = Q K^T and O += P V run on tensor cores (f16/bf16: mma m16n8k16, P
// reused from the S accumulators as the A operand) or as SIMT FMAs in the same fragment layout (f32,
// IEEE). Online softmax in registers; every score term (softcap, bias, ALiBi, mask, window, key
// range, dropout) is applied per element in the accumulator layout: lane (g = lane/4, t = lane%4)
// holds rows g and g+8 of its warp's 16, columns 2t and 2t+1 of every 8-column tile.
#include "common/attention_math.h"
#include "common/philox.h"
#include "cuda/arch.cuh"
#include "cuda/attention.h"

namespace bmk::BMK_CUDA_NS {

template <typename T>
constexpr CudaDtype dtype_of() {
  return std::is_same_v<T, arch::f16>    ? CudaDtype::f16
         : std::is_same_v<T, arch::bf16> ? CudaDtype::bf16
                                         : CudaDtype::f32;
}

// The logit of score (b, h, i, j) from the raw dot product: scale, softcap, + bias, - ALiBi distance;
// -inf where masked, outside the window or key range, or past Lk. softcap_grad: d logit / d (scaled dot).
template <typename T>
BMK_DEVICE float attention_logit(const AttentionFwdParams& p, const AttentionWindow& win, float dot, int64_t b,
                                 int64_t h, int64_t i, int64_t j, float slope, float* softcap_grad = nullptr) {
  if (i >= p.q_len || j < win.first_key(i) || j >= win.end_key(i)) return -INFINITY;
  float x = dot * p.scale;
  if (p.softcap > 0) {
    const float th = arch::tanh(x / p.softcap);
    x = p.softcap * th;
    if (softcap_grad) *softcap_grad = 1.0f - th * th;
  } else if (softcap_grad) {
    *softcap_grad = 1.0f;
  }
  if (p.bias) {
    const auto* bias = static_cast<const typename T::storage*>(p.bias);
    x += arch::to_float(
        T{}, bias[b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2] + j * p.bias_stride[3]]);
  }
  if (p.alibi) {
    const int64_t distance = i + p.diag_offset - j;
    x -= slope * static_cast<float>(distance < 0 ? -distance : distance);
  }
  if (p.mask && !p.mask[b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3]])
    return -INFINITY;
  return x;
}

// The window of batch b's problem (its key range applied).
BMK_DEVICE AttentionWindow attention_window(const AttentionFwdParams& p, int64_t b) {
  const AttentionWindow win{p.window_left, p.window_right, p.diag_offset, p.q_len, p.k_len};
  return p.key_range ? win.for_keys(p.key_range[2 * b], p.key_range[2 * b + 1]) : win;
}

template <typename T, int HeadBucket, int BlockN>
struct AttentionFwdKernel {
  using storage = typename T::storage;
  static constexpr bool kTensorCores = sizeof(storage) == 2;
  static constexpr CudaDtype kDtype = dtype_of<T>();
  static constexpr int kPitch = attention_pitch(kDtype, HeadBucket);
  static constexpr int kChunk = 16 / sizeof(storage);  // elements per 16-byte copy
  static constexpr int kSTiles = BlockN / 8;           // 8-key column tiles of S per warp
  static constexpr int kOTiles = HeadBucket / 8;       // 8-wide column tiles of O per warp
  static_assert(attention_fwd_block_n(kDtype, HeadBucket) == BlockN, "instantiation differs from the plan");

  // rows x HeadBucket tile of a (.., L, D) tensor starting at row0 into shared memory; zeros past
  // valid_rows and valid_cols (so padded columns add nothing to the dot products).
  static BMK_DEVICE void load_tile(storage* dst, const storage* src, int64_t row_stride, int rows, int64_t valid_rows,
                                   int64_t valid_cols, bool vector_loads) {
    constexpr int kChunksPerRow = HeadBucket / kChunk;
    for (int c = arch::thread_x(); c < rows * kChunksPerRow; c += kAttentionThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
      storage* d = dst + r * kPitch + col;
      const bool row_ok = r < valid_rows;
      if (vector_loads) {
        const bool ok = row_ok && col < valid_cols;
        arch::cp_async16(d, ok ? src + r * row_stride + col : src, ok ? 16 : 0);
      } else {
        BMK_UNROLL
        for (int e = 0; e < kChunk; ++e) {
          const bool ok = row_ok && col + e < valid_cols;
          arch::st_shared(d + e, ok ? src[r * row_stride + col + e] : storage(0));
        }
      }
    }
  }

  static BMK_DEVICE void run(const AttentionFwdParams& p, bool vector_loads) {
    const int tid = arch::thread_x(), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t m0 = int64_t(arch::block_x()) * kAttentionBlockM, h = arch::block_y(), b = arch::block_z();
    const int64_t hk = h / (p.q_heads / p.kv_heads);
    const int64_t D = p.head_dim, Dv = p.v_head_dim, Lq = p.q_len, Lk = p.k_len;
    const auto* q = static_cast<const storage*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
    const auto* k = static_cast<const storage*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
    const auto* v = static_cast<const storage*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
    auto* sq = reinterpret_cast<storage*>(arch::shared_base());
    storage* sk = sq + kAttentionBlockM * kPitch;
    storage* sv = sk + BlockN * kPitch;
    float* sp = reinterpret_cast<float*>(sv + BlockN * kPitch) + warp * 16 * BlockN;  // f32 only

    const AttentionWindow win = attention_window(p, b);
    const int64_t last_row = min64(m0 + kAttentionBlockM, Lq) - 1;
    const int64_t key_lo = win.first_key(m0) / BlockN * BlockN, key_hi = win.end_key(last_row);
    const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    const uint64_t seed = p.dropout_p > 0 ? static_cast<uint64_t>(*p.seed) : 0;
    const float slope = p.alibi ? p.alibi[b * p.q_heads + h] : 0.0f;

    load_tile(sq, q, p.q_stride[2], kAttentionBlockM, Lq - m0, D, vector_loads);
    arch::cp_async_commit();
    float o[kOTiles][4] = {};
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

    for (int64_t kb = key_lo; kb < key_hi; kb += BlockN) {
      load_tile(sk, k + kb * p.k_stride[2], p.k_stride[2], BlockN, Lk - kb, D, vector_loads);
      load_tile(sv, v + kb * p.v_stride[2], p.v_stride[2], BlockN, Lk - kb, Dv, vector_loads);
      arch::cp_async_commit();
      arch::cp_async_wait<0>();
      arch::syncthreads();

      float s[kSTiles][4] = {};
      scores(s, sq + warp * 16 * kPitch, sk, D, g, t, lane);
      float tile_max[2] = {-INFINITY, -INFINITY};
      BMK_UNROLL
      for (int j = 0; j < kSTiles; ++j) {
        BMK_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int64_t i = rows[e / 2], col = kb + j * 8 + 2 * t + (e & 1);
          s[j][e] = attention_logit<T>(p, win, s[j][e], b, h, i, col, slope);
          tile_max[e / 2] = s[j][e] > tile_max[e / 2] ? s[j][e] : tile_max[e / 2];
        }
      }
      float keep_scale[2];
      BMK_UNROLL
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], arch::shfl_xor(tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], arch::shfl_xor(tile_max[r], 2));
        const float new_max = fmaxf(row_max[r], tile_max[r]);
        // a row that has seen no key yet keeps max -inf: shift by 0 there (exp(-inf) = 0, no NaN)
        const float shift = new_max == -INFINITY ? 0.0f : new_max;
        keep_scale[r] = arch::exp(row_max[r] - shift);
        row_max[r] = new_max;
        row_sum[r] *= keep_scale[r];
      }
      BMK_UNROLL
      for (int n = 0; n < kOTiles; ++n) BMK_UNROLL
      for (int e = 0; e < 4; ++e) o[n][e] *= keep_scale[e / 2];
      BMK_UNROLL
      for (int j = 0; j < kSTiles; ++j) {
        BMK_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const float shift = row_max[r] == -INFINITY ? 0.0f : row_max[r];
          const float prob = arch::exp(s[j][e] - shift);
          row_sum[r] += prob;
          const int64_t col = kb + j * 8 + 2 * t + (e & 1);
          const bool dropped =
              p.dropout_p > 0 && rows[r] < Lq && col < Lk &&
              !dropout_keep(seed, dropout_counter(b * p.q_heads + h, rows[r], col, Lq, Lk), p.dropout_p);
          s[j][e] = dropped ? 0.0f : prob;
        }
      }
      accumulate_pv(o, s, sv, sp, Dv, g, t, lane);
      arch::syncthreads();  // the next key block overwrites sk and sv
    }

    arch::cp_async_wait<0>();  // the Q tile's copies, where no key block ran
    // each row's sum is spread over its 4 lanes
    BMK_UNROLL
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += arch::shfl_xor(row_sum[r], 1);
      row_sum[r] += arch::shfl_xor(row_sum[r], 2);
    }
    const float keep_rescale = p.dropout_p > 0 ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    auto* out = static_cast<storage*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
    BMK_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t i = rows[r];
      if (i >= Lq) continue;
      const float inv = row_sum[r] > 0 ? keep_rescale / row_sum[r] : 0.0f;  // no visible key: zeros
      BMK_UNROLL
      for (int n = 0; n < kOTiles; ++n) {
        BMK_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int64_t col = n * 8 + 2 * t + c;
          if (col < Dv) out[i * p.out_stride[2] + col] = arch::from_float(T{}, o[n][2 * r + c] * inv);
        }
      }
      if (t == 0) {
        p.lse[(b * p.q_heads + h) * Lq + i] = row_sum[r] > 0 ? row_max[r] + arch::log(row_sum[r]) : -INFINITY;
      }
    }
  }

  // s[j] += this warp's 16 query rows (wq) times key tile j of sk, over the first D columns.
  static BMK_DEVICE void scores(float (&s)[kSTiles][4], const storage* wq, const storage* sk, int64_t D, int g, int t,
                                int lane) {
    if constexpr (kTensorCores) {
      const int k_steps = static_cast<int>((D + 15) / 16);
      BMK_UNROLL
      for (int kk = 0; kk < HeadBucket / 16; ++kk) {
        if (kk >= k_steps) continue;
        uint32_t a[4];
        arch::ldmatrix_x4<false>(a, wq + (lane % 16) * kPitch + kk * 16 + (lane / 16) * 8);
        BMK_UNROLL
        for (int j = 0; j < kSTiles; j += 2) {
          // matrices: keys j*8.. at d kk*16, at d kk*16+8, keys (j+1)*8.. at both: b of tiles j and j+1
          const int m = lane / 8;
          uint32_t r[4];
          arch::ldmatrix_x4<false>(r, sk + (j * 8 + (m / 2) * 8 + lane % 8) * kPitch + kk * 16 + (m % 2) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          arch::mma_16816<T>(s[j], a, b0);
          arch::mma_16816<T>(s[j + 1], a, b1);
        }
      }
    } else {
      BMK_UNROLL
      for (int j = 0; j < kSTiles; ++j) {
        BMK_UNROLL
        for (int e = 0; e < 4; ++e) {
          const storage* qr = wq + (g + (e / 2) * 8) * kPitch;
          const storage* kr = sk + (j * 8 + 2 * t + (e & 1)) * kPitch;
          float acc = 0.0f;
          for (int d = 0; d < D; ++d) acc = arch::fma(arch::ld_shared(qr + d), arch::ld_shared(kr + d), acc);
          s[j][e] = acc;
        }
      }
    }
  }

  // o += P (this warp's 16 rows x BlockN keys, in the S accumulators) times the value tile sv.
  static BMK_DEVICE void accumulate_pv(float (&o)[kOTiles][4], const float (&s)[kSTiles][4], const storage* sv,
                                       float* sp, int64_t Dv, int g, int t, int lane) {
    const int dv_tiles = static_cast<int>((Dv + 7) / 8);
    if constexpr (kTensorCores) {
      BMK_UNROLL
      for (int ks = 0; ks < BlockN / 16; ++ks) {
        // the accumulators of key tiles 2ks and 2ks+1 are exactly the A fragment of keys ks*16..ks*16+15
        const uint32_t a[4] = {arch::pack2<T>(s[2 * ks][0], s[2 * ks][1]), arch::pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                               arch::pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                               arch::pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
        BMK_UNROLL
        for (int n = 0; n < kOTiles; n += 2) {
          if (n >= dv_tiles) continue;
          // matrices: keys ks*16.. and ks*16+8.. at value cols n*8.., then both at (n+1)*8.., transposed
          const int m = lane / 8;
          uint32_t r[4];
          arch::ldmatrix_x4<true>(r, sv + (ks * 16 + (m % 2) * 8 + lane % 8) * kPitch + n * 8 + (m / 2) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          arch::mma_16816<T>(o[n], a, b0);
          arch::mma_16816<T>(o[n + 1], a, b1);
        }
      }
    } else {
      BMK_UNROLL
      for (int j = 0; j < kSTiles; ++j) BMK_UNROLL
      for (int e = 0; e < 4; ++e) arch::st_shared(sp + (g + (e / 2) * 8) * BlockN + j * 8 + 2 * t + (e & 1), s[j][e]);
      arch::syncwarp();
      BMK_UNROLL
      for (int n = 0; n < kOTiles; ++n) {
        if (n >= dv_tiles) continue;
        BMK_UNROLL
        for (int e = 0; e < 4; ++e) {
          const float* pr = sp + (g + (e / 2) * 8) * BlockN;
          const storage* vc = sv + n * 8 + 2 * t + (e & 1);
          float acc = o[n][e];
          for (int c = 0; c < BlockN; ++c)
            acc = arch::fma(arch::ld_shared(pr + c), arch::ld_shared(vc + c * kPitch), acc);
          o[n][e] = acc;
        }
      }
      arch::syncwarp();  // the next key block rewrites sp
    }
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T, int HeadBucket, int BlockN>
BMK_KERNEL_ATTRS(kAttentionThreads)
attention_fwd_kernel(const __grid_constant__ AttentionFwdParams p, bool vector_loads) {
  AttentionFwdKernel<T, HeadBucket, BlockN>::run(p, vector_loads);
}
#endif

// Launches the instantiation for (T, HeadBucket): one per generated file (attention_fwd_*.cu).
template <typename T, int HeadBucket>
int launch_attention_fwd_bucket(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream) {
  constexpr int kBlockN = attention_fwd_block_n(dtype_of<T>(), HeadBucket);
  using Kernel = AttentionFwdKernel<T, HeadBucket, kBlockN>;
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.grid[0]), unsigned(plan.grid[1]), unsigned(plan.grid[2])}, {kAttentionThreads, 1, 1},
              plan.shared_bytes, [&] { Kernel::run(p, plan.vector_loads); });
  return 0;
#else
  auto* kernel = attention_fwd_kernel<T, HeadBucket, kBlockN>;
  if (plan.shared_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes));
    if (err != cudaSuccess) return int(err);
  }
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  // clang-format off
  kernel<<<dim3(unsigned(plan.grid[0]), unsigned(plan.grid[1]), unsigned(plan.grid[2])), kAttentionThreads,
           plan.shared_bytes, cuda_stream>>>(p, plan.vector_loads);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

}  // namespace bmk::BMK_CUDA_NS
