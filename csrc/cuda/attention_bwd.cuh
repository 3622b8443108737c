#pragma once
// Attention backward on the architecture layer, SIMT in f32 (docs/cuda.md): probabilities recomputed
// from the saved lse; a dK/dV kernel per (key block, kv head, batch) looping in order over the GQA
// group and the query blocks (it also writes dbias, each element once), and a dQ kernel per (query
// block, head, batch). No atomics: deterministic. Per score (i, j), with delta_i = rowsum(dO O) - dlse_i:
//   P = exp(x - lse_i), Pd = keep P / (1 - p), dP = keep (dO_i . V_j) / (1 - p), dS = P (dP - delta_i),
//   dV_j += Pd dO_i, and with ds = dS softcap' scale: dK_j += ds Q_i, dQ_i += ds K_j.
#include "cuda/attention_fwd.cuh"

namespace bmk::BMK_CUDA_NS {

template <typename T, int HeadBucket>
struct AttentionBwdKernel {
  using storage = typename T::storage;
  static constexpr int kBlock = attention_bwd_block(HeadBucket);
  static constexpr int kPerThread = kBlock * HeadBucket / kAttentionThreads;  // accumulator elements per thread
  static constexpr int kTile = kBlock * kBlock;

  // rows x HeadBucket tile of a (.., L, D) tensor from row0 into f32 shared memory; zeros past the valid extent.
  static BMK_DEVICE void load(float* dst, const storage* src, int64_t row_stride, int64_t valid_rows,
                              int64_t valid_cols) {
    for (int e = arch::thread_x(); e < kBlock * HeadBucket; e += kAttentionThreads) {
      const int r = e / HeadBucket, c = e % HeadBucket;
      const bool ok = r < valid_rows && c < valid_cols;
      arch::st_shared(dst + e, ok ? arch::to_float(T{}, src[r * row_stride + c]) : 0.0f);
    }
  }

  static BMK_DEVICE float dot(const float* a, const float* b, int64_t n) {
    float acc = 0.0f;
    for (int d = 0; d < n; ++d) acc = arch::fma(arch::ld_shared(a + d), arch::ld_shared(b + d), acc);
    return acc;
  }

  // The score gradients of the tile (queries i0.., keys j0..) of head h: sp <- Pd (when given), sds <- ds;
  // dbias written where asked for. sq/sdo hold query rows, sk/sv key rows.
  static BMK_DEVICE void score_grads(const AttentionBwdParams& bp, const AttentionWindow& win, int64_t b, int64_t h,
                                     int64_t i0, int64_t j0, const float* sq, const float* sdo, const float* sk,
                                     const float* sv, float* sp, float* sds, bool write_dbias) {
    const AttentionFwdParams& p = bp.fwd;
    const float slope = p.alibi ? p.alibi[b * p.q_heads + h] : 0.0f;
    const uint64_t seed = p.dropout_p > 0 ? static_cast<uint64_t>(*p.seed) : 0;
    const float rescale = p.dropout_p > 0 ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    for (int e = arch::thread_x(); e < kTile; e += kAttentionThreads) {
      const int r = e / kBlock, c = e % kBlock;
      const int64_t i = i0 + r, j = j0 + c;
      float cap_grad = 1.0f;
      const float x = attention_logit<T>(p, win, dot(sq + r * HeadBucket, sk + c * HeadBucket, p.head_dim), b, h, i, j,
                                         slope, &cap_grad);
      float pd = 0.0f, ds = 0.0f, dscore = 0.0f;
      if (x != -INFINITY) {
        const int64_t row = (b * p.q_heads + h) * p.q_len + i;
        const float prob = arch::exp(x - bp.lse[row]);
        const bool keep = p.dropout_p <= 0 ||
                          dropout_keep(seed, dropout_counter(b * p.q_heads + h, i, j, p.q_len, p.k_len), p.dropout_p);
        pd = keep ? prob * rescale : 0.0f;
        const float dp = keep ? dot(sdo + r * HeadBucket, sv + c * HeadBucket, p.v_head_dim) * rescale : 0.0f;
        dscore = prob * (dp - bp.delta[row]);
        ds = dscore * cap_grad * p.scale;
      }
      if (sp) arch::st_shared(sp + e, pd);
      arch::st_shared(sds + e, ds);
      if (write_dbias && i < p.q_len && j < p.k_len)
        bp.dbias[((b * p.q_heads + h) * p.q_len + i) * p.k_len + j] = dscore;
    }
  }

