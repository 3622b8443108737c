// Flash-style CPU attention, forward and backward (specification: bmkernels/reference/attention.py).
//
// Forward: per (batch, head, query block), key blocks stream through an online softmax; the score
// tile lives in per-thread scratch, so memory is O(L) and the Lq x Lk matrix never exists.
// Backward (FlashAttention-2 order): per (batch, kv head), key blocks outer and query blocks inner,
// probabilities recomputed from the saved logsumexp. Tiles are computed transposed (keys x queries)
// so that all three gradient GEMMs read their operands in place, without transposing a tile:
//   S^T = K_j Qs_i^T,  dP^T = V_j dO_i^T,  dV_j += P^T dO_i,  dK_j += dS^T Qs_i,  dQ_i^T += K_j^T dS^T.
// Compiled once per ISA (setup.py), inside namespace bmk::cpu::CPU_CAPABILITY.
#include "cpu/attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/attention_math.h"
#include "common/philox.h"
#include "cpu/gemm.h"

namespace bmk::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kFwdQueryBlock = 64;
constexpr int64_t kFwdKeyBlock = 512;
constexpr int64_t kBwdKeyBlock = 128;
constexpr int64_t kBwdQueryBlock = 256;
// Tile widths are rounded up to a multiple of this, so brgemm sees few distinct shapes.
constexpr int64_t kTileGranule = 32;

template <typename T>
using Vec = at::vec::Vectorized<T>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grain for a parallel_for whose tasks each touch `work` elements: tiny problems run on one thread,
// since waking the pool costs more than the work (and, on a busy machine, a whole time slice).
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1)); }

int64_t tile_width(int64_t needed, int64_t block, int64_t available) {
  return std::min({block, ceil_div(needed, kTileGranule) * kTileGranule, available});
}

template <typename T>
T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// The max of x[0, n), after x <- x * scale in the same pass (none for scale 1). Partial vectors cover
// the last n % width elements (short causal rows would otherwise go scalar).
template <typename T>
T row_max(T* x, int64_t n, T scale) {
  const bool scaled = scale != T(1);
  const Vec<T> scale_vec(scale);
  Vec<T> acc(neg_inf<T>());
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    Vec<T> v = Vec<T>::loadu(x + c);
    if (scaled) {
      v = v * scale_vec;
      v.store(x + c);
    }
    acc = at::vec::maximum(acc, v);
  }
  if (c < n) {
    Vec<T> v = Vec<T>::loadu(x + c, n - c);
    if (scaled) {
      v = v * scale_vec;
      v.store(x + c, n - c);
    }
    acc = at::vec::maximum(acc, Vec<T>::set(Vec<T>(neg_inf<T>()), v, n - c));
  }
  T lanes[Vec<T>::size()];
  acc.store(lanes);
  T best = neg_inf<T>();
  for (int64_t l = 0; l < Vec<T>::size(); ++l) {
    // a NaN score counts as +inf: the callers' std::max keeps it, and its row's softmax is NaN either way
    if (std::isnan(lanes[l])) return std::numeric_limits<T>::infinity();
    best = std::max(best, lanes[l]);
  }
  return best;
}

// exp(x), except NaN stays NaN (exp_u20 clamps its input, turning NaN into a finite value), so that a
// row whose lse is NaN gets P = NaN in backward, as in torch.
template <typename T>
Vec<T> exp_keeping_nan(const Vec<T>& x) {
  return Vec<T>::blendv(x.exp_u20(), x, x.isnan());
}

// p <- exp(x - shift) for x[0, n); returns the sum (of the unrounded values). p is x itself, or bf16
// (the P of a bf16 GEMM: rounded in the same pass). shift = +inf (a +inf or NaN score, see row_max): the
// row's softmax is NaN (inf - inf), so p and the sum are NaN, and with them the row's out and lse.
template <typename T, typename P>
T exp_shift_sum(const T* x, int64_t n, T shift, P* p) {
  if (shift == std::numeric_limits<T>::infinity()) {
    std::fill(p, p + n, P(std::numeric_limits<T>::quiet_NaN()));
    return std::numeric_limits<T>::quiet_NaN();
  }
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> shift_vec(shift), zero(T(0));
  Vec<T> acc(T(0));
  if constexpr (std::is_same_v<P, T>) {
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      const Vec<T> e = (Vec<T>::loadu(x + c) - shift_vec).exp_u20();
      e.store(p + c);
      acc = acc + e;
    }
    if (c < n) {
      const Vec<T> e = (Vec<T>::loadu(x + c, n - c) - shift_vec).exp_u20();
      e.store(p + c, n - c);
      acc = acc + Vec<T>::set(zero, e, n - c);
    }
  } else {  // two float vectors round into one vector of P
    Vec<T> acc1(T(0));
    int64_t c = 0;
    for (; c + 2 * W <= n; c += 2 * W) {
      const Vec<T> e0 = (Vec<T>::loadu(x + c) - shift_vec).exp_u20();
      const Vec<T> e1 = (Vec<T>::loadu(x + c + W) - shift_vec).exp_u20();
      at::vec::convert_from_float<P>(e0, e1).store(p + c);
      acc = acc + e0;
      acc1 = acc1 + e1;
    }
    if (c < n) {  // m1 may be 0: an empty load
      const int64_t m0 = std::min(W, n - c), m1 = n - c - m0;
      const Vec<T> e0 = (Vec<T>::loadu(x + c, m0) - shift_vec).exp_u20();
      const Vec<T> e1 = (Vec<T>::loadu(x + c + W, m1) - shift_vec).exp_u20();
      at::vec::convert_from_float<P>(e0, e1).store(p + c, n - c);
      acc = acc + Vec<T>::set(zero, e0, m0);
      acc1 = acc1 + Vec<T>::set(zero, e1, m1);
    }
    acc = acc + acc1;
  }
  T lanes[W];
  acc.store(lanes);
  T sum = 0;
  for (int64_t l = 0; l < W; ++l) sum += lanes[l];
  return sum;
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  const Vec<T> f(factor);
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) (Vec<T>::loadu(x + c) * f).store(x + c);
  for (; c < n; ++c) x[c] *= factor;
}

// One online-softmax step over a row's next n logits x (-inf where masked), first times scale (1: none):
// p <- exp(x - new max), p being x itself or the bf16 P of the next GEMM; the running max and sum
// updated, and the row's unnormalized output (Dv values) rescaled to the new max.
template <typename T, typename P>
void online_softmax_step(T* x, int64_t n, T scale, T& run_max, T& run_sum, T* out, int64_t Dv, P* p) {
  const T new_max = std::max(run_max, row_max(x, n, scale));
  // a row with nothing visible yet keeps max -inf; shifting by 0 then gives exp(-inf) = 0
  const T shift = new_max == neg_inf<T>() ? T(0) : new_max;
  const T tile_sum = exp_shift_sum(x, n, shift, p);
  const T rescale = std::exp(run_max - shift);
  run_sum = run_sum * rescale + tile_sum;
  run_max = new_max;
  if (rescale != T(1)) scale_row(out, Dv, rescale);
}

// tanh for the softcap in float: x P(x^2) / Q(x^2), P of degree 6 and Q of degree 3 in x^2, fitted by
// tools/fit_tanh.py (minimax relative error on [0, 8]; float tanh is within 4 ulp of +-1 beyond), within
// 5 ulp in float with FMA, no exp and no branch blend (far cheaper than the Taylor/exp pair it
// replaces). double keeps the library tanh (the float64 tolerance is 1e-10).
template <typename T>
Vec<T> fast_tanh(const Vec<T>& x) {
  if constexpr (!std::is_same_v<T, float>) {
    return x.tanh();
  } else {
    const Vec<T> bound(T(8));
    const Vec<T> c = at::vec::minimum(at::vec::maximum(x, -bound), bound), c2 = c * c;
    Vec<T> p(T(-1.156422370e-13));
    for (const T a :
         {T(6.365509508e-11), T(-2.231462659e-08), T(1.164243622e-05), T(3.149364144e-03), T(1.312434971e-01), T(1)}) {
      p = at::vec::fmadd(p, c2, Vec<T>(a));
    }
    Vec<T> q(T(2.612973331e-04));
    for (const T a : {T(2.467499860e-02), T(4.645768106e-01), T(1)}) {
      q = at::vec::fmadd(q, c2, Vec<T>(a));
    }
    return p * c / q;
  }
}

// The optional per-score terms: bias, boolean mask, ALiBi, softcap (bmkernels/reference/attention.py).
template <typename scalar_t, typename acc_t>
struct ScoreTerms {
  const scalar_t* bias = nullptr;  // expanded to (B, Hq, Lq, Lk): strides below
  int64_t bias_stride[4] = {0, 0, 0, 0};
  const bool* mask = nullptr;  // expanded to (B, Hq, Lq, Lk); true = keep
  int64_t mask_stride[4] = {0, 0, 0, 0};
  const acc_t* alibi = nullptr;  // (B, Hq) contiguous
  int64_t heads = 1;
  acc_t softcap = 0;
  int64_t diag_offset = 0;

  bool any() const { return bias || mask || alibi || softcap > 0; }

  // The logits of one line of n scaled scores s[c], c < n, of (b, h, i0 + c * di, j0 + c * dj), in place
  // (-inf where masked): a query row of the forward tile is (di, dj) = (0, 1), a key row of the transposed
  // backward tile (1, 0). softcap_grad, when given, gets d logit / d s. Vectorized; the bias and mask
  // loads follow their strides (a vector load where the line runs along a contiguous dim).
  // mask_kept: the caller knows every mask entry of the line is true (the select is skipped).
  void logits(acc_t* s, int64_t n, int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t di, int64_t dj,
              acc_t* softcap_grad, bool mask_kept = false) const {
    using V = Vec<acc_t>;
    constexpr int64_t W = V::size();
    if (softcap > 0) {
      const V inv(acc_t(1) / softcap), cap(softcap), one(1);
      for (int64_t c = 0; c < n; c += W) {
        const int64_t m = std::min(W, n - c);
        const V t = fast_tanh(V::loadu(s + c, m) * inv);
        (t * cap).store(s + c, m);
        if (softcap_grad) (one - t * t).store(softcap_grad + c, m);
      }
    } else if (softcap_grad) {
      std::fill(softcap_grad, softcap_grad + n, acc_t(1));
    }
    if (bias) {
      const scalar_t* p = bias + b * bias_stride[0] + h * bias_stride[1] + i0 * bias_stride[2] + j0 * bias_stride[3];
      const int64_t step = di * bias_stride[2] + dj * bias_stride[3];
      if (step == 0) {
        const V add(static_cast<acc_t>(*p));
        for (int64_t c = 0; c < n; c += W) (V::loadu(s + c, std::min(W, n - c)) + add).store(s + c, std::min(W, n - c));
      } else if (step == 1 && std::is_same_v<scalar_t, acc_t>) {
        for (int64_t c = 0; c < n; c += W) {
          const int64_t m = std::min(W, n - c);
          (V::loadu(s + c, m) + V::loadu(reinterpret_cast<const acc_t*>(p) + c, m)).store(s + c, m);
        }
      } else {
        for (int64_t c = 0; c < n; ++c) s[c] += static_cast<acc_t>(p[c * step]);
      }
    }
    if (alibi) {
      // |i' - j| along the line: i' - j = (i0 + diag_offset - j0) + c * (di - dj)
      const acc_t slope = alibi[b * heads + h];
      const acc_t delta = static_cast<acc_t>(di - dj);
      const acc_t start = static_cast<acc_t>(i0 + diag_offset - j0);
      const V slope_v(slope);
      for (int64_t c = 0; c < n; c += W) {
        const int64_t m = std::min(W, n - c);
        const V distance = V::arange(start + delta * static_cast<acc_t>(c), delta).abs();
        (V::loadu(s + c, m) - slope_v * distance).store(s + c, m);
      }
    }
    if (mask && !mask_kept) {
      const bool* p = mask + b * mask_stride[0] + h * mask_stride[1] + i0 * mask_stride[2] + j0 * mask_stride[3];
      const int64_t step = di * mask_stride[2] + dj * mask_stride[3];
      for (int64_t c = 0; c < n; ++c) s[c] = p[c * step] ? s[c] : neg_inf<acc_t>();
    }
  }
};

