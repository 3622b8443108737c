// Training-mode BatchNorm2d fused with the residual add and the activation that follow it in a CNN
// block: out = act((x - mean) * invstd * weight + bias + residual), batch statistics over (N, H, W)
// (specification: bmkernels/reference/batch_norm.py). Eager PyTorch makes five passes over memory for
// this (statistics, normalize, add, activation, and the activation's own backward read); here the
// forward is one pass for the statistics and one that writes the output, the backward one pass for the
// two per-channel sums and one that writes the gradients.
//
// NCHW: one channel at a time per thread; a channel's N x H x W values are small enough to stay in L2
// between its two passes, so x is read from memory about once. channels_last: rows of C channels split
// over the threads, per-thread per-channel partial sums combined at the end. Sums run in lanes of the
// accumulation type (float; double for double) over short blocks and in double across blocks, as
// PyTorch's CPU batch norm keeps its statistics in double; values are shifted by the channel's first
// value so the variance does not cancel.
// SiLU/GELU (exp, erf, tanh) run on ATen Vectorized chunks. Compiled once per ISA (setup.py), in
// bmk::cpu::CPU_CAPABILITY.
#include "cpu/batch_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/activations.h"

namespace bmk::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kLanes = 16;       // independent accumulators, so the compiler vectorizes the sums
constexpr int64_t kBlock = 1024;     // values summed in lanes before the block sum moves to double
constexpr int64_t kRowBlock = 64;    // channels_last: rows per block of the lane partial sums
constexpr int64_t kMinRowWork = 16;  // channels_last: least rows per parallel chunk
constexpr int64_t kChunk = 256;      // values per vectorized activation call (a stack buffer)

template <Activation A>
using ActTag = std::integral_constant<Activation, A>;

// Calls f with the activation as a compile-time constant, so the per-element switch folds away.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::relu:
      return f(ActTag<Activation::relu>{});
    case Activation::leaky_relu:
      return f(ActTag<Activation::leaky_relu>{});
    case Activation::gelu:
      return f(ActTag<Activation::gelu>{});
    case Activation::gelu_tanh:
      return f(ActTag<Activation::gelu_tanh>{});
    case Activation::silu:
      return f(ActTag<Activation::silu>{});
    case Activation::relu6:
      return f(ActTag<Activation::relu6>{});
    case Activation::hardswish:
      return f(ActTag<Activation::hardswish>{});
    default:
      return f(ActTag<Activation::none>{});
  }
}

// d act / dz at one element, from the saved output or pre-activation.
template <Activation A, typename T>
inline T act_grad(T saved, T slope, bool from_output) {
  if constexpr (A == Activation::none) {
    return T(1);
  } else if constexpr (A == Activation::relu || A == Activation::leaky_relu) {
    (void)from_output;  // y > 0 exactly where z > 0
    return activation_derivative_from_output(A, saved, slope);
  } else {
    return from_output ? activation_derivative_from_output(A, saved, slope) : activation_derivative(A, saved, slope);
  }
}

// Whether the activation needs exp, erf or tanh: its scalar form does not vectorize, so it runs on
// Vectorized buffers of kChunk values.
constexpr bool transcendental(Activation A) {
  return A == Activation::gelu || A == Activation::gelu_tanh || A == Activation::silu;
}

// activation_forward (activations.h) of the transcendental activations on a SIMD vector, same formulas.
template <Activation A, typename V>
inline V act_forward_vec(V z) {
  if constexpr (A == Activation::gelu) {
    return V(0.5) * z * (V(1) + (z * V(0.70710678118654752440)).erf());
  } else if constexpr (A == Activation::gelu_tanh) {
    return V(0.5) * z * (V(1) + (V(0.79788456080286535588) * (z + V(0.044715) * z * z * z)).tanh());
  } else {
    static_assert(A == Activation::silu);
    return z / (V(1) + z.neg().exp());
  }
}