  // acc[u] (element tid + 128 u of a kBlock x HeadBucket result) += sum_r m[r, row] (or m[row, r]) t[r, col].
  template <bool Transposed>
  static BMK_DEVICE void accumulate(float (&acc)[kPerThread], const float* m, const float* t, int64_t cols) {
    BMK_UNROLL
    for (int u = 0; u < kPerThread; ++u) {
      const int e = arch::thread_x() + kAttentionThreads * u, row = e / HeadBucket, col = e % HeadBucket;
      if (col >= cols) continue;
      float a = acc[u];
      for (int r = 0; r < kBlock; ++r) {
        const float w = arch::ld_shared(Transposed ? m + r * kBlock + row : m + row * kBlock + r);
        a = arch::fma(w, arch::ld_shared(t + r * HeadBucket + col), a);
      }
      acc[u] = a;
    }
  }

  static BMK_DEVICE void store(storage* dst, const float (&acc)[kPerThread], int64_t valid_rows, int64_t cols) {
    BMK_UNROLL
    for (int u = 0; u < kPerThread; ++u) {
      const int e = arch::thread_x() + kAttentionThreads * u, row = e / HeadBucket, col = e % HeadBucket;
      if (row < valid_rows && col < cols) dst[row * cols + col] = arch::from_float(T{}, acc[u]);
    }
  }

  struct Tiles {
    float *k, *v, *q, *dout, *p, *ds;
    BMK_DEVICE Tiles() {
      k = reinterpret_cast<float*>(arch::shared_base());
      v = k + kBlock * HeadBucket, q = v + kBlock * HeadBucket, dout = q + kBlock * HeadBucket;
      p = dout + kBlock * HeadBucket, ds = p + kTile;
    }
  };