// Where a boolean mask keeps anything, per block: for each (batch, head) of the mask's own extent (1 where
// it broadcasts, so a mask shared by every head is analysed once) and each block of `block` query rows
// (by_query_blocks) or key columns, the hull [begin, end) of kept keys (resp. queries). The kernels
// visit only the tiles inside a hull, so a document or banded mask skips its fully masked tiles.
struct MaskHulls {
  std::vector<int64_t> begin, end;  // empty: no mask
  std::vector<uint8_t> kept;        // whether every entry of the block is kept (the mask select can go)
  int64_t heads = 1, blocks = 0;
  bool per_batch = false, per_head = false;

  template <typename scalar_t, typename acc_t>
  static MaskHulls of(const ScoreTerms<scalar_t, acc_t>& t, int64_t batch, int64_t q_heads, int64_t q_len,
                      int64_t k_len, int64_t block, bool by_query_blocks) {
    MaskHulls hulls;
    if (!t.mask) return hulls;
    hulls.per_batch = t.mask_stride[0] != 0 && batch > 1;
    hulls.per_head = t.mask_stride[1] != 0 && q_heads > 1;
    const int64_t nb = hulls.per_batch ? batch : 1;
    hulls.heads = hulls.per_head ? q_heads : 1;
    const int64_t along = by_query_blocks ? q_len : k_len, across = by_query_blocks ? k_len : q_len;
    hulls.blocks = (along + block - 1) / block;
    const int64_t n = nb * hulls.heads * hulls.blocks;
    hulls.begin.assign(n, across);
    hulls.end.assign(n, 0);
    hulls.kept.assign(n, 0);
    // element (line x, position y) of the mask: a query row x and key y, or a key column x and query y
    const int64_t line_stride = by_query_blocks ? t.mask_stride[2] : t.mask_stride[3];
    const int64_t pos_stride = by_query_blocks ? t.mask_stride[3] : t.mask_stride[2];
    at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
      for (int64_t e = first; e < last; ++e) {
        const int64_t bh = e / hulls.blocks, blk = e % hulls.blocks;
        const bool* m = t.mask + (bh / hulls.heads) * t.mask_stride[0] + (bh % hulls.heads) * t.mask_stride[1];
        int64_t lo = across, hi = 0;
        bool all_kept = true;
        for (int64_t x = blk * block; x < std::min(along, (blk + 1) * block); ++x) {
          const bool* line = m + x * line_stride;
          if (all_kept && pos_stride == 1) {  // a vectorized search for a masked (zero) byte
            all_kept = std::memchr(line, 0, across) == nullptr;
          } else if (all_kept) {  // stops at the first masked entry: a mixed block costs little here
            for (int64_t y = 0; y < across && all_kept; ++y) all_kept = line[y * pos_stride];
          }
          int64_t z = across;  // a kept position at or past hi: the hull grows to z
          while (z > hi && !line[(z - 1) * pos_stride]) --z;
          hi = std::max(hi, z);
          int64_t y = 0;  // a kept position before lo: the hull grows to y
          while (y < lo && !line[y * pos_stride]) ++y;
          lo = std::min(lo, y);
        }
        hulls.begin[e] = lo;
        hulls.end[e] = std::max(lo, hi);
        hulls.kept[e] = all_kept;
      }
    });
    return hulls;
  }

  bool all_kept(int64_t b, int64_t h, int64_t blk) const {
    return !kept.empty() && kept[((per_batch ? b : 0) * heads + (per_head ? h : 0)) * blocks + blk];
  }

  // [begin, end) of the block `blk` for batch b, head h, intersected with [lo, hi).
  std::pair<int64_t, int64_t> clip(int64_t b, int64_t h, int64_t blk, int64_t lo, int64_t hi) const {
    if (begin.empty()) return {lo, hi};
    const int64_t e = ((per_batch ? b : 0) * heads + (per_head ? h : 0)) * blocks + blk;
    const int64_t first = std::max(lo, begin[e]);
    return {first, std::max(first, std::min(hi, end[e]))};
  }
};

struct Shapes {
  int64_t batch, q_heads, kv_heads, q_len, k_len, head_dim, v_head_dim;
  int64_t q_ld = 0, k_ld = 0;  // row strides of the transposed (D x L) operands, see padded_ld
};

// Row stride for an operand stored transposed as (D x L): a multiple of 16 elements that is not a
// multiple of 256, since power-of-two strides map a tile's rows onto the same cache sets.
int64_t padded_ld(int64_t len) {
  const int64_t ld = std::max<int64_t>(ceil_div(len, 16) * 16, 16);
  return ld % 256 == 0 ? ld + 16 : ld;
}

// n elements of x as acc_t, times mul.
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* x, int64_t n, acc_t mul, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(x[i]) * mul;
}

// rows x cols of x (row stride ldx) as acc_t times mul, packed densely (row stride cols).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* x, int64_t rows, int64_t cols, int64_t ldx, acc_t mul, acc_t* out) {
  if (ldx == cols) return pack_rows(x, rows * cols, mul, out);
  for (int64_t r = 0; r < rows; ++r) pack_rows(x + r * ldx, cols, mul, out + r * cols);
}

// x (rows x D, row stride ldx) as acc_t times mul, stored transposed: out[d * ld + j] = x[j * ldx + d] *
// mul. Columns past `rows` are never read. Blocks of 16 rows keep the strided reads in L1.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* x, int64_t rows, int64_t D, int64_t ldx, int64_t ld, acc_t mul, acc_t* out) {
  constexpr int64_t kRows = 16;
  for (int64_t j0 = 0; j0 < rows; j0 += kRows) {
    const int64_t j1 = std::min(rows, j0 + kRows);
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = j0; j < j1; ++j) out[d * ld + j] = static_cast<acc_t>(x[j * ldx + d]) * mul;
    }
  }
}

// bf16 rows (rows x D, row stride ldx) packed densely with row stride De = D rounded up to even, the
// pad column zero (tile_gemm_bf16 multiplies pairs along K).
void pack_rows_even(const at::BFloat16* x, int64_t rows, int64_t D, int64_t ldx, at::BFloat16* out) {
  const int64_t De = D + D % 2;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(x + r * ldx, x + r * ldx + D, out + r * De);
    if (De > D) out[r * De + D] = at::BFloat16(0.f);
  }
}

// Keys (n x D, row stride ldx) as B = K^T in the VNNI pairs tile_gemm_bf16 reads: element (d, j) at
// out[(d / 2) * 2 * ld + 2 * j + d % 2], for d below D rounded up to even (the pad is zero). A pair
// (d, d + 1) of one key is 32 contiguous bits of its row, so this is a transpose of 32-bit words.
void pack_keys_vnni(const at::BFloat16* x, int64_t n, int64_t D, int64_t ldx, int64_t ld, at::BFloat16* out) {
  constexpr int64_t kRows = 16;  // blocks of rows keep the strided reads in L1
  const int64_t full = D / 2;
  for (int64_t j0 = 0; j0 < n; j0 += kRows) {
    const int64_t j1 = std::min(n, j0 + kRows);
    for (int64_t p = 0; p < full; ++p) {
      for (int64_t j = j0; j < j1; ++j) std::memcpy(out + 2 * (p * ld + j), x + j * ldx + 2 * p, 4);
    }
    if (D % 2) {
      for (int64_t j = j0; j < j1; ++j) {
        out[2 * (full * ld + j)] = x[j * ldx + D - 1];
        out[2 * (full * ld + j) + 1] = at::BFloat16(0.f);
      }
    }
  }
}

// Values (n x Dv, row stride ldx) as B in VNNI pairs: element (j, d) at out[(j / 2) * 2 * Dv + 2 * d + j % 2],
// rows interleaved two by two; an odd n gets a zero row n.
void pack_values_vnni(const at::BFloat16* x, int64_t n, int64_t Dv, int64_t ldx, at::BFloat16* out) {
  const auto* src = reinterpret_cast<const uint16_t*>(x);
  auto* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* r0 = src + j * ldx;
    uint16_t* o = dst + j * Dv;
    if (j + 1 < n) {
      const uint16_t* r1 = r0 + ldx;
      for (int64_t d = 0; d < Dv; ++d) {
        o[2 * d] = r0[d];
        o[2 * d + 1] = r1[d];
      }
    } else {
      for (int64_t d = 0; d < Dv; ++d) {
        o[2 * d] = r0[d];
        o[2 * d + 1] = 0;
      }
    }
  }
}

struct Dropout {
  uint64_t seed = 0;
  double p = 0;  // the keep test compares in float (as Triton does); the 1/(1-p) scale uses the double
  bool on() const { return p > 0; }
  bool keep(uint64_t counter) const { return dropout_keep(seed, counter, static_cast<float>(p)); }
  // m[c] = scale if the score of counter first + c * stride is kept, else 0 (c < n). Branch-free, so that
  // the compiler vectorizes the Philox rounds across c (a scalar draw per score cost more than the GEMMs).
  template <typename acc_t>
  void multipliers(uint64_t first, uint64_t stride, int64_t n, acc_t scale, acc_t* m) const {
    const float threshold = static_cast<float>(p);
    for (int64_t c = 0; c < n; ++c) {
      m[c] = uniform_from_bits(philox_first_word(seed, first + static_cast<uint64_t>(c) * stride)) >= threshold
                 ? scale
                 : acc_t(0);
    }
  }
};

// Runs thread_body(next_task) on each worker thread; next_task() hands out task indices 0 .. tasks - 1,
// one at a time from a shared counter, then -1. Task costs differ (causal rows, padding, windows), and a
// static split into one contiguous range per thread would leave threads idle.
template <typename ThreadBody>
void run_tasks(int64_t tasks, const ThreadBody& thread_body) {
  std::atomic<int64_t> next{0};
  const auto next_task = [&]() -> int64_t {
    const int64_t task = next.fetch_add(1, std::memory_order_relaxed);
    return task < tasks ? task : -1;
  };
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { thread_body(next_task); });
}

// One independent problem inside the op's tensors: batch `batch`'s query rows [q0, q0 + q_len) attend to
// its key rows [k0, k0 + k_len) through `win` (positions local to the segment). A batched call has one
// segment per batch (q0 = k0 = 0); packed sequences (segments) one per sequence of batch 0. terms_batch
// indexes the score terms (the batch, or the sequence for per-sequence ALiBi slopes).
struct Segment {
  int64_t batch, terms_batch, q0, q_len, k0, k_len;
  AttentionWindow win;
};

// Where an operand (B, H, L, D) with a contiguous last dim keeps its rows: element (b, h, i, d) is at
// b * batch + h * head + i * row + d. The forward reads q, k, v and writes out through these, so the
// usual projection layout (B, L, H, D) viewed as (B, H, L, D) needs no copy.
struct RowLayout {
  int64_t batch = 0, head = 0, row = 0;
  int64_t at(int64_t b, int64_t h, int64_t i = 0) const { return b * batch + h * head + i * row; }
};

