#pragma once
// The CUDA GRU kernels' interface, plain C++ (no torch, no CUDA header): what the torch glue
// (csrc/cuda/gru.cpp) fills in and launches. The GEMMs run in ATen (cuBLAS on the GPU): one for the input
// projections of every step and direction, per step one batched GEMM of both directions' hidden
// projections; these kernels are the fused gate math of one step (csrc/common/gru_math.h), one thread per
// (direction, batch row, unit). Direction 0 runs forward in time, direction 1 backwards: at step s it is at
// time s, resp. T - 1 - s (forward), T - 1 - s, resp. s (backward). The state and the workspace are float32;
// projections, outputs and gradients for the GEMMs are in x's dtype.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/arch_probe.h"
#include "cuda/config.h"
#include "cuda/plan.h"

namespace bmk {

constexpr int kGruThreads = 256;
constexpr int64_t kGruWorkspaceGates = 5;  // r, z, n, hn, h_prev per unit, as the CPU op's workspace

struct GruGatesPlan {
  int threads = kGruThreads;
  int64_t blocks = 0;  // one thread per (direction, row, unit)
  bool empty() const { return blocks == 0; }
};

inline GruGatesPlan plan_gru_gates(int64_t directions, int64_t batch, int64_t hidden, std::string& error) {
  GruGatesPlan plan;
  error.clear();
  if (directions < 1 || batch < 0 || hidden < 1) {
    error = "gru gates: directions and hidden size must be >= 1, batch >= 0";
    return plan;
  }
  plan.blocks = (directions * batch * hidden + kGruThreads - 1) / kGruThreads;
  if (plan.blocks > 2147483647) error = "gru gates: " + std::to_string(plan.blocks) + " blocks exceed 2^31 - 1";
  return plan;
}

// The persistent forward (csrc/cuda/gru_persistent.cu), for small batches: one cooperative launch runs every step.
// Each direction's hidden units split into `slices` CTAs (at most one per SM over both directions) of `units`
// units; a CTA keeps the W_hh rows of its units (r, z, n) resident in shared memory with the state h (B, H) of its
// direction, and a grid barrier ends each step.
constexpr int kGruPersistentThreads = 256;

struct GruPersistentPlan {
  int threads = kGruPersistentThreads;
  int64_t slices = 0, units = 0, blocks = 0;  // per direction; blocks = directions x slices
  size_t weight_bytes = 0, shared_bytes = 0;  // W_hh part (16-byte multiple), + the state's B H floats
};

// `why` non-empty: the problem does not fit (the per-step kernels run it). sms: the device's multiprocessors;
// shared_limit: its opt-in shared memory per block; elem_bytes: W_hh's element size.
inline GruPersistentPlan plan_gru_persistent(int64_t directions, int64_t batch, int64_t hidden, int64_t elem_bytes,
                                             int64_t sms, size_t shared_limit, std::string& why) {
  GruPersistentPlan plan;
  why.clear();
  if (directions < 1 || batch < 1 || hidden < 1 || sms < directions || elem_bytes < 1) {
    why = "gru persistent: directions, batch, hidden size and elem_bytes must be >= 1 and sms >= directions";
    return plan;
  }
  const int64_t most = std::min(sms / directions, hidden);  // CTAs per direction
  plan.units = (hidden + most - 1) / most;
  plan.slices = (hidden + plan.units - 1) / plan.units;  // no CTA without units
  plan.blocks = directions * plan.slices;
  plan.weight_bytes = size_t(3 * plan.units * hidden * elem_bytes + 15) / 16 * 16;
  plan.shared_bytes = plan.weight_bytes + size_t(batch * hidden) * 4;
  if (plan.shared_bytes > shared_limit) {
    why = "gru persistent: " + std::to_string(plan.units) + " units' W_hh rows and the state need " +
          std::to_string(plan.shared_bytes) + " bytes of shared memory per CTA; the device allows " +
          std::to_string(shared_limit);
  }
  return plan;
}

}  // namespace bmk

namespace bmk::BMK_CUDA_NS {

struct GruFwdStepParams {
  const void* gi;          // (T B, D 3H): W_ih x of every step and direction, no bias
  const void* gh;          // (D, B, 3H): this step's W_hh h, no bias
  const float* bias;       // (D, 4H): [b_ir + b_hr, b_iz + b_hz, b_in, b_hn], or null
  const float* h;          // (D, B, H) the state
  float* h_next;           // (D, B, H), or null
  void* h_next_lp;         // (D, B, H) in x's dtype (the next step's GEMM operand), or null
  void* out;               // (T, B, D H)
  float* ws;               // (D, T, B, 5H), or null
  const int64_t* lengths;  // (B,): steps at or past a row's length keep the state and output 0; or null
  int64_t steps, batch, hidden, directions, step;
  CudaDtype dtype;
};

struct GruBwdStepParams {
  const void* grad_out;    // (T, B, D H)
  const float* ws;         // (D, T, B, 5H)
  const float* dh;         // (D, B, H): the direct part of dL/dh' (grad_h_n at the first step)
  const void* dh_gemm;     // (D, B, H) in x's dtype: the later step's dgh W_hh, or null at the first step
  float* dh_next;          // (D, B, H): the direct part of dL/dh
  void* dgi;               // (T, B, D, 3H): [d_r, d_z, d_in]
  void* dgh;               // (D, T, B, 3H): [d_r, d_z, d_hn]
  const int64_t* lengths;  // or null
  int64_t steps, batch, hidden, directions, step;
  CudaDtype dtype;
};

struct GruPersistentParams {
  GruFwdStepParams step;  // gi, bias, out, ws, lengths, sizes, dtype (gh, h, h_next, h_next_lp, step unused)
  const void* w_hh;       // (D, 3H, H), x's dtype, dense
  float* state;           // (2, D, B, H): h0 in [0]; step s reads [s % 2] and writes [(s + 1) % 2]
  int64_t slices, units;
  size_t weight_bytes;
};

int launch_gru_fwd_step(const GruFwdStepParams& p, const GruGatesPlan& plan, Stream stream);
int launch_gru_persistent(const GruPersistentParams& p, const GruPersistentPlan& plan, Stream stream);
int launch_gru_bwd_step(const GruBwdStepParams& p, const GruGatesPlan& plan, Stream stream);

}  // namespace bmk::BMK_CUDA_NS