  static BMK_DEVICE void dkdv(const AttentionBwdParams& bp) {
    const AttentionFwdParams& p = bp.fwd;
    const int64_t j0 = int64_t(arch::block_x()) * kBlock, hk = arch::block_y(), b = arch::block_z();
    const int64_t group = p.q_heads / p.kv_heads, Lq = p.q_len, Lk = p.k_len;
    const Tiles s;
    const auto* k = static_cast<const storage*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j0 * p.k_stride[2];
    const auto* v = static_cast<const storage*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j0 * p.v_stride[2];
    load(s.k, k, p.k_stride[2], Lk - j0, p.head_dim);
    load(s.v, v, p.v_stride[2], Lk - j0, p.v_head_dim);
    float dk[kPerThread] = {}, dv[kPerThread] = {};
    const AttentionWindow win = attention_window(p, b);
    const int64_t last_key = min64(j0 + kBlock, Lk) - 1;
    const bool any_key = j0 < win.key_end && last_key >= win.key_begin;  // the block meets the key range
    const int64_t q_lo = any_key ? win.first_query(j0) / kBlock * kBlock : 0;
    const int64_t q_hi = any_key ? win.end_query(last_key) : 0;
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t i0 = q_lo; i0 < q_hi; i0 += kBlock) {
        const auto* q = static_cast<const storage*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
        const auto* dout = static_cast<const storage*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
                           i0 * bp.dout_stride[2];
        load(s.q, q, p.q_stride[2], Lq - i0, p.head_dim);
        load(s.dout, dout, bp.dout_stride[2], Lq - i0, p.v_head_dim);
        arch::syncthreads();
        score_grads(bp, win, b, h, i0, j0, s.q, s.dout, s.k, s.v, s.p, s.ds, bp.dbias != nullptr);
        arch::syncthreads();
        accumulate<true>(dv, s.p, s.dout, p.v_head_dim);
        accumulate<true>(dk, s.ds, s.q, p.head_dim);
        arch::syncthreads();  // the next query block overwrites the tiles
      }
    }
    store(static_cast<storage*>(bp.dk) + ((b * p.kv_heads + hk) * Lk + j0) * p.head_dim, dk, Lk - j0, p.head_dim);
    store(static_cast<storage*>(bp.dv) + ((b * p.kv_heads + hk) * Lk + j0) * p.v_head_dim, dv, Lk - j0, p.v_head_dim);
  }

  static BMK_DEVICE void dq(const AttentionBwdParams& bp) {
    const AttentionFwdParams& p = bp.fwd;
    const int64_t i0 = int64_t(arch::block_x()) * kBlock, h = arch::block_y(), b = arch::block_z();
    const int64_t hk = h / (p.q_heads / p.kv_heads), Lq = p.q_len, Lk = p.k_len;
    const Tiles s;
    const auto* q = static_cast<const storage*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
    const auto* dout =
        static_cast<const storage*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] + i0 * bp.dout_stride[2];
    load(s.q, q, p.q_stride[2], Lq - i0, p.head_dim);
    load(s.dout, dout, bp.dout_stride[2], Lq - i0, p.v_head_dim);
    float dq[kPerThread] = {};
    const AttentionWindow win = attention_window(p, b);
    const int64_t last_row = min64(i0 + kBlock, Lq) - 1;
    const int64_t key_lo = win.first_key(i0) / kBlock * kBlock, key_hi = win.end_key(last_row);
    for (int64_t j0 = key_lo; j0 < key_hi; j0 += kBlock) {
      const auto* k = static_cast<const storage*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j0 * p.k_stride[2];
      const auto* v = static_cast<const storage*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j0 * p.v_stride[2];
      load(s.k, k, p.k_stride[2], Lk - j0, p.head_dim);
      load(s.v, v, p.v_stride[2], Lk - j0, p.v_head_dim);
      arch::syncthreads();
      score_grads(bp, win, b, h, i0, j0, s.q, s.dout, s.k, s.v, nullptr, s.ds, false);
      arch::syncthreads();
      accumulate<false>(dq, s.ds, s.k, p.head_dim);
      arch::syncthreads();
    }
    store(static_cast<storage*>(bp.dq) + ((b * p.q_heads + h) * Lq + i0) * p.head_dim, dq, Lq - i0, p.head_dim);
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T, int HeadBucket>
BMK_KERNEL_ATTRS(kAttentionThreads)
attention_bwd_dkdv_kernel(const __grid_constant__ AttentionBwdParams p) {
  AttentionBwdKernel<T, HeadBucket>::dkdv(p);
}
template <typename T, int HeadBucket>
BMK_KERNEL_ATTRS(kAttentionThreads)
attention_bwd_dq_kernel(const __grid_constant__ AttentionBwdParams p) {
  AttentionBwdKernel<T, HeadBucket>::dq(p);
}
#endif

// Launches the dK/dV and dQ kernels of (T, HeadBucket): one per generated file (attention_bwd_*.cu).
template <typename T, int HeadBucket>
int launch_attention_bwd_bucket(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream) {
  using Kernel = AttentionBwdKernel<T, HeadBucket>;
  const int64_t* grids[2] = {plan.dkdv_grid, plan.dq_grid};
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t* g = grids[pass];
    if (g[0] == 0 || g[1] == 0 || g[2] == 0) continue;
    emu::launch({unsigned(g[0]), unsigned(g[1]), unsigned(g[2])}, {kAttentionThreads, 1, 1}, plan.shared_bytes,
                [&] { pass == 0 ? Kernel::dkdv(p) : Kernel::dq(p); });
  }
  return 0;
#else
  void (*kernels[2])(AttentionBwdParams) = {attention_bwd_dkdv_kernel<T, HeadBucket>,
                                            attention_bwd_dq_kernel<T, HeadBucket>};
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t* g = grids[pass];
    if (g[0] == 0 || g[1] == 0 || g[2] == 0) continue;
    if (plan.shared_bytes > 48 * 1024) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernels[pass], cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.shared_bytes));
      if (err != cudaSuccess) return int(err);
    }
    // clang-format off
    kernels[pass]<<<dim3(unsigned(g[0]), unsigned(g[1]), unsigned(g[2])), kAttentionThreads, plan.shared_bytes, cuda_stream>>>(p);
    // clang-format on
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return int(err);
  }
  return 0;
#endif
}

}  // namespace bmk::BMK_CUDA_NS
