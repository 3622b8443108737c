#pragma once
// The forward gate math of one GRU unit at one step, shared by the per-step gate kernel (gru_kernels.cu) and the
// persistent kernel (gru_persistent.cu): gates from the two projections (csrc/common/gru_math.h), the output, the
// workspace for the backward; lengths keep the state past a row's end. float32 math.
#include "common/gru_math.h"
#include "cuda/arch.cuh"
#include "cuda/elementwise.cuh"
#include "cuda/gru.h"

namespace bmk::BMK_CUDA_NS {

// Unit j of batch row b, direction d, at step `step` (time step or T - 1 - step), from the state h and the hidden
// projections gh_r, gh_z, gh_n (W_hh h, no bias): writes p.out and p.ws, returns h'.
template <typename T>
BMK_DEVICE float gru_unit_forward(const GruFwdStepParams& p, int64_t d, int64_t b, int64_t j, int64_t step, float h,
                                  float gh_r, float gh_z, float gh_n) {
  const int64_t H = p.hidden, B = p.batch, D = p.directions;
  const int64_t t = d == 0 ? step : p.steps - 1 - step;
  float h_new = h, out = 0.0f, r = 0.0f, z = 0.0f, n = 0.0f, hn = 0.0f;
  const bool live = !p.lengths || t < p.lengths[b];
  if (live) {
    const int64_t gi = (t * B + b) * D * 3 * H + d * 3 * H + j;
    const float* bias = p.bias ? p.bias + d * 4 * H + j : nullptr;
    float gi_r = load<T>(p.gi, gi), gi_z = load<T>(p.gi, gi + H), gi_n = load<T>(p.gi, gi + 2 * H);
    hn = gh_n;
    if (bias) gi_r += bias[0], gi_z += bias[H], gi_n += bias[2 * H], hn += bias[3 * H];
    gru_gates_forward<ScalarMath>(gi_r, gi_z, gi_n, gh_r, gh_z, hn, h, r, z, n, h_new);
    out = h_new;
  }
  store<T>(p.out, (t * B + b) * D * H + d * H + j, out);
  if (p.ws) {
    float* ws = p.ws + ((d * p.steps + t) * B + b) * kGruWorkspaceGates * H + j;
    ws[0] = r, ws[H] = z, ws[2 * H] = n, ws[3 * H] = hn, ws[4 * H] = live ? h : 0.0f;
  }
  return h_new;
}

}  // namespace bmk::BMK_CUDA_NS