RowLayout row_layout(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// t itself when its last dim is contiguous (the kernels read rows through RowLayout), else a copy.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

struct ForwardLayouts {
  RowLayout q, k, v, out;
};

template <typename scalar_t, typename acc_t>
void forward_kernel(const Shapes& sh, const ForwardLayouts& lay, const scalar_t* q, acc_t scale, const scalar_t* k,
                    const scalar_t* v, const ScoreTerms<scalar_t, acc_t>& terms, const std::vector<Segment>& segs,
                    const Dropout& drop, scalar_t* out, acc_t* lse) {
  const int64_t D = sh.head_dim, Dv = sh.v_head_dim;
  const int64_t group = sh.q_heads / sh.kv_heads;
  const acc_t keep_scale = drop.on() ? acc_t(1) / (acc_t(1) - acc_t(drop.p)) : acc_t(1);
  int64_t max_k = 0;
  // Tasks (segment, head, query block), segment by segment: first_task[s] is segment s's first.
  std::vector<int64_t> first_task(segs.size() + 1, 0);
  for (size_t s = 0; s < segs.size(); ++s) {
    max_k = std::max(max_k, segs[s].k_len);
    first_task[s + 1] = first_task[s] + sh.q_heads * ceil_div(segs[s].q_len, kFwdQueryBlock);
  }
  const int64_t k_ld = padded_ld(max_k);
  // Short keys need a smaller score tile: a 128 KiB scratch is mmap'ed (and page-faulted) per call.
  const int64_t key_block = tile_width(max_k, kFwdKeyBlock, kFwdKeyBlock);
  const MaskHulls hulls = MaskHulls::of(terms, sh.batch, sh.q_heads, sh.q_len, sh.k_len, kFwdQueryBlock, true);
  // bf16 GEMMs on bf16 tiles (Q and K as given, P rounded to bf16 as FlashAttention does) where they
  // are faster; else every tile in acc_t. The bf16 GEMMs multiply pairs along K: De is D rounded up to
  // even, and K and V are packed in VNNI pairs (zero pads).
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  const bool lowp = kBf16 && native_bf16_gemm();
  const int64_t De = D + D % 2;
  // without dropout, the bf16 path rounds P in its exp pass (dropout multiplies the fp32 P first)
  const bool direct_p = lowp && !drop.on();
  run_tasks(first_task.back(), [&](const auto& next_task) {
    std::vector<acc_t> scores(kFwdQueryBlock * key_block), acc_out(kFwdQueryBlock * std::max<int64_t>(Dv, 1));
    std::vector<acc_t> run_max(kFwdQueryBlock), run_sum(kFwdQueryBlock), q_tile(lowp ? 0 : kFwdQueryBlock * D);
    std::vector<acc_t> keep_row(drop.on() ? key_block : 0);  // dropout multipliers of one score row
    // This thread's copy of its current kv head: K transposed (D x k_ld) and, for reduced precision,
    // V in acc_t. Tasks run head by head, so each head is packed about once per thread, in cache,
    // with no full-size temporary and no extra parallel region.
    std::vector<acc_t> kt_head(lowp ? 0 : D * k_ld), v_acc(std::is_same_v<scalar_t, acc_t> || lowp ? 0 : max_k * Dv);
    // the bf16 path's tiles: Q, P, and the head's K^T and V in VNNI pairs
    std::vector<scalar_t> q_lp(lowp ? kFwdQueryBlock * De : 0), kt_lp(lowp ? De * k_ld : 0);
    std::vector<scalar_t> v_lp(lowp ? (max_k + 1) * Dv : 0), p_lp(lowp ? kFwdQueryBlock * key_block : 0);
    int64_t packed_head = -1;  // segment * kv_heads + kv head
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t s = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const Segment& seg = segs[s];
      const int64_t q_blocks = ceil_div(seg.q_len, kFwdQueryBlock), local = task - first_task[s];
      const int64_t b = seg.batch, h = local / q_blocks, hk = h / group, bh = b * sh.q_heads + h;
      const int64_t i0 = (local % q_blocks) * kFwdQueryBlock, rows = std::min(kFwdQueryBlock, seg.q_len - i0);
      const int64_t Lk = seg.k_len;
      const AttentionWindow& win = seg.win;  // padding keys: whole blocks skipped
      ScoreTerms<scalar_t, acc_t> seg_terms = terms;
      seg_terms.diag_offset = win.diag_offset;
      if constexpr (kBf16) {
        if (lowp)  // Q unscaled (no second rounding); its scores are scaled in fp32 below
          pack_rows_even(q + lay.q.at(b, h, seg.q0 + i0), rows, D, lay.q.row, q_lp.data());
      }
      if (!lowp) {
        pack_rows(q + lay.q.at(b, h, seg.q0 + i0), rows, D, lay.q.row, scale, q_tile.data());  // scaled once
      }
      if (s * sh.kv_heads + hk != packed_head) {
        if constexpr (kBf16) {
          if (lowp) {
            pack_keys_vnni(k + lay.k.at(b, hk, seg.k0), Lk, D, lay.k.row, k_ld, kt_lp.data());
            pack_values_vnni(v + lay.v.at(b, hk, seg.k0), Lk, Dv, lay.v.row, v_lp.data());
          }
        }
        if (!lowp) pack_transposed(k + lay.k.at(b, hk, seg.k0), Lk, D, lay.k.row, k_ld, acc_t(1), kt_head.data());
        if (!v_acc.empty()) pack_rows(v + lay.v.at(b, hk, seg.k0), Lk, Dv, lay.v.row, acc_t(1), v_acc.data());
        packed_head = s * sh.kv_heads + hk;
      }
      const acc_t* v_head = nullptr;
      int64_t v_ld = lay.v.row;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        v_head = v + lay.v.at(b, hk, seg.k0);
        v_ld = lay.v.row;
      } else if (!lowp) {
        v_head = v_acc.data();
        v_ld = Dv;
      }
      std::fill(acc_out.begin(), acc_out.begin() + rows * Dv, acc_t(0));
      std::fill(run_max.begin(), run_max.end(), neg_inf<acc_t>());
      std::fill(run_sum.begin(), run_sum.end(), acc_t(0));
      // masks exist only for batched calls, where segment rows are the batch's rows (q0 = 0)
      const auto [hull_begin, kv_end] =
          hulls.clip(b, h, i0 / kFwdQueryBlock, win.first_key(i0), win.end_key(i0 + rows - 1));
      const int64_t kv_begin = hull_begin / kTileGranule * kTileGranule;
      const bool mask_kept = hulls.all_kept(b, h, i0 / kFwdQueryBlock);
      for (int64_t j0 = kv_begin; j0 < kv_end; j0 += key_block) {
        const int64_t cols = tile_width(kv_end - j0, key_block, Lk - j0);
        // the bf16 P.V multiplies pairs of keys: an odd tail tile gets a zero column of P (against V's
        // zero pad row)
        const int64_t cols_even = cols + cols % 2;
        if constexpr (kBf16) {
          if (lowp)
            tile_gemm_bf16(rows, cols, De, q_lp.data(), De, kt_lp.data() + 2 * j0, k_ld, scores.data(), key_block,
                           false);
        }
        if (!lowp)
          tile_gemm(rows, cols, D, q_tile.data(), D, kt_head.data() + j0, k_ld, scores.data(), key_block, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          acc_t* row = scores.data() + r * key_block;
          const int64_t lo = std::clamp<int64_t>(win.first_key(i) - j0, 0, cols);
          const int64_t hi = std::clamp<int64_t>(win.end_key(i) - j0, lo, cols);
          std::fill(row, row + lo, acc_t(0));
          std::fill(row + hi, row + cols, acc_t(0));
          if constexpr (kBf16) {
            if (direct_p) {  // P's zeros, the pad column of an odd tail tile included (K even, see below)
              std::fill(p_lp.data() + r * key_block, p_lp.data() + r * key_block + lo, scalar_t(0.f));
              std::fill(p_lp.data() + r * key_block + hi, p_lp.data() + r * key_block + cols_even, scalar_t(0.f));
            }
          }
          if (lo == hi) continue;
          // the bf16 path scales its scores here: with the max, unless score terms need them scaled first
          acc_t row_scale = lowp ? scale : acc_t(1);
          if (lowp && terms.any()) {
            scale_row(row + lo, hi - lo, scale);
            row_scale = acc_t(1);
          }
          if (terms.any())
            seg_terms.logits(row + lo, hi - lo, seg.terms_batch, h, i, j0 + lo, 0, 1, nullptr, mask_kept);
          acc_t* out_row = acc_out.data() + r * Dv;
          if constexpr (kBf16) {
            if (direct_p) {
              online_softmax_step(row + lo, hi - lo, row_scale, run_max[r], run_sum[r], out_row, Dv,
                                  p_lp.data() + r * key_block + lo);
              continue;
            }
          }
          online_softmax_step(row + lo, hi - lo, row_scale, run_max[r], run_sum[r], out_row, Dv, row + lo);
          if (drop.on()) {
            const uint64_t first = dropout_counter(bh, seg.q0 + i, seg.k0 + j0 + lo, sh.q_len, sh.k_len);
            drop.multipliers(first, 1, hi - lo, keep_scale, keep_row.data());
            for (int64_t c = lo; c < hi; ++c) row[c] *= keep_row[c - lo];
          }
        }
        if constexpr (kBf16) {
          if (lowp) {
            if (!direct_p) {
              for (int64_t r = 0; r < rows; ++r) {
                at::vec::convert(scores.data() + r * key_block, p_lp.data() + r * key_block, cols);
                if (cols_even > cols) p_lp[r * key_block + cols] = scalar_t(0.f);
              }
            }
            // j0 is even (a multiple of kTileGranule): its pair row of V starts at j0 * Dv
            tile_gemm_bf16(rows, Dv, cols_even, p_lp.data(), key_block, v_lp.data() + j0 * Dv, Dv, acc_out.data(), Dv,
                           true);
          }
        }
        if (!lowp)
          tile_gemm(rows, Dv, cols, scores.data(), key_block, v_head + j0 * v_ld, v_ld, acc_out.data(), Dv, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* out_row = out + lay.out.at(b, h, seg.q0 + i0 + r);
        const acc_t* acc_row = acc_out.data() + r * Dv;
        acc_t* lse_row = lse + bh * sh.q_len + seg.q0 + i0 + r;
        if (run_sum[r] == acc_t(0)) {  // no visible key: zeros, lse = log(0)
          std::fill(out_row, out_row + Dv, scalar_t(0));
          *lse_row = neg_inf<acc_t>();
          continue;
        }
        const acc_t inv = acc_t(1) / run_sum[r];
        for (int64_t d = 0; d < Dv; ++d) out_row[d] = static_cast<scalar_t>(acc_row[d] * inv);
        *lse_row = run_max[r] + std::log(run_sum[r]);
      }
    }
    tile_gemm_done();
    if (lowp) tile_gemm_bf16_done();
  });
}

// One transposed backward row (key j, queries lo .. hi), vectorized: from the logits in p_row (-inf where
// masked) and dP in ds_row, P = exp(logit - lse) -> dropped P (into p_row) and dS = P (dP dropped - delta)
// (into ds_row, times softcap_grad when given; the bias gradient, dS itself, into dbias when given).
// Dropout multipliers (keep_scale or 0) go through `keep` (counters first, first + stride, ...). A query
// that sees no key has lse = -inf: callers pass +inf there (exp(-inf - inf) = 0, not NaN).
template <typename acc_t>
void scores_to_grads(acc_t* p_row, acc_t* ds_row, const acc_t* lse, const acc_t* delta, int64_t lo, int64_t hi,
                     const Dropout& drop, acc_t keep_scale, uint64_t first, uint64_t stride, acc_t* keep,
                     const acc_t* softcap_grad, acc_t* dbias) {
  if (drop.on()) drop.multipliers(first, stride, hi - lo, keep_scale, keep);
  for (int64_t c = lo; c < hi; c += Vec<acc_t>::size()) {
    const int64_t n = std::min<int64_t>(Vec<acc_t>::size(), hi - c);
    const Vec<acc_t> p = exp_keeping_nan(Vec<acc_t>::loadu(p_row + c, n) - Vec<acc_t>::loadu(lse + c, n));
    Vec<acc_t> dp = Vec<acc_t>::loadu(ds_row + c, n), p_dropped = p;
    if (drop.on()) {
      const Vec<acc_t> m = Vec<acc_t>::loadu(keep + (c - lo), n);
      dp = dp * m;
      p_dropped = p * m;
    }
    p_dropped.store(p_row + c, n);
    Vec<acc_t> ds = p * (dp - Vec<acc_t>::loadu(delta + c, n));
    if (dbias) ds.store(dbias + c, n);
    if (softcap_grad) ds = ds * Vec<acc_t>::loadu(softcap_grad + c, n);
    ds.store(ds_row + c, n);
  }
}