// activation_derivative (activations.h) of the transcendental activations on a SIMD vector, same formulas.
template <Activation A, typename V>
inline V act_derivative_vec(V z) {
  if constexpr (A == Activation::gelu) {
    const V cdf = V(0.5) * (V(1) + (z * V(0.70710678118654752440)).erf());
    const V pdf = V(0.39894228040143267794) * (V(-0.5) * z * z).exp();
    return cdf + z * pdf;
  } else if constexpr (A == Activation::gelu_tanh) {
    const V k(0.79788456080286535588);
    const V t = (k * (z + V(0.044715) * z * z * z)).tanh();
    const V z_capped = at::vec::clamp(z, V(-1000), V(1000));  // 0 * finite beyond |z| = 1000, as the scalar form
    return V(0.5) * (V(1) + t) + V(0.5) * z * (V(1) - t * t) * k * (V(1) + V(3 * 0.044715) * z_capped * z_capped);
  } else {
    static_assert(A == Activation::silu);
    const V s = V(1) / (V(1) + z.neg().exp());
    return s * (V(1) + z * (V(1) - s));
  }
}

// v[i] = act(v[i]) (kDerivative false) or act'(v[i]) for i < n <= kChunk, vectorized.
template <Activation A, bool kDerivative, typename T>
inline void act_chunk(T* v, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t len = std::min<int64_t>(Vec::size(), n - i);
    const Vec z = Vec::loadu(v + i, len);
    (kDerivative ? act_derivative_vec<A>(z) : act_forward_vec<A>(z)).store(v + i, len);
  }
}

// d[i] = act'(saved[i]) for i < n <= kChunk, for a transcendental activation (derivative from z).
template <Activation A, typename scalar_t, typename acc_t>
inline void derivative_chunk(const scalar_t* __restrict saved, int64_t n, acc_t* __restrict d) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<acc_t>(saved[i]);
  act_chunk<A, true>(d, n);
}

// dz[i] = grad[i] * act'(saved[i]) for i < n <= kChunk, for a transcendental activation.
template <Activation A, typename scalar_t, typename acc_t>
inline void dz_chunk(const scalar_t* __restrict g, const scalar_t* __restrict saved, int64_t n, acc_t* __restrict dz) {
  derivative_chunk<A>(saved, n, dz);
  for (int64_t i = 0; i < n; ++i) dz[i] *= static_cast<acc_t>(g[i]);
}

// Sums over i in [0, n) of the pair f(i) = (a, b), in T lanes within blocks and double across them.
template <typename T, typename F>
inline void lane_sums(int64_t n, F&& f, double& sum_a, double& sum_b) {
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    T a[kLanes] = {}, b[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const auto [va, vb] = f(i + l);
        a[l] += va;
        b[l] += vb;
      }
    }
    for (; i < stop; ++i) {
      const auto [va, vb] = f(i);
      a[0] += va;
      b[0] += vb;
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      sum_a += a[l];
      sum_b += b[l];
    }
  }
}

// (N, C, H, W) in either memory format.
struct Layout {
  int64_t batch, channels, plane;  // N, C, H*W
  bool channels_last;
  int64_t count() const { return batch * plane; }  // values per channel
};

// channels_last when x is laid out so and not also plain contiguous (the rule of the conv ops and the fakes)
at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// x is contiguous in memory_format_of(x)
Layout layout_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), memory_format_of(x) == at::MemoryFormat::ChannelsLast};
}

// channels_last: per-channel sums over all rows of pairs (a, b); add_row(row offset, a, b) adds a row's C
// pairs into a[c], b[c]. Rows split over the threads (T partial sums per block of rows, double across
// blocks and threads).
template <typename T, typename F>
void row_sums(const Layout& L, F&& add_row, std::vector<double>& sum_a, std::vector<double>& sum_b) {
  const int64_t C = L.channels, rows = L.count();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowWork));
  std::vector<double> part_a(chunks * C, 0.0), part_b(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> a(C), b(C);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = rows * k / chunks, r1 = rows * (k + 1) / chunks;
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        std::fill(a.begin(), a.end(), T(0));
        std::fill(b.begin(), b.end(), T(0));
        for (int64_t r = rb; r < std::min(r1, rb + kRowBlock); ++r) add_row(r * C, a.data(), b.data());
        for (int64_t c = 0; c < C; ++c) {
          part_a[k * C + c] += a[c];
          part_b[k * C + c] += b[c];
        }
      }
    }
  });
  sum_a.assign(C, 0.0);
  sum_b.assign(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sum_a[c] += part_a[k * C + c];
      sum_b[c] += part_b[k * C + c];
    }
  }
}

