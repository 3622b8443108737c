#pragma once
// GRU gate math shared by the CPU and CUDA kernels, exactly PyTorch's equations (gate order r, z, n;
// b_hn inside the reset product):
//   r = sigmoid(gi_r + gh_r)   z = sigmoid(gi_z + gh_z)   n = tanh(gi_n + r * hn)   hn = W_hn h + b_hn
//   h' = (1 - z) * n + z * h  (computed as n + z * (h - n))
// gi_* already hold W_i* x + b_i* and gh_r, gh_z hold W_h* h + b_h*. T is a scalar type or a SIMD
// vector type with arithmetic operators; Math supplies exp and tanh for it (ScalarMath for scalars).
#include <cmath>

#include "common/macros.h"

namespace bmk {

struct ScalarMath {
  template <typename T>
  static BMK_HOST_DEVICE T exp(T x) {
    return std::exp(x);
  }
  template <typename T>
  static BMK_HOST_DEVICE T tanh(T x) {
    return std::tanh(x);
  }
};

template <typename Math, typename T>
BMK_HOST_DEVICE T gru_sigmoid(T x) {
  return T(1) / (T(1) + Math::exp(T(0) - x));
}

// The gate activations of one unit and its next state. The forward saves r, z, n and hn for backward.
template <typename Math, typename T>
BMK_HOST_DEVICE void gru_gates_forward(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T hn, T h, T& r, T& z, T& n, T& h_next) {
  r = gru_sigmoid<Math>(gi_r + gh_r);
  z = gru_sigmoid<Math>(gi_z + gh_z);
  n = Math::tanh(gi_n + r * hn);
  h_next = n + z * (h - n);
}

// Backward of one unit from the saved activations, given dh_next = dL/dh'. Outputs the gradients of
// the pre-activations: d_r and d_z (shared by the input and hidden projections), d_in (of gi_n),
// d_hn (of hn = W_hn h + b_hn), and d_h_direct, the part of dL/dh through the z * h term.
template <typename T>
BMK_HOST_DEVICE void gru_gates_backward(T dh_next, T r, T z, T n, T hn, T h, T& d_r, T& d_z, T& d_in, T& d_hn,
                                        T& d_h_direct) {
  const T one(1);
  d_in = dh_next * (one - z) * (one - n * n);
  d_hn = d_in * r;
  d_r = d_in * hn * r * (one - r);
  d_z = dh_next * (h - n) * z * (one - z);
  d_h_direct = dh_next * z;
}

}  // namespace bmk