// Operands of the backward kernel, all acc_t and contiguous.
template <typename acc_t>
struct BackwardOperands {
  const acc_t* qs;      // (B, Hq, Lq, D), pre-scaled
  const acc_t* qs_t;    // (B, Hq, D, q_ld)
  const acc_t* k;       // (B, Hkv, Lk, D)
  const acc_t* k_t;     // (B, Hkv, D, k_ld)
  const acc_t* v;       // (B, Hkv, Lk, Dv)
  const acc_t* dout;    // (B, Hq, Lq, Dv)
  const acc_t* dout_t;  // (B, Hq, Dv, q_ld)
  const acc_t* delta;   // (B, Hq, Lq): rowsum(dout * out)
  const acc_t* lse;     // (B, Hq, Lq)
  acc_t* dq_t;          // (splits, B, Hq, D, q_ld), zero-initialised, unscaled partial sums
  acc_t* dk;            // (B, Hkv, Lk, D)
  acc_t* dv;            // (B, Hkv, Lk, Dv)
  acc_t* dbias;         // (B, Hq, Lq, Lk), zero-initialised, or null
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const Shapes& sh, const BackwardOperands<acc_t>& op, const ScoreTerms<scalar_t, acc_t>& terms,
                     const std::vector<Segment>& segs, const Dropout& drop, int64_t splits) {
  const int64_t Lq = sh.q_len, Lk = sh.k_len, D = sh.head_dim, Dv = sh.v_head_dim;
  const int64_t group = sh.q_heads / sh.kv_heads;
  const acc_t keep_scale = drop.on() ? acc_t(1) / (acc_t(1) - acc_t(drop.p)) : acc_t(1);
  const bool plain = !terms.any();  // every visible score is finite: the vectorized path
  int64_t max_q = 0;
  for (const Segment& seg : segs) max_q = std::max(max_q, seg.q_len);
  // Short queries need a narrower tile (a 128 KiB scratch is mmap'ed and page-faulted per call).
  constexpr int64_t BK = kBwdKeyBlock;
  const int64_t BQ = tile_width(max_q, kBwdQueryBlock, kBwdQueryBlock);
  // A task owns one kv head of one segment and every split-th key block of it, so dK/dV (summed over the
  // head's query group) need no reduction; dQ gets one partial buffer per split, summed by the caller.
  const int64_t dq_size = sh.batch * sh.q_heads * D * sh.q_ld;
  const MaskHulls hulls = MaskHulls::of(terms, sh.batch, sh.q_heads, Lq, Lk, BK, false);
  run_tasks(static_cast<int64_t>(segs.size()) * sh.kv_heads * splits, [&](const auto& next_task) {
    std::vector<acc_t> p_t(BK * BQ), ds_t(BK * BQ), keep_row(drop.on() ? BQ : 0);
    // with score terms: the tile's lse with +inf for empty rows, a row's softcap derivative and dS
    std::vector<acc_t> lse_safe(plain ? 0 : BQ), grad_row(terms.softcap > 0 ? BQ : 0), dbias_row(op.dbias ? BQ : 0);
    std::vector<acc_t> dk_acc(BK * std::max<int64_t>(D, 1)), dv_acc(BK * std::max<int64_t>(Dv, 1));
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t seg_head = task / splits, split = task % splits;
      const Segment& seg = segs[seg_head / sh.kv_heads];
      const int64_t b = seg.batch, hk = seg_head % sh.kv_heads, kv_head = b * sh.kv_heads + hk;
      const AttentionWindow& win = seg.win;
      ScoreTerms<scalar_t, acc_t> seg_terms = terms;
      seg_terms.diag_offset = win.diag_offset;
      // the segment's rows: key j (local) is row seg.k0 + j of its head, query i row seg.q0 + i
      const acc_t* k_head = op.k + (kv_head * Lk + seg.k0) * D;
      const acc_t* kt_head = op.k_t + kv_head * D * sh.k_ld + seg.k0;
      const acc_t* v_head = op.v + (kv_head * Lk + seg.k0) * Dv;
      acc_t* dq_t = op.dq_t + split * dq_size;
      // interleaved key blocks balance causal work, where late keys meet fewer queries
      for (int64_t block = split; block < ceil_div(seg.k_len, BK); block += splits) {
        const int64_t j0 = block * BK;
        const int64_t kc = std::min(BK, seg.k_len - j0);
        std::fill(dk_acc.begin(), dk_acc.begin() + kc * D, acc_t(0));
        std::fill(dv_acc.begin(), dv_acc.begin() + kc * Dv, acc_t(0));
        // padding keys (outside the key range) see no query: dK = dV = 0 there
        const int64_t j_first = std::max(j0, win.key_begin), j_end = std::min(j0 + kc, win.key_end);
        const int64_t band_begin = j_first < j_end ? win.first_query(j_first) : 0;
        const int64_t band_end = j_first < j_end ? win.end_query(j_end - 1) : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t bh = b * sh.q_heads + h;
          const int64_t row0 = bh * Lq + seg.q0;  // the segment's first query row of this head
          const acc_t* lse = op.lse + row0;
          const acc_t* delta = op.delta + row0;
          const acc_t* qs_t = op.qs_t + bh * D * sh.q_ld + seg.q0;
          const acc_t* dout_t = op.dout_t + bh * Dv * sh.q_ld + seg.q0;
          // masks exist only for batched calls, where segment rows are the batch's rows (k0 = 0)
          const auto [hull_begin, q_end] = hulls.clip(b, h, block, band_begin, band_end);
          const bool mask_kept = hulls.all_kept(b, h, block);
          const int64_t q_begin = hull_begin / kTileGranule * kTileGranule;
          for (int64_t i0 = q_begin; i0 < q_end; i0 += BQ) {
            const int64_t qc = tile_width(q_end - i0, BQ, seg.q_len - i0);
            tile_gemm(kc, qc, D, k_head + j0 * D, D, qs_t + i0, sh.q_ld, p_t.data(), BQ, false);
            tile_gemm(kc, qc, Dv, v_head + j0 * Dv, Dv, dout_t + i0, sh.q_ld, ds_t.data(), BQ, false);
            if (!plain) {
              for (int64_t c = 0; c < qc; ++c) {
                lse_safe[c] = lse[i0 + c] == neg_inf<acc_t>() ? std::numeric_limits<acc_t>::infinity() : lse[i0 + c];
              }
            }
            for (int64_t r = 0; r < kc; ++r) {
              const int64_t j = j0 + r;
              acc_t* p_row = p_t.data() + r * BQ;    // scores in, probabilities (after dropout) out
              acc_t* ds_row = ds_t.data() + r * BQ;  // dP in, dS out
              const int64_t lo = win.key_in_range(j) ? std::clamp<int64_t>(win.first_query(j) - i0, 0, qc) : qc;
              const int64_t hi = std::clamp<int64_t>(win.end_query(j) - i0, lo, qc);
              std::fill(p_row, p_row + lo, acc_t(0));
              std::fill(p_row + hi, p_row + qc, acc_t(0));
              std::fill(ds_row, ds_row + lo, acc_t(0));
              std::fill(ds_row + hi, ds_row + qc, acc_t(0));
              const uint64_t first_counter = dropout_counter(bh, seg.q0 + i0 + lo, seg.k0 + j, Lq, Lk);
              if (plain) {
                scores_to_grads<acc_t>(p_row, ds_row, lse + i0, delta + i0, lo, hi, drop, keep_scale, first_counter, Lk,
                                       keep_row.data(), nullptr, nullptr);
                continue;
              }
              acc_t* grad = grad_row.empty() ? nullptr : grad_row.data();
              seg_terms.logits(p_row + lo, hi - lo, seg.terms_batch, h, i0 + lo, j, 1, 0, grad ? grad + lo : nullptr,
                               mask_kept);
              scores_to_grads<acc_t>(p_row, ds_row, lse_safe.data(), delta + i0, lo, hi, drop, keep_scale,
                                     first_counter, Lk, keep_row.data(), grad, op.dbias ? dbias_row.data() : nullptr);
              if (op.dbias) {
                for (int64_t c = lo; c < hi; ++c) op.dbias[(bh * Lq + i0 + c) * Lk + j] = dbias_row[c];
              }
            }
            tile_gemm(kc, Dv, qc, p_t.data(), BQ, op.dout + (row0 + i0) * Dv, Dv, dv_acc.data(), Dv, true);
            tile_gemm(kc, D, qc, ds_t.data(), BQ, op.qs + (row0 + i0) * D, D, dk_acc.data(), D, true);
            tile_gemm(D, qc, kc, kt_head + j0, sh.k_ld, ds_t.data(), BQ, dq_t + bh * D * sh.q_ld + seg.q0 + i0, sh.q_ld,
                      true);
          }
        }
        std::copy(dk_acc.begin(), dk_acc.begin() + kc * D, op.dk + (kv_head * Lk + seg.k0 + j0) * D);
        std::copy(dv_acc.begin(), dv_acc.begin() + kc * Dv, op.dv + (kv_head * Lk + seg.k0 + j0) * Dv);
      }
    }
    tile_gemm_done();
  });
}

// key_range (B, 2) int64 on the CPU, rows [begin, end) with 0 <= begin <= end <= Lk: the kernels
// index keys by it, so every row is checked (O(B)).
void check_key_range(const at::Tensor& key_range, const Shapes& sh) {
  TORCH_CHECK(key_range.scalar_type() == at::kLong && key_range.device().is_cpu() && key_range.dim() == 2 &&
                  key_range.size(0) == sh.batch && key_range.size(1) == 2,
              "bmkernels attention: key_range must be a CPU int64 tensor of shape (B, 2) = (", sh.batch, ", 2); got ",
              key_range.scalar_type(), " ", key_range.sizes(), " on ", key_range.device());
  const at::Tensor r = key_range.contiguous();
  const int64_t* p = r.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < sh.batch; ++b) {
    TORCH_CHECK(0 <= p[2 * b] && p[2 * b] <= p[2 * b + 1] && p[2 * b + 1] <= sh.k_len,
                "bmkernels attention: key_range rows must be [begin, end) with 0 <= begin <= end <= Lk = ", sh.k_len,
                "; row ", b, " is [", p[2 * b], ", ", p[2 * b + 1], ")");
  }
}