// Per-channel tensor of `values` in dtype, filled in place (no dispatched conversion: it runs per layer and step).
at::Tensor channel_tensor(const std::vector<double>& values, const at::TensorOptions& options, at::ScalarType dtype) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, options.dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "channel_tensor", [&] {
    scalar_t* out = t.data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) out[c] = static_cast<scalar_t>(values[c]);
  });
  return t;
}

// The C values of a (C,) tensor (any stride, any floating dtype) in double, read in place.
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double absent) {
  if (!t) return std::vector<double>(C, absent);
  std::vector<double> values(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t->scalar_type(), "channel_values", [&] {
    const scalar_t* in = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) values[c] = static_cast<double>(in[c * stride]);
  });
  return values;
}

// One run of the output passes: a plane of one channel (kRow false: one coefficient) or a channels_last
// row (kRow: a coefficient per element). Restrict pointers, so the compiler vectorizes the loops.
template <Activation A, bool kRow, typename scalar_t, typename acc_t>
void forward_run(int64_t len, const scalar_t* __restrict x, const scalar_t* __restrict res, scalar_t* __restrict out,
                 scalar_t* __restrict preact, const acc_t* __restrict scale, const acc_t* __restrict offset,
                 acc_t slope) {
  if constexpr (transcendental(A)) {
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t n = std::min(kChunk, len - i0);
      acc_t z[kChunk];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = kRow ? i0 + i : 0;
        z[i] = static_cast<acc_t>(x[i0 + i]) * scale[c] + offset[c];
        if (res) z[i] += static_cast<acc_t>(res[i0 + i]);
        if (preact) preact[i0 + i] = static_cast<scalar_t>(z[i]);
      }
      act_chunk<A, false>(z, n);
      for (int64_t i = 0; i < n; ++i) out[i0 + i] = static_cast<scalar_t>(z[i]);
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t c = kRow ? i : 0;
    acc_t z = static_cast<acc_t>(x[i]) * scale[c] + offset[c];
    if (res) z += static_cast<acc_t>(res[i]);
    if (preact) preact[i] = static_cast<scalar_t>(z);
    out[i] = static_cast<scalar_t>(activation_forward(A, z, slope));
  }
}

