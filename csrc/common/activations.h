#pragma once
// Pointwise activations of the fused conv epilogue and their derivatives, shared by every kernel
// (specification: bmkernels/reference/conv.py). T is the accumulation type (float or double).
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace bmk {

// Activation codes of the conv2d_fwd / conv2d_bwd schemas (bmkernels/ops/conv.py maps the names).
// New codes are appended (never renumbered): the schemas' callers and every backend share them.
enum class Activation : int64_t {
  none = 0,
  relu = 1,
  leaky_relu = 2,
  gelu = 3,
  gelu_tanh = 4,
  silu = 5,
  relu6 = 6,
  hardswish = 7,
};
constexpr int64_t kLastActivation = static_cast<int64_t>(Activation::hardswish);

template <typename T>
BMK_HOST_DEVICE T activation_forward(Activation act, T z, T slope) {
  switch (act) {
    case Activation::relu:
      return z <= T(0) ? T(0) : z;  // NaN stays NaN, as in torch.relu
    case Activation::leaky_relu:
      return z > T(0) ? z : z * slope;
    case Activation::gelu:
      return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Activation::gelu_tanh: {
      const T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + std::tanh(inner));
    }
    case Activation::silu:
      return z / (T(1) + std::exp(-z));
    case Activation::relu6:  // NaN stays NaN, as F.relu6
      return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case Activation::hardswish: {  // torch's order of operations
      const T t = z + T(3);
      return z * (t < T(0) ? T(0) : (t > T(6) ? T(6) : t)) / T(6);
    }
    default:
      return z;
  }
}

// d act(z) / dz.
template <typename T>
BMK_HOST_DEVICE T activation_derivative(Activation act, T z, T slope) {
  switch (act) {
    case Activation::relu:
      return z <= T(0) ? T(0) : T(1);  // 1 at NaN, as torch's threshold_backward
    case Activation::leaky_relu:
      return z > T(0) ? T(1) : slope;
    case Activation::gelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
      const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * z * z);
      return cdf + z * pdf;
    }
    case Activation::gelu_tanh: {
      const T k = T(0.79788456080286535588);
      const T t = std::tanh(k * (z + T(0.044715) * z * z * z));
      // beyond |z| = 1000 tanh is exactly +-1 and the second term 0: a capped z2 keeps it 0 * finite, not 0 * inf
      const T z_capped = z > T(1000) ? T(1000) : (z < T(-1000) ? T(-1000) : z);
      const T z2 = z_capped * z_capped;
      return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * z2);
    }
    case Activation::silu: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case Activation::relu6:  // torch's hardtanh_backward: 0 at exactly 0 and 6 (1 for NaN)
      return (z <= T(0) || z >= T(6)) ? T(0) : T(1);
    case Activation::hardswish:  // torch's hardswish_backward: 0 at -3, 1 at 3
      return z <= T(-3) ? T(0) : (z < T(3) ? z / T(3) + T(0.5) : T(1));
    default:
      return T(1);
  }
}

// Whether the derivative can be read off the activation's output y instead of its input z
// (y > 0 exactly where z > 0), so the forward need not save z.
BMK_HOST_DEVICE bool derivative_from_output(Activation act, double slope) {
  return act == Activation::none || act == Activation::relu || (act == Activation::leaky_relu && slope > 0);
}

// d act / dz given the output y = act(z), for the activations where derivative_from_output holds.
template <typename T>
BMK_HOST_DEVICE T activation_derivative_from_output(Activation act, T y, T slope) {
  if (act == Activation::none) return T(1);
  if (act == Activation::relu) return y <= T(0) ? T(0) : T(1);  // 1 at NaN, as torch's threshold_backward
  return y > T(0) ? T(1) : slope;
}

}  // namespace bmk