// segments (S + 1, 2) int64 on the CPU: row s = (first query row, first key row) of packed sequence s of
// batch 0, row S = (Lq, Lk); both columns non-decreasing from (0, 0). The kernels index rows by it, so
// every row is checked (O(S)). Per-score terms that index the batch (bias, mask, key_range) do not apply.
void check_segments(const at::Tensor& segments, const Shapes& sh, bool has_bias, bool has_mask, bool has_key_range) {
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.device().is_cpu() && segments.dim() == 2 &&
                  segments.size(0) >= 1 && segments.size(1) == 2,
              "bmkernels attention: segments must be a CPU int64 tensor of shape (S + 1, 2); got ",
              segments.scalar_type(), " ", segments.sizes(), " on ", segments.device());
  TORCH_CHECK(sh.batch == 1, "bmkernels attention: packed sequences (segments) need batch 1; got q of batch ",
              sh.batch);
  TORCH_CHECK(!has_bias && !has_mask && !has_key_range,
              "bmkernels attention: segments do not combine with bias, mask or key_range");
  const at::Tensor c = segments.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t rows = segments.size(0);
  TORCH_CHECK(p[0] == 0 && p[1] == 0 && p[2 * (rows - 1)] == sh.q_len && p[2 * (rows - 1) + 1] == sh.k_len,
              "bmkernels attention: segments must start at (0, 0) and end at (Lq, Lk) = (", sh.q_len, ", ", sh.k_len,
              "); got (", p[0], ", ", p[1], ") ... (", p[2 * (rows - 1)], ", ", p[2 * (rows - 1) + 1], ")");
  for (int64_t r = 1; r < rows; ++r) {
    TORCH_CHECK(p[2 * r] >= p[2 * r - 2] && p[2 * r + 1] >= p[2 * r - 1],
                "bmkernels attention: segments must be non-decreasing (cumulative lengths); row ", r, " is (", p[2 * r],
                ", ", p[2 * r + 1], ") after (", p[2 * r - 2], ", ", p[2 * r - 1], ")");
  }
}

// t must broadcast to the (B, Hq, Lq, Lk) score grid: the kernels index it through expand()'s strides.
void check_broadcasts(const char* name, const at::Tensor& t, const std::vector<int64_t>& grid) {
  bool ok = t.dim() <= 4;
  for (int64_t d = 1; ok && d <= t.dim(); ++d) {
    const int64_t size = t.size(t.dim() - d), want = grid[4 - d];
    ok = size == want || size == 1;
  }
  TORCH_CHECK(ok, "bmkernels attention: ", name, " of shape ", t.sizes(),
              " cannot broadcast to the score grid (B, Hq, ", "Lq, Lk) = ", at::IntArrayRef(grid));
}

// The checks of the arguments attention_fwd and attention_bwd share (Args: AttentionFwdArgs or AttentionBwdArgs).
template <typename Args>
Shapes check_inputs(const Args& args) {
  const at::Tensor &q = args.q, &k = args.k, &v = args.v;
  const std::optional<at::Tensor>&bias = args.bias, &mask = args.mask, &alibi_slopes = args.alibi_slopes;
  const std::optional<at::Tensor>&rng_seed = args.rng_seed, &key_range = args.key_range, &segments = args.segments;
  const double scale = args.scale, softcap = args.softcap, dropout_p = args.dropout_p;
  const int64_t window_left = args.window_left, window_right = args.window_right;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "bmkernels attention: q, k, v must be 4-D (B, H, L, D); got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "bmkernels attention (CPU kernel): q, k, v must be CPU tensors; got ", q.device(), ", ", k.device(), ", ",
              v.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "bmkernels attention: q must be float32, float64, bfloat16 or float16; got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "bmkernels attention: q, k, v must share a dtype; got ", dtype, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  Shapes sh{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == sh.batch && v.size(0) == sh.batch, "bmkernels attention: batch sizes differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(1) == sh.kv_heads && v.size(2) == sh.k_len,
              "bmkernels attention: k and v must have the same heads and length; got k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == sh.head_dim, "bmkernels attention: q and k head dims differ: ", q.sizes(), " vs ",
              k.sizes());
  TORCH_CHECK(sh.kv_heads > 0 ? sh.q_heads % sh.kv_heads == 0 : sh.q_heads == 0, "bmkernels attention: q heads (",
              sh.q_heads, ") must be a multiple of k/v heads (", sh.kv_heads, ")");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == dtype, "bmkernels attention: bias must have q's dtype ", dtype, "; got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() <= 4,
                "bmkernels attention: bias must be a CPU tensor of "
                "at most 4 dims; got ",
                bias->sizes(), " on ", bias->device());
  }
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "bmkernels attention: mask must be bool; got ", mask->scalar_type());
    TORCH_CHECK(mask->device().is_cpu() && mask->dim() <= 4,
                "bmkernels attention: mask must be a CPU tensor of "
                "at most 4 dims; got ",
                mask->sizes(), " on ", mask->device());
  }
  const std::vector<int64_t> grid{sh.batch, sh.q_heads, sh.q_len, sh.k_len};
  if (bias) check_broadcasts("bias", *bias, grid);
  if (mask) check_broadcasts("mask", *mask, grid);
  if (segments) check_segments(*segments, sh, bias.has_value(), mask.has_value(), key_range.has_value());
  // ALiBi slopes per batch, or per sequence with segments
  const int64_t slope_rows = segments ? segments->size(0) - 1 : sh.batch;
  if (alibi_slopes) {
    TORCH_CHECK(at::isFloatingType(alibi_slopes->scalar_type()) && alibi_slopes->device().is_cpu() &&
                    alibi_slopes->dim() >= 1 && alibi_slopes->dim() <= 2,
                "bmkernels attention: alibi_slopes must be a floating CPU tensor of shape (H,) or (B, H); got ",
                alibi_slopes->sizes(), " ", alibi_slopes->scalar_type());
    const bool per_head = alibi_slopes->dim() == 1 && alibi_slopes->size(0) == sh.q_heads;
    const bool per_batch =
        alibi_slopes->dim() == 2 && alibi_slopes->size(0) == slope_rows && alibi_slopes->size(1) == sh.q_heads;
    TORCH_CHECK(per_head || per_batch, "bmkernels attention: alibi_slopes must have shape (Hq,) = (", sh.q_heads,
                ") or (", segments ? "S" : "B", ", Hq) = (", slope_rows, ", ", sh.q_heads, "); got ",
                alibi_slopes->sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "bmkernels attention: dropout_p must be in [0, 1); got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(
        rng_seed && rng_seed->scalar_type() == at::kLong && rng_seed->numel() >= 1 && rng_seed->device().is_cpu(),
        "bmkernels attention: dropout needs rng_seed, a CPU int64 tensor with one element");
  }
  TORCH_CHECK(std::isfinite(scale), "bmkernels attention: scale must be finite; got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "bmkernels attention: softcap must be >= 0 (0 = off); got ",
              softcap);
  if (key_range) check_key_range(*key_range, sh);
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "bmkernels attention: window bounds must be >= -1 (-1 = unbounded); got (", window_left, ", ",
              window_right, ")");
  return sh;
}

at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t, typename acc_t>
ScoreTerms<scalar_t, acc_t> score_terms(const Shapes& sh, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& mask, const at::Tensor& alibi,
                                        double softcap) {
  ScoreTerms<scalar_t, acc_t> terms;
  const std::vector<int64_t> grid{sh.batch, sh.q_heads, sh.q_len, sh.k_len};
  if (bias) {
    const at::Tensor e = bias->expand(grid);
    terms.bias = bias->const_data_ptr<scalar_t>();
    for (int d = 0; d < 4; ++d) terms.bias_stride[d] = e.stride(d);
  }
  if (mask) {
    const at::Tensor e = mask->expand(grid);
    terms.mask = mask->const_data_ptr<bool>();
    for (int d = 0; d < 4; ++d) terms.mask_stride[d] = e.stride(d);
  }
  if (alibi.defined()) terms.alibi = alibi.const_data_ptr<acc_t>();
  terms.heads = sh.q_heads;
  terms.softcap = static_cast<acc_t>(softcap);
  return terms;
}

// ALiBi slopes as a contiguous (rows, Hq) tensor in the accumulation dtype (undefined when absent): a row
// per batch, or per sequence with segments.
at::Tensor alibi_table(const Shapes& sh, const std::optional<at::Tensor>& alibi_slopes,
                       const std::optional<at::Tensor>& segments, at::ScalarType acc) {
  if (!alibi_slopes) return at::Tensor();
  const int64_t rows = segments ? segments->size(0) - 1 : sh.batch;
  return alibi_slopes->to(acc).expand({rows, sh.q_heads}).contiguous();
}

// The independent problems of a call: one per batch (its key range applied to the window), or one per
// packed sequence, its queries aligned bottom-right to its keys (plus diag_offset).
std::vector<Segment> segments_of(const Shapes& sh, const std::optional<at::Tensor>& key_range,
                                 const std::optional<at::Tensor>& segments, int64_t window_left, int64_t window_right,
                                 int64_t diag_offset) {
  std::vector<Segment> segs;
  if (segments) {
    const at::Tensor c = segments->contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    for (int64_t s = 0; s + 1 < segments->size(0); ++s) {
      const int64_t q_len = p[2 * s + 2] - p[2 * s], k_len = p[2 * s + 3] - p[2 * s + 1];
      // bottom-right: the offset is capped first, so that k_len - q_len + diag_offset cannot overflow
      const int64_t offset = std::clamp<int64_t>(diag_offset, -(int64_t(1) << 61), int64_t(1) << 61) + k_len - q_len;
      segs.push_back({0, s, p[2 * s], q_len, p[2 * s + 1], k_len,
                      saturated_window(window_left, window_right, offset, q_len, k_len)});
    }
    return segs;
  }
  const AttentionWindow all_keys = saturated_window(window_left, window_right, diag_offset, sh.q_len, sh.k_len);
  const at::Tensor ranges = key_range ? key_range->contiguous() : at::Tensor();
  const int64_t* r = ranges.defined() ? ranges.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < sh.batch; ++b) {
    segs.push_back({b, b, 0, sh.q_len, 0, sh.k_len, r ? all_keys.for_keys(r[2 * b], r[2 * b + 1]) : all_keys});
  }
  return segs;
}

// out (B, Hq, Lq, Dv) laid out as q is: rows of heads (B, Lq, Hq, Dv) when q's head stride is below its
// row stride (the projection layout, so that the caller's transpose back is free), else contiguous. The
// fake kernel (bmkernels/ops/attention.py) applies the same rule.
at::Tensor empty_output(const at::Tensor& q, int64_t v_head_dim) {
  if (q.stride(1) < q.stride(2)) {
    return at::empty({q.size(0), q.size(2), q.size(1), v_head_dim}, q.options()).transpose(1, 2);
  }
  return at::empty({q.size(0), q.size(1), q.size(2), v_head_dim}, q.options());
}

Dropout dropout_of(const std::optional<at::Tensor>& rng_seed, double dropout_p) {
  Dropout drop;
  drop.p = dropout_p;
  if (drop.on()) drop.seed = static_cast<uint64_t>(rng_seed->contiguous().const_data_ptr<int64_t>()[0]);
  return drop;
}

// ---- Attention over a KV cache (FlashAttention's flash_attn_with_kvcache), tuned for decoding ----
// A task is (batch, kv head, block of query rows, key split): the rows of one kv head's whole query group
// (GQA) share one pass over the keys, so K and V stream from memory once per kv head; the keys are split
// across tasks (flash-decoding) and the partial results combined by their logsumexp. Scores are dot
// products straight from the cache rows (no packing), which suits the few rows of a decoding step.
constexpr int64_t kCacheRowBlock = 16;    // query rows (queries x group heads) per pass over the keys
constexpr int64_t kCacheKeyTile = 64;     // keys per online-softmax step
constexpr int64_t kCacheSplitKeys = 512;  // the fewest keys a split is given

// Where key j of batch b lives in a cache (element offset of its row, head 0): a dense (Bc, Lmax, H, D)
// cache indexed by batch row (cache_batch_idx), or pages (blocks, block_size, H, D) through block_table.
struct CacheRows {
  const int64_t* block_table = nullptr;  // (B, max_blocks), contiguous
  int64_t table_cols = 0, block_size = 1;
  const int64_t* batch_row = nullptr;  // (B,) or null: batch b uses cache row b
  int64_t stride0 = 0, stride1 = 0;
  int64_t at(int64_t b, int64_t j) const {
    if (block_table) return block_table[b * table_cols + j / block_size] * stride0 + (j % block_size) * stride1;
    return (batch_row ? batch_row[b] : b) * stride0 + j * stride1;
  }
};