// dz = grad * act'(saved); dres = dz; dx = alpha * (dz - beta) + gamma * (x - mean).
template <Activation A, bool kRow, typename scalar_t, typename acc_t>
void backward_run(int64_t len, const scalar_t* __restrict g, const scalar_t* __restrict saved,
                  const scalar_t* __restrict x, scalar_t* __restrict dx, scalar_t* __restrict dres,
                  const acc_t* __restrict alpha, const acc_t* __restrict beta, const acc_t* __restrict gamma,
                  const acc_t* __restrict mean, acc_t slope, bool from_output) {
  if constexpr (transcendental(A)) {
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t n = std::min(kChunk, len - i0);
      acc_t dz[kChunk];
      dz_chunk<A>(g + i0, saved + i0, n, dz);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = kRow ? i0 + i : 0;
        const acc_t d = dz[i];
        if (dres) dres[i0 + i] = static_cast<scalar_t>(d);
        if (dx) {
          dx[i0 + i] =
              static_cast<scalar_t>(alpha[c] * (d - beta[c]) + gamma[c] * (static_cast<acc_t>(x[i0 + i]) - mean[c]));
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t c = kRow ? i : 0;
    const acc_t d = static_cast<acc_t>(g[i]) * act_grad<A>(static_cast<acc_t>(saved[i]), slope, from_output);
    if (dres) dres[i] = static_cast<scalar_t>(d);
    if (dx) dx[i] = static_cast<scalar_t>(alpha[c] * (d - beta[c]) + gamma[c] * (static_cast<acc_t>(x[i]) - mean[c]));
  }
}

template <typename scalar_t>
BatchNormActFwdResult forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              double eps, Activation act, double slope, bool save_preact) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto fmt = memory_format_of(x);
  const Layout L = layout_of(x);
  const int64_t C = L.channels, n = L.count();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  auto out = at::empty_like(x, fmt);
  auto preact = save_preact ? at::empty_like(x, fmt) : at::empty({0}, x.options());
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* zp = save_preact ? preact.data_ptr<scalar_t>() : nullptr;
  const std::vector<double> w = channel_values(weight, C, 1.0), b = channel_values(bias, C, 0.0);
  std::vector<double> mean(C), invstd(C), var(C);
  std::vector<acc_t> scale(C), offset(C);  // y = x * scale + offset
  const acc_t sl = static_cast<acc_t>(slope);

  // The statistics from sums of values shifted by the channel's first value.
  auto finish_channel = [&](int64_t c, double shift, double s1, double s2) {
    const double m1 = s1 / n;
    var[c] = std::max(s2 / n - m1 * m1, 0.0);
    mean[c] = shift + m1;
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    scale[c] = static_cast<acc_t>(invstd[c] * w[c]);
    offset[c] = static_cast<acc_t>(b[c] - mean[c] * invstd[c] * w[c]);
  };
  with_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    // the output pass over run [off, off + len) whose coefficients start at channel c
    auto apply = [&](auto row, int64_t off, int64_t len, int64_t c) {
      forward_run<A, decltype(row)::value>(len, xp + off, rp ? rp + off : nullptr, op + off, zp ? zp + off : nullptr,
                                           scale.data() + c, offset.data() + c, sl);
    };
    if (!L.channels_last) {
      // statistics then output per channel, while its values are in cache
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t shift = static_cast<acc_t>(xp[c * L.plane]);
          double s1 = 0, s2 = 0;
          for (int64_t img = 0; img < L.batch; ++img) {
            const scalar_t* plane = xp + (img * C + c) * L.plane;
            lane_sums<acc_t>(
                L.plane,
                [&](int64_t p) {
                  const acc_t v = static_cast<acc_t>(plane[p]) - shift;
                  return std::pair<acc_t, acc_t>{v, v * v};
                },
                s1, s2);
          }
          finish_channel(c, shift, s1, s2);
          for (int64_t img = 0; img < L.batch; ++img) {
            const int64_t off = (img * C + c) * L.plane;
            apply(std::false_type{}, off, L.plane, c);
          }
        }
      });
      return;
    }
    std::vector<acc_t> shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(xp[c]);
    std::vector<double> s1, s2;
    row_sums<acc_t>(
        L,
        [&](int64_t off, acc_t* __restrict a, acc_t* __restrict b) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(xp[off + c]) - shift[c];
            a[c] += v;
            b[c] += v * v;
          }
        },
        s1, s2);
    for (int64_t c = 0; c < C; ++c) finish_channel(c, shift[c], s1[c], s2[c]);
    at::parallel_for(0, n, kMinRowWork, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        apply(std::true_type{}, r * C, C, 0);
      }
    });
  });
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {out, channel_tensor(mean, x.options(), stat_dtype), channel_tensor(invstd, x.options(), stat_dtype),
          channel_tensor(var, x.options(), stat_dtype), preact};
}

// dx = alpha * (dz - beta) + gamma * (x - mean) from the dz the sums pass stored (dz may be dx itself).
template <bool kRow, typename scalar_t, typename acc_t>
void gradient_from_dz(int64_t len, const scalar_t* dz, const scalar_t* __restrict x, scalar_t* dx,
                      const acc_t* __restrict alpha, const acc_t* __restrict beta, const acc_t* __restrict gamma,
                      const acc_t* __restrict mean) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t c = kRow ? i : 0;
    dx[i] = static_cast<scalar_t>(alpha[c] * (static_cast<acc_t>(dz[i]) - beta[c]) +
                                  gamma[c] * (static_cast<acc_t>(x[i]) - mean[c]));
  }
}