// m <= Vec<acc_t>::size() elements of x as a vector of acc_t (converted in registers: no copy).
template <typename scalar_t, typename acc_t>
Vec<acc_t> load_as(const scalar_t* x, int64_t m) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec<acc_t>::loadu(x, m);
  } else {
    Vec<acc_t> out;
    if (m == Vec<acc_t>::size()) {
      at::vec::load_to_float(x, out);
    } else {
      scalar_t part[Vec<acc_t>::size()] = {};
      std::copy(x, x + m, part);
      at::vec::load_to_float(part, out);
    }
    return out;
  }
}

// Rows of a register block: R query rows share each key/value vector load (R accumulators in registers).
template <typename F>
void for_row_blocks(int64_t rows, const F& body) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) body(std::integral_constant<int, 8>{}, r);
  for (; r + 4 <= rows; r += 4) body(std::integral_constant<int, 4>{}, r);
  for (; r + 2 <= rows; r += 2) body(std::integral_constant<int, 2>{}, r);
  for (; r < rows; ++r) body(std::integral_constant<int, 1>{}, r);
}

// part[r * W * W] = the lane-wise partial sums of <q row r, key> for R rows (W = the vector width): the
// key is loaded (and converted) once for all of them; the horizontal sums come later, W keys at once.
template <typename scalar_t, typename T, int R>
void dot_partials(const T* q_rows, int64_t D, const scalar_t* key, T* part) {
  constexpr int64_t W = Vec<T>::size();
  std::array<Vec<T>, R> acc;
  acc.fill(Vec<T>(T(0)));
  for (int64_t d = 0; d < D; d += W) {
    const int64_t m = std::min<int64_t>(W, D - d);
    const Vec<T> k = load_as<scalar_t, T>(key + d, m);
    for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec<T>::loadu(q_rows + r * D + d, m), k, acc[r]);
  }
  for (int r = 0; r < R; ++r) acc[r].store(part + r * W * W);
}

// out[c] = the sum of the lanes of vector c of v (W vectors of W lanes), c < n. With AVX-512 in float, a
// transpose-add tree (45 shuffles and adds for 16 sums, where one horizontal sum costs 8).
template <typename T>
void sum_lanes(const T* v, int64_t n, T* out) {
  constexpr int64_t W = Vec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i) {  // within 128-bit blocks: pairs of vectors
      const __m512 a = _mm512_loadu_ps(v + 2 * i * W), b = _mm512_loadu_ps(v + (2 * i + 1) * W);
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int i = 0; i < 4; ++i) {  // quadruples: block lane l holds vector 4i + l's block sum
      u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    }
    for (int i = 0; i < 2; ++i) {  // across the four 128-bit blocks, two steps
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    }
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), sums);
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) out[c] = at::vec::vec_reduce_all<T>(std::plus<Vec<T>>(), Vec<T>::loadu(v + c * W));
}

// scores[r * ld + c] = <q row r, keys[c]> for rows <= kCacheRowBlock and c < n. part: scratch of
// kCacheRowBlock * W * W.
template <typename scalar_t, typename T>
void score_tile(const T* q_rows, int64_t rows, int64_t D, const scalar_t* const* keys, int64_t n, T* part, T* scores,
                int64_t ld) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t c0 = 0; c0 < n; c0 += W) {
    const int64_t width = std::min(W, n - c0);
    for_row_blocks(rows, [&](auto R, int64_t r) {
      for (int64_t c = 0; c < width; ++c) {
        dot_partials<scalar_t, T, R>(q_rows + r * D, D, keys[c0 + c], part + (r * W + c) * W);
      }
    });
    for (int64_t r = 0; r < rows; ++r) sum_lanes(part + r * W * W, width, scores + r * ld + c0);
  }
}

// out[r, :] += sum_c p[r * ld + c] * values[c][:] for R rows and c < n: each vector of the rows' outputs
// stays in a register across the tile's keys.
template <typename scalar_t, typename T, int R>
void accumulate_values_of(const T* p, int64_t ld, const scalar_t* const* values, int64_t n, int64_t Dv, T* out) {
  for (int64_t d = 0; d < Dv; d += Vec<T>::size()) {
    const int64_t m = std::min<int64_t>(Vec<T>::size(), Dv - d);
    std::array<Vec<T>, R> acc;
    for (int r = 0; r < R; ++r) acc[r] = Vec<T>::loadu(out + r * Dv + d, m);
    for (int64_t c = 0; c < n; ++c) {
      const Vec<T> v = load_as<scalar_t, T>(values[c] + d, m);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec<T>(p[r * ld + c]), v, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(out + r * Dv + d, m);
  }
}

template <typename scalar_t, typename T>
void accumulate_values(const T* p, int64_t ld, int64_t rows, const scalar_t* const* values, int64_t n, int64_t Dv,
                       T* out) {
  for_row_blocks(rows, [&](auto R, int64_t r) {
    accumulate_values_of<scalar_t, T, R>(p + r * ld, ld, values, n, Dv, out + r * Dv);
  });
}

// Asks for the cache lines of a row ahead of use (into L2): one head's rows lie a whole cache row (all
// heads) apart, a stride the hardware prefetchers do not follow across pages.
template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < size; off += 64) __builtin_prefetch(bytes + off, 0, 2);
  __builtin_prefetch(bytes + size - 1, 0, 2);
}

template <typename T>
void axpy(T a, const T* x, T* y, int64_t n) {
  const Vec<T> av(a);
  for (int64_t d = 0; d < n; d += Vec<T>::size()) {
    const int64_t m = std::min<int64_t>(Vec<T>::size(), n - d);
    at::vec::fmadd(av, Vec<T>::loadu(x + d, m), Vec<T>::loadu(y + d, m)).store(y + d, m);
  }
}

struct CacheShapes {
  int64_t batch, q_len, q_heads, kv_heads, head_dim, v_head_dim;
  int64_t q_stride[3];     // q (B, Lq, Hq, D): batch, row, head strides
  int64_t k_head, v_head;  // head strides of the caches
};

template <typename scalar_t, typename acc_t>
void kvcache_kernel(const CacheShapes& sh, const scalar_t* q, acc_t scale, const scalar_t* k, const scalar_t* v,
                    const CacheRows& k_rows, const CacheRows& v_rows, const int64_t* seqlens,
                    const ScoreTerms<scalar_t, acc_t>& terms, int64_t window_left, int64_t window_right, scalar_t* out,
                    acc_t* lse) {
  const int64_t B = sh.batch, Lq = sh.q_len, D = sh.head_dim, Dv = sh.v_head_dim;
  const int64_t group = sh.q_heads / sh.kv_heads, rows_per_head = group * Lq;
  const int64_t row_blocks = ceil_div(rows_per_head, kCacheRowBlock);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, seqlens[b]);
  // A task is (batch, row block, key split) over heads_per_task kv heads. With all of them each key tile
  // is read as the cache stores it, whole rows of every head, rather than one head's slice of every row
  // (1/Hkv of each page, the other heads' tasks reading the rest at other times): taken where the batch
  // alone gives each thread two tasks (bf16 B4 Lk 16k: 1.13-1.2x); with fewer, one head per task and finer
  // key splits measured faster (B1: 0.6-0.8x with all heads).
  const int64_t problems = B * sh.kv_heads * row_blocks;
  const bool all_heads = B * row_blocks >= 2 * at::get_num_threads();
  const int64_t heads_per_task = all_heads ? std::max<int64_t>(sh.kv_heads, 1) : 1;
  const int64_t head_groups = ceil_div(sh.kv_heads, heads_per_task);
  // enough tasks for every thread, but no split shorter than kCacheSplitKeys
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), std::max<int64_t>(B * head_groups * row_blocks, 1)), 1,
                          std::max<int64_t>(ceil_div(max_len, kCacheSplitKeys), 1));
  // partial results per (problem, split, row): running max, sum and the unnormalized output
  std::vector<acc_t> part_max(splits * problems * kCacheRowBlock, neg_inf<acc_t>());
  std::vector<acc_t> part_sum(splits * problems * kCacheRowBlock, acc_t(0));
  std::vector<acc_t> part_out(splits * problems * kCacheRowBlock * std::max<int64_t>(Dv, 1), acc_t(0));
  run_tasks(B * head_groups * row_blocks * splits, [&](const auto& next_task) {
    std::vector<acc_t> q_tile(heads_per_task * kCacheRowBlock * D), scores(kCacheRowBlock * kCacheKeyTile);
    std::vector<acc_t> part(kCacheRowBlock * Vec<acc_t>::size() * Vec<acc_t>::size(), acc_t(0));
    const scalar_t* key_at[kCacheKeyTile];  // the tile's key and value rows in the cache, for one head
    const scalar_t* value_at[kCacheKeyTile];
    std::vector<int64_t> lo(kCacheRowBlock), hi(kCacheRowBlock);
    for (int64_t task; (task = next_task()) >= 0;) {
      const int64_t split = task % splits, rb = task / splits % row_blocks;
      const int64_t hg = task / (splits * row_blocks) % head_groups, b = task / (splits * row_blocks * head_groups);
      const int64_t hk0 = hg * heads_per_task, hk1 = std::min(sh.kv_heads, hk0 + heads_per_task);
      const int64_t r0 = rb * kCacheRowBlock, rows = std::min(kCacheRowBlock, rows_per_head - r0);
      const int64_t len = seqlens[b];
      // bottom-right: query i is aligned to key i + len - Lq
      const AttentionWindow win = saturated_window(window_left, window_right, len - Lq, Lq, len);
      ScoreTerms<scalar_t, acc_t> row_terms = terms;
      row_terms.diag_offset = win.diag_offset;
      const int64_t chunk = ceil_div(ceil_div(len, splits), kCacheKeyTile) * kCacheKeyTile;
      int64_t first = len, end = 0;
      for (int64_t r = 0; r < rows; ++r) {  // row r0 + r is query (r0 + r) / group of head hk * group + its rest
        const int64_t i = (r0 + r) / group;
        for (int64_t hk = hk0; hk < hk1; ++hk) {
          const int64_t h = hk * group + (r0 + r) % group;
          pack_rows(q + b * sh.q_stride[0] + i * sh.q_stride[1] + h * sh.q_stride[2], D, scale,
                    q_tile.data() + ((hk - hk0) * kCacheRowBlock + r) * D);
        }
        lo[r] = std::max(win.first_key(i), split * chunk);
        hi[r] = std::max(lo[r], std::min(win.end_key(i), (split + 1) * chunk));
        first = std::min(first, lo[r]);
        end = std::max(end, hi[r]);
      }
      const auto key_row = [&](int64_t j, int64_t hk) { return k + k_rows.at(b, j) + hk * sh.k_head; };
      const auto value_row = [&](int64_t j, int64_t hk) { return v + v_rows.at(b, j) + hk * sh.v_head; };
      for (int64_t j = first; j < std::min(end, first + kCacheKeyTile); ++j) {
        for (int64_t hk = hk0; hk < hk1; ++hk) prefetch_row(key_row(j, hk), D);
      }
      for (int64_t j0 = first; j0 < end; j0 += kCacheKeyTile) {
        const int64_t n = std::min(kCacheKeyTile, end - j0);
        for (int64_t hk = hk0; hk < hk1; ++hk) {
          const int64_t slot = ((b * sh.kv_heads + hk) * row_blocks + rb) * splits + split;
          acc_t* run_max = part_max.data() + slot * kCacheRowBlock;
          acc_t* run_sum = part_sum.data() + slot * kCacheRowBlock;
          acc_t* acc_out = part_out.data() + slot * kCacheRowBlock * Dv;
          for (int64_t c = 0; c < n; ++c) {  // this tile's values and the next tile's keys arrive while it scores
            key_at[c] = key_row(j0 + c, hk);
            value_at[c] = value_row(j0 + c, hk);
            prefetch_row(value_at[c], Dv);
            if (j0 + kCacheKeyTile + c < end) prefetch_row(key_row(j0 + kCacheKeyTile + c, hk), D);
          }
          score_tile(q_tile.data() + (hk - hk0) * kCacheRowBlock * D, rows, D, key_at, n, part.data(), scores.data(),
                     kCacheKeyTile);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* row = scores.data() + r * kCacheKeyTile;
            const int64_t a = std::clamp<int64_t>(lo[r] - j0, 0, n), z = std::clamp<int64_t>(hi[r] - j0, a, n);
            std::fill(row, row + a, acc_t(0));
            std::fill(row + z, row + n, acc_t(0));
            if (a == z) continue;
            const int64_t i = (r0 + r) / group, h = hk * group + (r0 + r) % group;
            if (terms.any()) row_terms.logits(row + a, z - a, b, h, i, j0 + a, 0, 1, nullptr);
            online_softmax_step(row + a, z - a, acc_t(1), run_max[r], run_sum[r], acc_out + r * Dv, Dv, row + a);
          }
          accumulate_values(scores.data(), kCacheKeyTile, rows, value_at, n, Dv, acc_out);
        }
      }
    }
  });
  // Combine the splits of each row by their logsumexp.
  at::parallel_for(0, problems * kCacheRowBlock, grain_for(splits * Dv), [&](int64_t begin, int64_t stop) {
    std::vector<acc_t> sum_out(Dv);
    for (int64_t e = begin; e < stop; ++e) {
      const int64_t problem = e / kCacheRowBlock, r = e % kCacheRowBlock;
      const int64_t b = problem / (sh.kv_heads * row_blocks), hk = problem / row_blocks % sh.kv_heads;
      const int64_t row = (problem % row_blocks) * kCacheRowBlock + r;
      if (row >= rows_per_head) continue;
      const int64_t i = row / group, h = hk * group + row % group;
      acc_t best = neg_inf<acc_t>();
      for (int64_t s = 0; s < splits; ++s) best = std::max(best, part_max[(problem * splits + s) * kCacheRowBlock + r]);
      acc_t total = 0;
      std::fill(sum_out.begin(), sum_out.end(), acc_t(0));
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t slot = (problem * splits + s) * kCacheRowBlock + r;
        if (part_sum[slot] == acc_t(0)) continue;
        const acc_t w = std::exp(part_max[slot] - best);
        total += w * part_sum[slot];
        axpy(w, part_out.data() + slot * Dv, sum_out.data(), Dv);
      }
      scalar_t* out_row = out + ((b * Lq + i) * sh.q_heads + h) * Dv;
      acc_t* lse_row = lse + (b * sh.q_heads + h) * Lq + i;
      if (total == acc_t(0)) {  // no visible key: zeros, lse = log(0)
        std::fill(out_row, out_row + Dv, scalar_t(0));
        *lse_row = neg_inf<acc_t>();
        continue;
      }
      for (int64_t d = 0; d < Dv; ++d) out_row[d] = static_cast<scalar_t>(sum_out[d] / total);
      *lse_row = best + std::log(total);
    }
  });
}
}  // namespace

namespace {
void check_sinks(const at::Tensor& sinks, const Shapes& sh) {
  TORCH_CHECK(at::isFloatingType(sinks.scalar_type()) && sinks.device().is_cpu() && sinks.dim() == 1 &&
                  sinks.size(0) == sh.q_heads,
              "bmkernels attention: sinks must be a floating CPU tensor of shape (Hq,) = (", sh.q_heads, "); got ",
              sinks.sizes(), " ", sinks.scalar_type(), " on ", sinks.device());
}

// The sinks join each row's softmax denominator with no value: lse' = logaddexp(lse, sink) and
// out' = out exp(lse - lse') (1 where both are -inf: no key and no sink leaves the row as it was).
void apply_sinks(const at::Tensor& sinks, const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor total = at::logaddexp(lse, sinks.to(lse.scalar_type()).view({1, -1, 1}));
  const at::Tensor factor = at::where(at::isneginf(total), at::ones_like(total), at::exp(lse - total));
  out.copy_(out.to(lse.scalar_type()) * factor.unsqueeze(-1));
  lse.copy_(total);
}
}  // namespace

AttentionFwdResult attention_fwd(const AttentionFwdArgs& args) {
  const auto& [q, k, v, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left, window_right, diag_offset,
               dropout_p, key_range, segments, sinks] = args;
  const Shapes sh = check_inputs(args);
  if (sinks) check_sinks(*sinks, sh);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = empty_output(q, sh.v_head_dim);
  at::Tensor lse = at::empty({sh.batch, sh.q_heads, sh.q_len}, q.options().dtype(acc));
  if (lse.numel() == 0) return {out, lse};
  const at::Tensor qc = rows_contiguous(q), kc = rows_contiguous(k), vc = rows_contiguous(v);
  const ForwardLayouts lay{row_layout(qc), row_layout(kc), row_layout(vc), row_layout(out)};
  const at::Tensor alibi = alibi_table(sh, alibi_slopes, segments, acc);
  const std::vector<Segment> segs = segments_of(sh, key_range, segments, window_left, window_right, diag_offset);
  const Dropout drop = dropout_of(rng_seed, dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "bmkernels_attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto terms = score_terms<scalar_t, acc_t>(sh, bias, mask, alibi, softcap);
    forward_kernel<scalar_t, acc_t>(sh, lay, qc.const_data_ptr<scalar_t>(), static_cast<acc_t>(scale),
                                    kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(), terms, segs, drop,
                                    out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  if (sinks) apply_sinks(*sinks, out, lse);
  return {out, lse};
}

AttentionBwdResult attention_bwd(const AttentionBwdArgs& args) {
  const auto& [grad_out, q, k, v, out, lse, grad_lse, bias, mask, alibi_slopes, rng_seed, scale, softcap, window_left,
               window_right, diag_offset, dropout_p, bias_grad, key_range, segments] = args;
  Shapes sh = check_inputs(args);
  sh.q_ld = padded_ld(sh.q_len);
  sh.k_ld = padded_ld(sh.k_len);
  const auto acc = acc_type(q.scalar_type());
  const std::vector<int64_t> out_shape{sh.batch, sh.q_heads, sh.q_len, sh.v_head_dim};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape,
              "bmkernels attention backward: grad_out and out must have shape ", out_shape, "; got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({sh.batch, sh.q_heads, sh.q_len}) && lse.scalar_type() == acc,
              "bmkernels attention backward: lse must be ", acc, " of shape (B, Hq, Lq); got ", lse.sizes(), " ",
              lse.scalar_type());
  TORCH_CHECK(!bias_grad || bias, "bmkernels attention backward: bias_grad needs a bias");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "bmkernels attention backward: grad_out and out must have q's dtype ", q.scalar_type(), "; got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  if (grad_lse) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "bmkernels attention backward: grad_lse must have lse's shape ",
                lse.sizes(), "; got ", grad_lse->sizes());
  }
  const int64_t B = sh.batch, Hq = sh.q_heads, Hkv = sh.kv_heads, Lq = sh.q_len, Lk = sh.k_len;
  const int64_t D = sh.head_dim, Dv = sh.v_head_dim;
  const at::TensorOptions acc_opts = q.options().dtype(acc);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor doc = grad_out.contiguous(), oc = out.contiguous(), lse_c = lse.contiguous();
  const at::Tensor glse = grad_lse ? grad_lse->to(acc).contiguous() : at::Tensor();
  // Few kv heads would leave cores idle: split each head's key blocks over more tasks.
  const std::vector<Segment> segs = segments_of(sh, key_range, segments, window_left, window_right, diag_offset);
  const int64_t problems = static_cast<int64_t>(segs.size()) * Hkv;
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), std::max<int64_t>(problems, 1)), 1,
                                             std::max<int64_t>(ceil_div(Lk, kBwdKeyBlock), 1));
  const bool convert = q.scalar_type() != acc;  // reduced precision: operands converted to float once
  at::Tensor qs = at::empty({B, Hq, Lq, D}, acc_opts), qs_t = at::empty({B, Hq, D, sh.q_ld}, acc_opts);
  at::Tensor dout = convert ? at::empty({B, Hq, Lq, Dv}, acc_opts) : doc;
  at::Tensor dout_t = at::empty({B, Hq, Dv, sh.q_ld}, acc_opts), delta = at::empty({B, Hq, Lq}, acc_opts);
  at::Tensor kk = convert ? at::empty({B, Hkv, Lk, D}, acc_opts) : kc;
  at::Tensor k_t = at::empty({B, Hkv, D, sh.k_ld}, acc_opts);
  at::Tensor vv = convert ? at::empty({B, Hkv, Lk, Dv}, acc_opts) : vc;
  at::Tensor dq_t = at::empty({splits, B, Hq, D, sh.q_ld}, acc_opts);
  at::Tensor dk = at::empty({B, Hkv, Lk, D}, acc_opts), dv = at::empty({B, Hkv, Lk, Dv}, acc_opts);
  at::Tensor dq = at::empty({B, Hq, Lq, D}, q.options());
  at::Tensor dk_out = convert ? at::empty({B, Hkv, Lk, D}, k.options()) : dk;
  at::Tensor dv_out = convert ? at::empty({B, Hkv, Lk, Dv}, v.options()) : dv;
  at::Tensor dbias = bias_grad ? at::zeros({B, Hq, Lq, Lk}, acc_opts) : at::empty({0}, acc_opts);
  const at::Tensor alibi = alibi_table(sh, alibi_slopes, segments, acc);
  const Dropout drop = dropout_of(rng_seed, dropout_p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "bmkernels_attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *q_in = qc.const_data_ptr<scalar_t>(), *k_in = kc.const_data_ptr<scalar_t>();
    const scalar_t *v_in = vc.const_data_ptr<scalar_t>(), *do_in = doc.const_data_ptr<scalar_t>();
    const scalar_t* o_in = oc.const_data_ptr<scalar_t>();
    const acc_t* glse_in = glse.defined() ? glse.const_data_ptr<acc_t>() : nullptr;
    const acc_t scale_acc = static_cast<acc_t>(scale);
    const int64_t dq_size = B * Hq * D * sh.q_ld;
    const int64_t grain = grain_for(std::max(Lq, Lk) * (D + Dv));
    acc_t *qs_p = qs.data_ptr<acc_t>(), *qs_t_p = qs_t.data_ptr<acc_t>(), *dout_t_p = dout_t.data_ptr<acc_t>();
    acc_t *dout_p = convert ? dout.data_ptr<acc_t>() : nullptr, *delta_p = delta.data_ptr<acc_t>();
    acc_t *kk_p = convert ? kk.data_ptr<acc_t>() : nullptr, *k_t_p = k_t.data_ptr<acc_t>();
    acc_t *vv_p = convert ? vv.data_ptr<acc_t>() : nullptr, *dq_t_p = dq_t.data_ptr<acc_t>();
    // Operand preparation, one parallel region: query heads first (scaled q, its transpose, dO, its
    // transpose, delta = rowsum(dO * O) - grad_lse, zeroed dQ partials), then kv heads (K, K^T, V).
    at::parallel_for(0, B * Hq + B * Hkv, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        if (task < B * Hq) {
          const int64_t bh = task;
          const scalar_t *q_head = q_in + bh * Lq * D, *do_head = do_in + bh * Lq * Dv;
          pack_rows(q_head, Lq * D, scale_acc, qs_p + bh * Lq * D);
          pack_transposed(q_head, Lq, D, D, sh.q_ld, scale_acc, qs_t_p + bh * D * sh.q_ld);
          if (dout_p) pack_rows(do_head, Lq * Dv, acc_t(1), dout_p + bh * Lq * Dv);
          pack_transposed(do_head, Lq, Dv, Dv, sh.q_ld, acc_t(1), dout_t_p + bh * Dv * sh.q_ld);
          for (int64_t i = 0; i < Lq; ++i) {
            const scalar_t *o_row = o_in + (bh * Lq + i) * Dv, *do_row = do_head + i * Dv;
            acc_t dot = 0;
            for (int64_t d = 0; d < Dv; ++d) dot += static_cast<acc_t>(do_row[d]) * static_cast<acc_t>(o_row[d]);
            // d lse / d s = p, so a gradient g flowing into lse folds into delta: dS = P (dP - (delta - g)).
            delta_p[bh * Lq + i] = glse_in ? dot - glse_in[bh * Lq + i] : dot;
          }
          for (int64_t split = 0; split < splits; ++split) {
            acc_t* dq_head = dq_t_p + split * dq_size + bh * D * sh.q_ld;
            std::fill(dq_head, dq_head + D * sh.q_ld, acc_t(0));
          }
        } else {
          const int64_t h = task - B * Hq;
          if (kk_p) pack_rows(k_in + h * Lk * D, Lk * D, acc_t(1), kk_p + h * Lk * D);
          pack_transposed(k_in + h * Lk * D, Lk, D, D, sh.k_ld, acc_t(1), k_t_p + h * D * sh.k_ld);
          if (vv_p) pack_rows(v_in + h * Lk * Dv, Lk * Dv, acc_t(1), vv_p + h * Lk * Dv);
        }
      }
    });
    if (Lk > 0 && Lq > 0 && Hkv > 0) {  // no kv head (then no query head either): nothing to compute
      const auto terms = score_terms<scalar_t, acc_t>(sh, bias, mask, alibi, softcap);
      BackwardOperands<acc_t> op{qs.const_data_ptr<acc_t>(),
                                 qs_t.const_data_ptr<acc_t>(),
                                 kk.const_data_ptr<acc_t>(),
                                 k_t.const_data_ptr<acc_t>(),
                                 vv.const_data_ptr<acc_t>(),
                                 dout.const_data_ptr<acc_t>(),
                                 dout_t.const_data_ptr<acc_t>(),
                                 delta.const_data_ptr<acc_t>(),
                                 lse_c.const_data_ptr<acc_t>(),
                                 dq_t.data_ptr<acc_t>(),
                                 dk.data_ptr<acc_t>(),
                                 dv.data_ptr<acc_t>(),
                                 bias_grad ? dbias.data_ptr<acc_t>() : nullptr};
      backward_kernel<scalar_t, acc_t>(sh, op, terms, segs, drop, splits);
    } else {
      dk.zero_();
      dv.zero_();
    }
    // Results, one parallel region: dQ = scale * sum of the split partials, transposed back; dK, dV
    // cast to the input dtype when it is not the accumulation dtype.
    scalar_t* dq_p = dq.data_ptr<scalar_t>();
    const acc_t *dk_p = dk.const_data_ptr<acc_t>(), *dv_p = dv.const_data_ptr<acc_t>();
    scalar_t* dk_out_p = convert ? dk_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* dv_out_p = convert ? dv_out.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * Hq + B * Hkv, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        if (task < B * Hq) {
          const int64_t bh = task;
          constexpr int64_t kRows = 16;  // the strided dQ^T reads stay in L1 within a block of rows
          for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
            for (int64_t d = 0; d < D; ++d) {
              for (int64_t i = i0; i < std::min(Lq, i0 + kRows); ++i) {
                acc_t sum = 0;
                for (int64_t split = 0; split < splits; ++split)
                  sum += dq_t_p[split * dq_size + (bh * D + d) * sh.q_ld + i];
                dq_p[(bh * Lq + i) * D + d] = static_cast<scalar_t>(sum * scale_acc);
              }
            }
          }
        } else if (convert) {
          const int64_t h = task - B * Hq;
          for (int64_t n = h * Lk * D; n < (h + 1) * Lk * D; ++n) dk_out_p[n] = static_cast<scalar_t>(dk_p[n]);
          for (int64_t n = h * Lk * Dv; n < (h + 1) * Lk * Dv; ++n) dv_out_p[n] = static_cast<scalar_t>(dv_p[n]);
        }
      }
    });
  });
  return {dq, dk_out, dv_out, dbias};
}