template <typename scalar_t>
BatchNormActBwdResult backward(const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const at::Tensor& mean_t, const at::Tensor& invstd_t, const at::Tensor& saved,
                               Activation act, double slope, bool from_output, std::array<bool, 4> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto fmt = memory_format_of(x);
  const Layout L = layout_of(x);
  const int64_t C = L.channels, n = L.count();
  const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                 *sp = saved.const_data_ptr<scalar_t>();
  const std::vector<double> mu = channel_values(mean_t, C, 0.0), is = channel_values(invstd_t, C, 1.0),
                            w = channel_values(weight, C, 1.0);
  const auto none = [&] { return at::empty({0}, x.options()); };  // a gradient not asked for (no aliasing)
  at::Tensor dx = mask[0] ? at::empty_like(x, fmt) : none(), dres = mask[3] ? at::empty_like(x, fmt) : none();
  scalar_t* dxp = mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
  scalar_t* drp = mask[3] ? dres.data_ptr<scalar_t>() : nullptr;
  const bool writes = mask[0] || mask[3];
  const acc_t sl = static_cast<acc_t>(slope);
  std::vector<double> sum_dz(C, 0.0), sum_dzx(C, 0.0);  // sum dz and sum dz * (x - mean), dz = grad * act'
  std::vector<acc_t> alpha(C), beta(C), gamma(C), m(C);

  // dx = w * invstd * (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean)))
  auto finish_channel = [&](int64_t c) {
    const double a = w[c] * is[c];
    alpha[c] = static_cast<acc_t>(a);
    beta[c] = static_cast<acc_t>(sum_dz[c] / n);
    gamma[c] = static_cast<acc_t>(-a * is[c] * is[c] * sum_dzx[c] / n);
    m[c] = static_cast<acc_t>(mu[c]);
  };
  with_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    // (dz, dz * (x - mean)) at element i
    auto dz_sums = [&](int64_t i, acc_t dz, acc_t mean) {
      return std::pair<acc_t, acc_t>{dz, dz * (static_cast<acc_t>(xp[i]) - mean)};
    };
    auto sums = [&](int64_t i, acc_t mean) {
      return dz_sums(i, static_cast<acc_t>(gp[i]) * act_grad<A>(static_cast<acc_t>(sp[i]), sl, from_output), mean);
    };
    // a transcendental activation's dz is stored by the sums pass in dres (its final value) or dx, when they
    // hold it exactly (acc_t), so the gradient pass need not compute act' again
    constexpr bool kKeepDz = transcendental(A) && std::is_same_v<scalar_t, acc_t>;
    scalar_t* const dz_store = kKeepDz ? (drp ? drp : dxp) : nullptr;
    // dz of chunk [i, i + len) into dz (and dz_store)
    auto dz_of = [&](int64_t i, int64_t len, acc_t* dz) {
      if constexpr (transcendental(A)) {
        dz_chunk<A>(gp + i, sp + i, len, dz);
        if (dz_store) std::copy(dz, dz + len, dz_store + i);
      }
    };
    auto apply = [&](auto row, int64_t off, int64_t len, int64_t c) {
      if (dz_store) {
        if (dxp) {
          gradient_from_dz<decltype(row)::value>(len, dz_store + off, xp + off, dxp + off, alpha.data() + c,
                                                 beta.data() + c, gamma.data() + c, m.data() + c);
        }
        return;
      }
      backward_run<A, decltype(row)::value>(len, gp + off, sp + off, xp + off, dxp ? dxp + off : nullptr,
                                            drp ? drp + off : nullptr, alpha.data() + c, beta.data() + c,
                                            gamma.data() + c, m.data() + c, sl, from_output);
    };
    if (!L.channels_last) {
      // both sums then the gradients per channel, while its values are in cache
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const acc_t mean = static_cast<acc_t>(mu[c]);
          for (int64_t img = 0; img < L.batch; ++img) {
            const int64_t off = (img * C + c) * L.plane;
            if constexpr (transcendental(A)) {
              for (int64_t p0 = 0; p0 < L.plane; p0 += kChunk) {
                const int64_t len = std::min(kChunk, L.plane - p0);
                acc_t dz[kChunk];
                dz_of(off + p0, len, dz);
                lane_sums<acc_t>(
                    len, [&](int64_t p) { return dz_sums(off + p0 + p, dz[p], mean); }, sum_dz[c], sum_dzx[c]);
              }
            } else {
              lane_sums<acc_t>(L.plane, [&](int64_t p) { return sums(off + p, mean); }, sum_dz[c], sum_dzx[c]);
            }
          }
          finish_channel(c);
          if (!writes) continue;
          for (int64_t img = 0; img < L.batch; ++img) {
            const int64_t off = (img * C + c) * L.plane;
            apply(std::false_type{}, off, L.plane, c);
          }
        }
      });
      return;
    }
    std::vector<acc_t> mean(C);
    for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<acc_t>(mu[c]);
    row_sums<acc_t>(
        L,
        [&](int64_t off, acc_t* __restrict a, acc_t* __restrict b) {
          for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
            const int64_t len = std::min(kChunk, C - c0);
            acc_t dz[kChunk];
            if constexpr (transcendental(A)) dz_of(off + c0, len, dz);
            for (int64_t c = c0; c < c0 + len; ++c) {
              const auto [va, vb] = transcendental(A) ? dz_sums(off + c, dz[c - c0], mean[c]) : sums(off + c, mean[c]);
              a[c] += va;
              b[c] += vb;
            }
          }
        },
        sum_dz, sum_dzx);
    for (int64_t c = 0; c < C; ++c) finish_channel(c);
    if (!writes) return;
    at::parallel_for(0, n, kMinRowWork, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        apply(std::true_type{}, r * C, C, 0);
      }
    });
  });

  const auto param_dtype = weight ? weight->scalar_type() : x.scalar_type();
  at::Tensor dweight = none(), dbias = none();
  if (mask[1]) {
    std::vector<double> dw(C);
    for (int64_t c = 0; c < C; ++c) dw[c] = sum_dzx[c] * is[c];
    dweight = channel_tensor(dw, x.options(), param_dtype);
  }
  if (mask[2]) dbias = channel_tensor(sum_dz, x.options(), param_dtype);
  return {dx, dweight, dbias, dres};
}