AttentionFwdResult attention_kvcache_fwd(const AttentionKvcacheFwdArgs& args) {
  const auto& [q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, scale, softcap,
               window_left, window_right] = args;
  const char* what = "bmkernels attention_kvcache_fwd: ";
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, what,
              "q (B, Lq, Hq, D), k_cache and v_cache (rows, L, Hkv, D) must be 4-D; got q ", q.sizes(), ", k_cache ",
              k_cache.sizes(), ", v_cache ", v_cache.sizes());
  TORCH_CHECK(
      q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && cache_seqlens.device().is_cpu(),
      what, "q, k_cache, v_cache and cache_seqlens must be CPU tensors");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, what,
              "q must be float32, float64, bfloat16 or float16; got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype, what,
              "k_cache and v_cache must have q's dtype ", dtype, "; got ", k_cache.scalar_type(), " and ",
              v_cache.scalar_type());
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3), cache_len = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == D, what, "k_cache head dim must be q's ", D, "; got ", k_cache.sizes());
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == cache_len && v_cache.size(2) == Hkv, what,
              "v_cache must match k_cache in all but the last dim; got k_cache ", k_cache.sizes(), ", v_cache ",
              v_cache.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, what, "q heads (", Hq, ") must be a multiple of the cache's heads (", Hkv, ")");
  TORCH_CHECK((cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong) &&
                  cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              what, "cache_seqlens must be int32 or int64 of shape (B,) = (", B, "); got ", cache_seqlens.scalar_type(),
              " ", cache_seqlens.sizes());
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0, what,
              "scale must be finite and softcap finite and >= 0; got ", scale, ", ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, what, "window bounds must be >= -1 (-1 = unbounded); got (",
              window_left, ", ", window_right, ")");
  const at::Tensor lens = cache_seqlens.to(at::kLong).contiguous();
  at::Tensor table, rows;
  int64_t capacity = cache_len;
  if (block_table) {
    TORCH_CHECK(!cache_batch_idx, what, "cache_batch_idx does not apply to a paged cache (block_table)");
    TORCH_CHECK((block_table->scalar_type() == at::kInt || block_table->scalar_type() == at::kLong) &&
                    block_table->device().is_cpu() && block_table->dim() == 2 && block_table->size(0) == B,
                what, "block_table must be a CPU int32 tensor of shape (B, max_blocks) with B = ", B, "; got ",
                block_table->scalar_type(), " ", block_table->sizes());
    table = block_table->to(at::kLong).contiguous();
    capacity = block_table->size(1) * cache_len;  // pages of cache_len (block_size) rows
  } else if (cache_batch_idx) {
    TORCH_CHECK((cache_batch_idx->scalar_type() == at::kInt || cache_batch_idx->scalar_type() == at::kLong) &&
                    cache_batch_idx->device().is_cpu() && cache_batch_idx->dim() == 1 && cache_batch_idx->size(0) == B,
                what, "cache_batch_idx must be a CPU int32 tensor of shape (B,) = (", B, "); got ",
                cache_batch_idx->scalar_type(), " ", cache_batch_idx->sizes());
    rows = cache_batch_idx->to(at::kLong).contiguous();
  } else {
    TORCH_CHECK(k_cache.size(0) >= B, what, "the cache holds ", k_cache.size(0), " sequences, fewer than the batch ",
                B);
  }
  // Every index the kernel follows is checked (O(B * max_blocks)).
  const int64_t* len_p = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len_p[b] >= 0 && len_p[b] <= capacity, what, "cache_seqlens[", b, "] = ", len_p[b], " is outside [0, ",
                capacity, "], the cache's capacity");
    if (rows.defined()) {
      const int64_t r = rows.const_data_ptr<int64_t>()[b];
      TORCH_CHECK(r >= 0 && r < k_cache.size(0), what, "cache_batch_idx[", b, "] = ", r, " is outside [0, ",
                  k_cache.size(0), ")");
    }
    if (table.defined()) {
      const int64_t* t = table.const_data_ptr<int64_t>() + b * table.size(1);
      for (int64_t blk = 0; blk < ceil_div(len_p[b], cache_len); ++blk) {
        TORCH_CHECK(t[blk] >= 0 && t[blk] < k_cache.size(0), what, "block_table[", b, ", ", blk, "] = ", t[blk],
                    " is outside [0, ", k_cache.size(0), "), the number of blocks");
      }
    }
  }
  if (alibi_slopes) {
    TORCH_CHECK(at::isFloatingType(alibi_slopes->scalar_type()) && alibi_slopes->device().is_cpu() &&
                    ((alibi_slopes->dim() == 1 && alibi_slopes->size(0) == Hq) ||
                     (alibi_slopes->dim() == 2 && alibi_slopes->size(0) == B && alibi_slopes->size(1) == Hq)),
                what, "alibi_slopes must be a floating CPU tensor of shape (Hq,) = (", Hq, ") or (B, Hq) = (", B, ", ",
                Hq, "); got ", alibi_slopes->sizes());
  }
  const auto acc = acc_type(dtype);
  at::Tensor out = at::empty({B, Lq, Hq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(acc));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity())};
  // rows are read through strides; only the last dim must be contiguous
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const at::Tensor vc = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  CacheShapes sh{B, Lq, Hq, Hkv, D, Dv, {qc.stride(0), qc.stride(1), qc.stride(2)}, kc.stride(2), vc.stride(2)};
  CacheRows k_rows, v_rows;
  for (auto [cache, rows_of] : {std::pair{&kc, &k_rows}, std::pair{&vc, &v_rows}}) {
    rows_of->stride0 = cache->stride(0);
    rows_of->stride1 = cache->stride(1);
    rows_of->block_size = cache_len;
    if (table.defined()) {
      rows_of->block_table = table.const_data_ptr<int64_t>();
      rows_of->table_cols = table.size(1);
    }
    if (rows.defined()) rows_of->batch_row = rows.const_data_ptr<int64_t>();
  }
  const Shapes terms_shape{B, Hq, Hkv, Lq, capacity, D, Dv};
  const at::Tensor alibi = alibi_table(terms_shape, alibi_slopes, std::nullopt, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bmkernels_attention_kvcache_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto terms = score_terms<scalar_t, acc_t>(terms_shape, std::nullopt, std::nullopt, alibi, softcap);
    kvcache_kernel<scalar_t, acc_t>(sh, qc.const_data_ptr<scalar_t>(), static_cast<acc_t>(scale),
                                    kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(), k_rows, v_rows, len_p,
                                    terms, window_left, window_right, out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

at::Tensor attention_dropout_mask(const AttentionDropoutMaskArgs& args) {
  const auto& [rng_seed, batch, heads, q_len, k_len, dropout_p] = args;
  TORCH_CHECK(batch >= 0 && heads >= 0 && q_len >= 0 && k_len >= 0,
              "bmkernels attention_dropout_mask: sizes must be >= 0; got ", batch, ", ", heads, ", ", q_len, ", ",
              k_len);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "bmkernels attention_dropout_mask: dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK(rng_seed.scalar_type() == at::kLong && rng_seed.numel() >= 1,
              "bmkernels attention_dropout_mask: rng_seed must be an int64 tensor with one element");
  const Dropout drop = dropout_of(rng_seed, dropout_p > 0 ? dropout_p : 0.0);
  at::Tensor keep = at::empty({batch, heads, q_len, k_len}, rng_seed.options().dtype(at::kBool));
  bool* data = keep.data_ptr<bool>();
  at::parallel_for(0, batch * heads * q_len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / q_len, i = row % q_len;
      for (int64_t j = 0; j < k_len; ++j) {
        data[row * k_len + j] = !drop.on() || drop.keep(dropout_counter(bh, i, j, q_len, k_len));
      }
    }
  });
  return keep;
}

}  // namespace bmk::cpu::CPU_CAPABILITY