// The argument checks of both ops: a raw torch.ops.bmkernels call is as safe as the module.
void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W); got ", x.dim(), "-D of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor; got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor; got one on ", x.device());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, op,
              ": expected more than 1 value per channel when training; got x of shape ", x.sizes());
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), "; got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ", t.device());
}

void check_channels(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) (one value per channel of x); got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating-point; got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ", t.device());
}

void check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= kLastActivation, op,
              ": activation must be a code of bmk::Activation (0..", kLastActivation, "); got ", activation);
}

at::Tensor like_x(const at::Tensor& t, const at::Tensor& x) { return t.contiguous(memory_format_of(x)); }

}  // namespace

BatchNormActFwdResult batch_norm_act_fwd(const BatchNormActFwdArgs& args) {
  const auto& [x_in, weight, bias, residual_in, eps, activation, slope, save_preact] = args;
  constexpr const char* op = "batch_norm_act_fwd";
  check_input(op, x_in);
  if (weight) check_channels(op, "weight", *weight, x_in);
  if (bias) check_channels(op, "bias", *bias, x_in);
  if (residual_in) check_like_x(op, "residual", *residual_in, x_in);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0; got ", eps);
  check_activation(op, activation);
  const at::Tensor x = x_in.contiguous(memory_format_of(x_in));
  const std::optional<at::Tensor> residual =
      residual_in ? std::optional<at::Tensor>(like_x(*residual_in, x)) : std::nullopt;
  BatchNormActFwdResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    result = forward<scalar_t>(x, weight, bias, residual, eps, static_cast<Activation>(activation), slope, save_preact);
  });
  return result;
}

BatchNormActBwdResult batch_norm_act_bwd(const BatchNormActBwdArgs& args) {
  const auto& [grad_out, x_in, weight, mean, invstd, act_saved, activation, slope, saved_is_output, output_mask] = args;
  constexpr const char* op = "batch_norm_act_bwd";
  check_input(op, x_in);
  check_like_x(op, "grad_out", grad_out, x_in);
  check_like_x(op, "act_saved", act_saved, x_in);
  if (weight) check_channels(op, "weight", *weight, x_in);
  check_channels(op, "mean", mean, x_in);
  check_channels(op, "invstd", invstd, x_in);
  check_activation(op, activation);
  TORCH_CHECK(!saved_is_output || derivative_from_output(static_cast<Activation>(activation), slope), op,
              ": saved_is_output needs an activation whose derivative the output gives (none, relu, leaky_relu with "
              "slope > 0); got activation ",
              activation, " with slope ", slope);
  const at::Tensor x = x_in.contiguous(memory_format_of(x_in));
  BatchNormActBwdResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    result = backward<scalar_t>(like_x(grad_out, x), x, weight, mean, invstd, like_x(act_saved, x),
                                static_cast<Activation>(activation), slope, saved_is_output, output_mask);
  });
  return result;
}

}  // namespace bmk::cpu::CPU_CAPABILITY
