// Fused CPU GRU: one cell step, and whole-sequence layers (one or two directions) forward and backward
// (specification: bmkernels/reference/gru.py; gate math: csrc/common/gru_math.h).
//
// Layer forward: the input projection of every step and direction is one GEMM up front; then per step
// each worker multiplies its (batch block x hidden block) of the state by its block of W_hh (packed once
// per call, r/z/n columns of the block side by side) and applies the gate math to that tile while it is in
// cache. Workers stay in one parallel region for the whole sequence and meet at a counter barrier once per
// step (no thread-pool wake-up per step). The workspace keeps r, z, n, hn and the previous state per step.
// Layer backward: per step (reverse order) the gate gradients of each block in one vectorized pass, then
// dh_prev = dgh @ W_hh for the worker's hidden block; weight, bias and input gradients are large GEMMs over
// all steps at the end. bfloat16 runs in float32 (inputs converted once); float64 in float64.
// Compiled once per ISA (setup.py), inside namespace bmk::cpu::CPU_CAPABILITY.
#include "cpu/gru.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/gru_math.h"
#include "cpu/gemm.h"
#include "cpu/scratch.h"

namespace bmk::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp and tanh of a SIMD vector, for the shared gate math. tanh(x) = 2 / (1 + exp(-2x)) - 1: one exp
// instead of Sleef's slower tanh; exact to ~1 ulp of 1 in absolute terms, saturating cleanly at +-1.
struct VecMath {
  template <typename V>
  static V exp(V x) {
    return x.exp();
  }
  template <typename V>
  static V tanh(V x) {
    return V(2) / (V(1) + (V(-2) * x).exp()) - V(1);
  }
};

// Workspace columns per (step, batch row): r, z, n, hn, h_prev, each H wide.
constexpr int64_t kWorkspaceGates = 5;
// Widest hidden block (units) of a worker: its per-step gate tile, (batch block) x (3 * block), stays in
// L2. Blocks are otherwise as wide as the thread count allows: fewer, larger GEMM calls per step.
constexpr int64_t kMaxHiddenBlock = 256;
// Below this many multiply-adds per step, one thread per direction is faster than any barrier.
constexpr int64_t kParallelStepMacs = 100000;
// From this many multiply-adds per step (all directions), the backward's dh_prev GEMM of a step runs as one
// library GEMM over all threads instead of a brgemm per worker block (at B = 64, H = 512 the per-block
// brgemm with K = 3H reached half the library's rate; at B = 32, H = 256 the two were even).
constexpr int64_t kLibraryStepMacs = 1 << 24;
// The cell's dot-product path (no GEMM call, weights read once per row of units) up to this batch.
constexpr int64_t kCellDotMaxBatch = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())).contiguous(); }

// Work split of a step: directions x batch blocks x hidden blocks; a worker owns one block.
struct StepPartition {
  int64_t batch, hidden, directions;
  int64_t batch_block, hidden_block, batch_blocks, hidden_blocks;
  int64_t threads;

  StepPartition(int64_t B, int64_t H, int64_t D) : batch(B), hidden(H), directions(D) {
    const int64_t available = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
    const bool parallel = available > 1 && D * B * 3 * H * H >= kParallelStepMacs;
    const int64_t per_direction = parallel ? std::max<int64_t>(1, available / D) : 1;
    hidden_block = std::min(H, ceil_div(ceil_div(H, std::max(per_direction, ceil_div(H, kMaxHiddenBlock))), 16) * 16);
    hidden_blocks = ceil_div(H, hidden_block);
    // an empty batch still gets one (empty) block: the blocks' row ranges clamp to the batch
    const int64_t rows = std::max<int64_t>(B, 1);
    batch_blocks = std::min(rows, hidden_blocks >= per_direction ? 1 : ceil_div(per_direction, hidden_blocks));
    batch_block = ceil_div(rows, batch_blocks);
    batch_blocks = ceil_div(rows, batch_block);
    // a step too small to split runs on the calling thread: waking another costs more than the work
    threads = parallel ? std::min(available, workers()) : 1;
  }
  int64_t tasks_per_direction() const { return batch_blocks * hidden_blocks; }
  int64_t workers() const { return directions * tasks_per_direction(); }
};

// Rows [b0, b1) and units [j0, j1) of task `task` of a direction.
struct Block {
  int64_t b0, b1, j0, j1;
};

Block block_of(const StepPartition& p, int64_t task) {
  const int64_t hb = task % p.hidden_blocks, bb = task / p.hidden_blocks;
  return {bb * p.batch_block, std::min(p.batch, (bb + 1) * p.batch_block), hb * p.hidden_block,
          std::min(p.hidden, (hb + 1) * p.hidden_block)};
}

// Counter barrier per direction: a thread adds how many of that direction's tasks it finished and waits
// until all tasks of the step are in. Counts, not thread ids, so any grouping of workers onto threads
// (including all on one thread) is correct.
struct alignas(64) StepCounter {
  std::atomic<int64_t> done{0};

  void arrive_and_wait(int64_t count, int64_t target) {
    done.fetch_add(count, std::memory_order_acq_rel);
    int spins = 0;
    while (done.load(std::memory_order_acquire) < target) {
      if (++spins < 4000) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();  // another process may hold the core this worker waits for
      }
    }
  }
};

// Runs fn(d, task, step) for every step, direction and task, workers spread over threads in one parallel
// region. After a step for which synced(step) holds, all tasks of a direction finish it before any of them
// starts the next step.
template <typename Fn, typename Synced>
void run_steps(const StepPartition& p, int64_t steps, const Fn& fn, const Synced& synced) {
  const int64_t per_dir = p.tasks_per_direction(), workers = p.workers();
  std::vector<StepCounter> counters(p.directions);
  at::parallel_for(0, workers, ceil_div(workers, p.threads), [&](int64_t begin, int64_t end) {
    int64_t barriers = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const bool sync = synced(s);
      barriers += sync;
      for (int64_t d = begin / per_dir; d < p.directions && d * per_dir < end; ++d) {
        const int64_t lo = std::max(begin, d * per_dir), hi = std::min(end, (d + 1) * per_dir);
        for (int64_t w = lo; w < hi; ++w) fn(d, w - d * per_dir, s);
        if (sync) counters[d].arrive_and_wait(hi - lo, barriers * per_dir);
      }
    }
    tile_gemm_done();
  });
}

// W_hh (3H, H) of one direction into per-block B operands: block k holds, for units [j0, j1) of width w,
// the (H x 3w) matrix [W_hr^T | W_hz^T | W_hn^T] restricted to those units, row-major.
template <typename T>
void pack_recurrent_weight(const T* w_hh, int64_t H, int64_t hidden_block, T* packed) {
  for (int64_t j0 = 0; j0 < H; j0 += hidden_block) {
    const int64_t w = std::min(hidden_block, H - j0);
    T* block = packed + 3 * H * j0;
    for (int64_t k = 0; k < H; ++k)
      for (int64_t g = 0; g < 3; ++g)
        for (int64_t jj = 0; jj < w; ++jj) block[k * 3 * w + g * w + jj] = w_hh[(g * H + j0 + jj) * H + k];
  }
}

// Gate math of units [0, w) of one batch row: gi (the input projection, no bias), gh_* (the hidden
// projection, no bias), bias (the gate_bias row, or nullptr) and h point at the unit block; writes h_next
// and, when ws != nullptr, the workspace row (r, z, n, hn, h_prev; each stride H apart).
template <typename T>
void gates_forward_row(const T* gi, int64_t H, const T* gh_r, const T* gh_z, const T* gh_n, const T* bias, const T* h,
                       int64_t w, T* h_next, T* out, T* ws) {
  for (int64_t j = 0; j < w; j += Vec<T>::size()) {
    const int64_t n_lanes = std::min<int64_t>(Vec<T>::size(), w - j);
    Vec<T> gi_r = Vec<T>::loadu(gi + j, n_lanes), gi_z = Vec<T>::loadu(gi + H + j, n_lanes);
    Vec<T> gi_n = Vec<T>::loadu(gi + 2 * H + j, n_lanes), hn = Vec<T>::loadu(gh_n + j, n_lanes);
    if (bias != nullptr) {
      gi_r = gi_r + Vec<T>::loadu(bias + j, n_lanes);
      gi_z = gi_z + Vec<T>::loadu(bias + H + j, n_lanes);
      gi_n = gi_n + Vec<T>::loadu(bias + 2 * H + j, n_lanes);
      hn = hn + Vec<T>::loadu(bias + 3 * H + j, n_lanes);
    }
    const Vec<T> hv = Vec<T>::loadu(h + j, n_lanes);
    Vec<T> r, z, n, h_new;
    gru_gates_forward<VecMath>(gi_r, gi_z, gi_n, Vec<T>::loadu(gh_r + j, n_lanes), Vec<T>::loadu(gh_z + j, n_lanes), hn,
                               hv, r, z, n, h_new);
    h_new.store(h_next + j, n_lanes);
    if (out != nullptr) h_new.store(out + j, n_lanes);
    if (ws != nullptr) {
      r.store(ws + j, n_lanes);
      z.store(ws + H + j, n_lanes);
      n.store(ws + 2 * H + j, n_lanes);
      hn.store(ws + 3 * H + j, n_lanes);
      hv.store(ws + 4 * H + j, n_lanes);
    }
  }
}

// The biases as the gate math adds them, (D, 4H): [b_ir + b_hr, b_iz + b_hz, b_in, b_hn] (b_hn stays apart:
// it sits inside the reset product). Added in the gate pass, not by the input GEMM, which then writes
// its (T*B, D*3H) output once instead of first filling it with broadcast biases.
std::optional<at::Tensor> gate_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                    int64_t H) {
  if (!b_ih.has_value()) return std::nullopt;
  at::Tensor bias = at::cat({*b_ih, b_hh->narrow(1, 2 * H, H)}, 1);
  bias.narrow(1, 0, 2 * H).add_(b_hh->narrow(1, 0, 2 * H));
  return bias;
}

template <typename T>
GruLayerFwdResult layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh, const int64_t* lengths, bool save) {
  const int64_t T_len = x.size(0), B = x.size(1), D = w_ih.size(0), H = w_hh.size(2);
  // input projections of every step and direction, one GEMM: (T*B, D*3H)
  at::Tensor gi = cached_empty({T_len * B, D * 3 * H}, x.options());
  at::mm_out(gi, x.reshape({T_len * B, x.size(2)}), w_ih.reshape({D * 3 * H, x.size(2)}).t());
  const auto bias = gate_bias(b_ih, b_hh, H);
  const StepPartition part(B, H, D);
  at::Tensor packed = at::empty({D, H * 3 * H}, x.options());
  at::parallel_for(0, D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d)
      pack_recurrent_weight(w_hh[d].data_ptr<T>(), H, part.hidden_block, packed[d].data_ptr<T>());
  });
  at::Tensor out = at::empty({T_len, B, D * H}, x.options());
  at::Tensor state = at::empty({D, 2, B, H}, x.options());
  state.select(1, 0).copy_(h0);
  at::Tensor ws = save ? cached_empty({D, T_len, B, kWorkspaceGates * H}, x.options()) : at::Tensor();
  const T* gi_p = gi.data_ptr<T>();
  const T* packed_p = packed.data_ptr<T>();
  const T* bias_p = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* out_p = out.data_ptr<T>();
  T* state_p = state.data_ptr<T>();
  T* ws_p = save ? ws.data_ptr<T>() : nullptr;
  const int64_t max_tile = part.batch_block * 3 * part.hidden_block;
  // one scratch tile per worker, allocated once for the whole sequence
  std::vector<T> tiles(part.workers() * max_tile);

  run_steps(
      part, T_len,
      [&](int64_t d, int64_t task, int64_t s) {
        const int64_t t = d == 0 ? s : T_len - 1 - s;
        const Block blk = block_of(part, task);
        const int64_t w = blk.j1 - blk.j0, rows = blk.b1 - blk.b0;
        const T* cur = state_p + (d * 2 + (s & 1)) * B * H;
        T* next = state_p + (d * 2 + ((s + 1) & 1)) * B * H;
        T* tile = tiles.data() + (d * part.tasks_per_direction() + task) * max_tile;
        tile_gemm<T>(rows, 3 * w, H, cur + blk.b0 * H, H, packed_p + d * H * 3 * H + 3 * H * blk.j0, 3 * w, tile, 3 * w,
                     false);
        for (int64_t b = blk.b0; b < blk.b1; ++b) {
          const int64_t row = t * B + b;
          T* out_row = out_p + row * D * H + d * H + blk.j0;
          T* next_row = next + b * H + blk.j0;
          const T* cur_row = cur + b * H + blk.j0;
          T* ws_row = save ? ws_p + ((d * T_len + t) * B + b) * kWorkspaceGates * H + blk.j0 : nullptr;
          if (lengths != nullptr && t >= lengths[b]) {  // past this sequence's end: state kept, output 0
            std::copy(cur_row, cur_row + w, next_row);
            std::fill(out_row, out_row + w, T(0));
            if (ws_row != nullptr)
              for (int64_t g = 0; g < kWorkspaceGates; ++g) std::fill(ws_row + g * H, ws_row + g * H + w, T(0));
            continue;
          }
          const T* tile_row = tile + (b - blk.b0) * 3 * w;
          gates_forward_row<T>(gi_p + row * D * 3 * H + d * 3 * H + blk.j0, H, tile_row, tile_row + w, tile_row + 2 * w,
                               bias_p == nullptr ? nullptr : bias_p + d * 4 * H + blk.j0, cur_row, w, next_row, out_row,
                               ws_row);
        }
      },
      [](int64_t) { return true; });  // the next step's GEMM reads every block's new state
  at::Tensor h_n = state.select(1, T_len & 1).clone();
  return {out, h_n, save ? ws : at::empty({0}, x.options())};
}

// Sum of a vector's lanes by shuffles (a store and a scalar loop cost more than the unit's FMAs here).
template <typename T>
T lane_sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
}

// The three gate pre-activations of one unit: dot products of v (length n) with rows 0, H and 2H of w
// (row length n), six independent FMA chains so the loop is not latency-bound.
template <typename T>
void gate_dots(const T* v, const T* w, int64_t H, int64_t n, T out[3]) {
  const T* rows[3] = {w, w + H * n, w + 2 * H * n};
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[4][3];
  for (auto& a : acc)
    for (auto& g : a) g = Vec<T>(T(0));
  int64_t k = 0;
  for (; k + 4 * V <= n; k += 4 * V) {
    for (int u = 0; u < 4; ++u) {
      const Vec<T> vu = Vec<T>::loadu(v + k + u * V);
      for (int g = 0; g < 3; ++g) acc[u][g] = at::vec::fmadd(vu, Vec<T>::loadu(rows[g] + k + u * V), acc[u][g]);
    }
  }
  for (; k + V <= n; k += V) {
    const Vec<T> v0 = Vec<T>::loadu(v + k);
    for (int g = 0; g < 3; ++g) acc[0][g] = at::vec::fmadd(v0, Vec<T>::loadu(rows[g] + k), acc[0][g]);
  }
  for (int g = 0; g < 3; ++g) {
    out[g] = lane_sum((acc[0][g] + acc[1][g]) + (acc[2][g] + acc[3][g]));
    for (int64_t kk = k; kk < n; ++kk) out[g] += v[kk] * rows[g][kk];
  }
}

// Small batches: each unit's gate pre-activations straight from the weight rows (the rows stay in L1
// across the batch), then the vectorized gate math over the thread's units. Units are split over threads
// in fixed halves, so each core keeps reading the same part of the weights from its own cache from call
// to call.
template <typename T>
void cell_forward_dots(const T* x, const T* h, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh, int64_t B,
                       int64_t I, int64_t H, T* h_next, T* ws) {
  const int64_t grain = std::max<int64_t>(16, kParallelStepMacs / std::max<int64_t>(1, 3 * B * (I + H)));
  std::vector<T> projections(2 * B * 3 * H);  // gi and gh with biases, (B, 3H) each
  T* gi = projections.data();
  T* gh = gi + B * 3 * H;
  at::parallel_for(0, H, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t b = 0; b < B; ++b) {
        T dots_i[3], dots_h[3];
        gate_dots(x + b * I, w_ih + j * I, H, I, dots_i);
        gate_dots(h + b * H, w_hh + j * H, H, H, dots_h);
        for (int64_t g = 0; g < 3; ++g) {
          gi[b * 3 * H + g * H + j] = dots_i[g] + (b_ih != nullptr ? b_ih[g * H + j] : T(0));
          gh[b * 3 * H + g * H + j] = dots_h[g] + (b_hh != nullptr ? b_hh[g * H + j] : T(0));
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* gh_row = gh + b * 3 * H + j0;
      gates_forward_row<T>(gi + b * 3 * H + j0, H, gh_row, gh_row + H, gh_row + 2 * H, nullptr, h + b * H + j0, j1 - j0,
                           h_next + b * H + j0, nullptr, ws == nullptr ? nullptr : ws + b * kWorkspaceGates * H + j0);
    }
  });
}

template <typename T>
GruCellFwdResult cell_forward(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool save) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  at::Tensor h_next = at::empty({B, H}, x.options());
  at::Tensor ws = at::empty({save ? B : 0, kWorkspaceGates * H}, x.options());
  T* ws_p = save ? ws.data_ptr<T>() : nullptr;
  if (B <= kCellDotMaxBatch) {
    cell_forward_dots<T>(x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                         b_ih.has_value() ? b_ih->data_ptr<T>() : nullptr,
                         b_hh.has_value() ? b_hh->data_ptr<T>() : nullptr, B, I, H, h_next.data_ptr<T>(), ws_p);
    return {h_next, ws};
  }
  const at::Tensor gi = at::mm(x, w_ih.t()), gh = at::mm(h, w_hh.t());
  const auto bias = gate_bias(b_ih.has_value() ? std::optional(b_ih->unsqueeze(0)) : std::nullopt,
                              b_hh.has_value() ? std::optional(b_hh->unsqueeze(0)) : std::nullopt, H);
  const T* gi_p = gi.data_ptr<T>();
  const T* gh_p = gh.data_ptr<T>();
  const T* h_p = h.data_ptr<T>();
  const T* bias_p = bias.has_value() ? bias->template data_ptr<T>() : nullptr;
  T* h_next_p = h_next.data_ptr<T>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* gh_row = gh_p + b * 3 * H;
      gates_forward_row<T>(gi_p + b * 3 * H, H, gh_row, gh_row + H, gh_row + 2 * H, bias_p, h_p + b * H, H,
                           h_next_p + b * H, nullptr, save ? ws_p + b * kWorkspaceGates * H : nullptr);
    }
  });
  return {h_next, ws};
}

// Gate gradients of units [0, w) of one batch row (pointers at the unit block): dh holds dL/dh' on
// entry and the direct part of dL/dh on exit; writes [d_r, d_z, d_in] to dgi and [d_r, d_z, d_hn] to dgh.
template <typename T>
void gates_backward_row(const T* ws, int64_t H, const T* grad_out, T* dh, int64_t w, T* dgi, T* dgh) {
  for (int64_t j = 0; j < w; j += Vec<T>::size()) {
    const int64_t n_lanes = std::min<int64_t>(Vec<T>::size(), w - j);
    const Vec<T> g = Vec<T>::loadu(dh + j, n_lanes) + Vec<T>::loadu(grad_out + j, n_lanes);
    Vec<T> d_r, d_z, d_in, d_hn, d_h;
    gru_gates_backward(g, Vec<T>::loadu(ws + j, n_lanes), Vec<T>::loadu(ws + H + j, n_lanes),
                       Vec<T>::loadu(ws + 2 * H + j, n_lanes), Vec<T>::loadu(ws + 3 * H + j, n_lanes),
                       Vec<T>::loadu(ws + 4 * H + j, n_lanes), d_r, d_z, d_in, d_hn, d_h);
    d_r.store(dgi + j, n_lanes);
    d_z.store(dgi + H + j, n_lanes);
    d_in.store(dgi + 2 * H + j, n_lanes);
    d_r.store(dgh + j, n_lanes);
    d_z.store(dgh + H + j, n_lanes);
    d_hn.store(dgh + 2 * H + j, n_lanes);
    d_h.store(dh + j, n_lanes);
  }
}

template <typename T>
GruLayerBwdResult layer_backward(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& x,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh, const int64_t* lengths,
                                 const at::Tensor& ws, bool has_bias) {
  const int64_t T_len = x.size(0), B = x.size(1), I = x.size(2), D = w_ih.size(0), H = w_hh.size(2);
  const StepPartition part(B, H, D);
  at::Tensor dgi = cached_empty({T_len, B, D, 3 * H}, x.options());
  at::Tensor dgh = cached_empty({D, T_len, B, 3 * H}, x.options());
  at::Tensor dh = at::empty({D, 2, B, H}, x.options());
  dh.select(1, 0).copy_(grad_h_n);
  const T* go_p = grad_out.data_ptr<T>();
  const T* ws_p = ws.data_ptr<T>();
  const T* w_hh_p = w_hh.data_ptr<T>();
  T* dgi_p = dgi.data_ptr<T>();
  T* dgh_p = dgh.data_ptr<T>();
  T* dh_p = dh.data_ptr<T>();

  // gate gradients of rows [b0, b1), units [j0, j1) of direction d at reverse step s: reads dL/dh' from the
  // `cur` half of dh, writes the direct part of dL/dh_prev to the `next` half
  auto gate_grads = [&](int64_t d, int64_t s, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
    const int64_t t = d == 0 ? T_len - 1 - s : s, w = j1 - j0;
    const T* cur = dh_p + (d * 2 + (s & 1)) * B * H;
    T* next = dh_p + (d * 2 + ((s + 1) & 1)) * B * H;
    T* dgh_t = dgh_p + (d * T_len + t) * B * 3 * H;
    for (int64_t b = b0; b < b1; ++b) {
      T* dgi_row = dgi_p + ((t * B + b) * D + d) * 3 * H + j0;
      T* dgh_row = dgh_t + b * 3 * H + j0;
      T* next_row = next + b * H + j0;
      const T* cur_row = cur + b * H + j0;
      std::copy(cur_row, cur_row + w, next_row);
      if (lengths != nullptr && t >= lengths[b]) {  // past the end: the state (and its gradient) passes through
        for (int64_t g = 0; g < 3; ++g) {
          std::fill(dgi_row + g * H, dgi_row + g * H + w, T(0));
          std::fill(dgh_row + g * H, dgh_row + g * H + w, T(0));
        }
        continue;
      }
      gates_backward_row<T>(ws_p + ((d * T_len + t) * B + b) * kWorkspaceGates * H + j0, H,
                            go_p + (t * B + b) * D * H + d * H + j0, next_row, w, dgi_row, dgh_row);
    }
  };
  if (part.threads > 1 && D * B * 3 * H * H >= kLibraryStepMacs) {
    // large steps: the gate pass split over rows, then dh_prev += dgh_t @ W_hh as one library GEMM per
    // direction over all threads (brgemm on a worker's W_hh column block ran at half that rate)
    const int64_t rows = D * B;
    for (int64_t s = 0; s < T_len; ++s) {
      at::parallel_for(0, rows, ceil_div(rows, part.threads), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) gate_grads(r / B, s, r % B, r % B + 1, 0, H);
      });
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = d == 0 ? T_len - 1 - s : s;
        dh[d][(s + 1) & 1].addmm_(dgh[d][t], w_hh[d]);
      }
    }
  } else {
    run_steps(
        part, 2 * T_len,
        [&](int64_t d, int64_t task, int64_t phase) {
          // two phases per step: gate gradients of the block, then (after the barrier) dh_prev for it
          const int64_t s = phase / 2, t = d == 0 ? T_len - 1 - s : s;
          const Block blk = block_of(part, task);
          if (phase % 2 == 0) {
            gate_grads(d, s, blk.b0, blk.b1, blk.j0, blk.j1);
          } else {
            T* next = dh_p + (d * 2 + ((s + 1) & 1)) * B * H;
            tile_gemm<T>(blk.b1 - blk.b0, blk.j1 - blk.j0, 3 * H, dgh_p + ((d * T_len + t) * B + blk.b0) * 3 * H, 3 * H,
                         w_hh_p + d * 3 * H * H + blk.j0, H, next + blk.b0 * H + blk.j0, H, true);
          }
          // a block's dh_prev GEMM reads the gate gradients of all blocks of its rows; the next step's gate
          // gradients read only the block's own dh_prev, so no barrier after the GEMM
        },
        [](int64_t phase) { return phase % 2 == 0; });
  }

  const at::Tensor dgi2 = dgi.view({T_len * B, D * 3 * H});
  at::Tensor dx = at::mm(dgi2, w_ih.reshape({D * 3 * H, I})).view({T_len, B, I});
  at::Tensor dw_ih = at::mm(dgi2.t(), x.reshape({T_len * B, I})).view({D, 3 * H, I});
  const at::Tensor h_prev = ws.view({D, T_len * B, kWorkspaceGates * H}).narrow(2, 4 * H, H);
  at::Tensor dw_hh = at::bmm(dgh.view({D, T_len * B, 3 * H}).transpose(1, 2), h_prev);
  at::Tensor dh0 = dh.select(1, T_len & 1).clone();
  at::Tensor db_ih = has_bias ? dgi.view({T_len * B, D, 3 * H}).sum(0) : at::empty({0}, x.options());
  at::Tensor db_hh = has_bias ? dgh.view({D, T_len * B, 3 * H}).sum(1) : at::empty({0}, x.options());
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

void check_layer_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 3 && w_ih.dim() == 3 && w_hh.dim() == 3,
              "gru_layer: expected x (T, B, I), h0 (D, B, H), w_ih (D, 3H, I), w_hh (D, 3H, H)");
  const int64_t D = w_ih.size(0), H = w_hh.size(2);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "gru_layer: x must be float32, float64 or bfloat16; got ", dtype);
  TORCH_CHECK(h0.scalar_type() == dtype && w_ih.scalar_type() == dtype && w_hh.scalar_type() == dtype,
              "gru_layer: h0, w_ih, w_hh must have x's dtype ", dtype, "; got ", h0.scalar_type(), ", ",
              w_ih.scalar_type(), ", ", w_hh.scalar_type());
  TORCH_CHECK(D == 1 || D == 2, "gru_layer: 1 or 2 directions; got ", D);
  TORCH_CHECK(H >= 1, "gru_layer: hidden size must be >= 1; got w_hh ", w_hh.sizes());
  TORCH_CHECK(x.size(0) >= 1, "gru_layer: sequence length must be >= 1");
  TORCH_CHECK(w_ih.sizes() == at::IntArrayRef({D, 3 * H, x.size(2)}) && w_hh.sizes() == at::IntArrayRef({D, 3 * H, H}),
              "gru_layer: weight shapes ", w_ih.sizes(), ", ", w_hh.sizes(), " do not match x ", x.sizes());
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({D, x.size(1), H}), "gru_layer: h0 must be (D, B, H) = (", D, ", ",
              x.size(1), ", ", H, "); got ", h0.sizes());
  for (const auto& [name, bias] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
    if (bias->has_value()) {
      TORCH_CHECK((*bias)->sizes() == at::IntArrayRef({D, 3 * H}) && (*bias)->scalar_type() == dtype,
                  "gru_layer: ", name, " must be ", dtype, " of shape (D, 3H) = (", D, ", ", 3 * H, "); got ",
                  (*bias)->scalar_type(), " ", (*bias)->sizes());
    }
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == x.size(1),
                "gru_layer: lengths must be int64 (B,) = (", x.size(1), ",); got ", lengths->scalar_type(), " ",
                lengths->sizes());
    // the kernels index time steps by them
    const bool in_range = ((*lengths >= 0) & (*lengths <= x.size(0))).all().item<bool>();
    TORCH_CHECK(in_range, "gru_layer: lengths must lie in [0, T] = [0, ", x.size(0), "]; got ", *lengths);
  }
}

std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// The cell's argument checks, with the errors of bmkernels.gru_cell (which leaves them to the kernel on its
// fast path): ValueError for shapes, TypeError for dtypes, each naming the argument.
void check_cell_args(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  const auto dtype = x.scalar_type();
  const std::string dtype_name = "torch." + std::string(c10::getDtypeNames(dtype).first);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "gru_cell: x must be float32, float64 or bfloat16; got ", dtype_name);
  TORCH_CHECK_VALUE(x.dim() == 2, "gru_cell: x must be (B, I) or unbatched (I,); got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(b_ih.has_value() == b_hh.has_value(), "gru_cell: pass both b_ih and b_hh or neither");
  TORCH_CHECK_VALUE(w_hh.dim() == 2 && w_hh.size(0) == 3 * w_hh.size(1) && w_hh.size(1) > 0,
                    "gru_cell: w_hh must have shape (3H, H) with H >= 1; got ", shape_str(w_hh.sizes()));
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1);
  const std::pair<const char*, const at::Tensor*> args[] = {{"h", &h},
                                                            {"w_ih", &w_ih},
                                                            {"w_hh", &w_hh},
                                                            {"b_ih", b_ih ? &*b_ih : nullptr},
                                                            {"b_hh", b_hh ? &*b_hh : nullptr}};
  const std::vector<int64_t> shapes[] = {{B, H}, {3 * H, I}, {3 * H, H}, {3 * H}, {3 * H}};
  for (size_t i = 0; i < 5; ++i) {
    const auto& [name, t] = args[i];
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, "gru_cell: ", name, " must have the input's dtype ", dtype_name,
                     "; got torch.", c10::getDtypeNames(t->scalar_type()).first);
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(shapes[i]), "gru_cell: ", name, " must have shape ",
                      shape_str(shapes[i]), "; got ", shape_str(t->sizes()));
  }
}

std::optional<at::Tensor> opt_compute(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(as_compute(*t)) : std::nullopt;
}

std::optional<at::Tensor> lengths_contiguous(const std::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? std::optional<at::Tensor>(lengths->contiguous()) : std::nullopt;
}

}  // namespace

GruCellFwdResult gru_cell_fwd(const GruCellFwdArgs& args) {
  const auto& [x, h, w_ih, w_hh, b_ih, b_hh, save_workspace] = args;
  check_cell_args(x, h, w_ih, w_hh, b_ih, b_hh);
  const bool fast = x.scalar_type() == at::kFloat && x.is_contiguous() && h.is_contiguous() && w_ih.is_contiguous() &&
                    w_hh.is_contiguous() && (!b_ih || b_ih->is_contiguous()) && (!b_hh || b_hh->is_contiguous());
  if (fast) {
    auto [h_next, ws] = cell_forward<float>(x, h, w_ih, w_hh, b_ih, b_hh, save_workspace);
    return {h_next, ws};
  }
  const auto xc = as_compute(x), hc = as_compute(h), wi = as_compute(w_ih), wh = as_compute(w_hh);
  const auto bi = opt_compute(b_ih), bh = opt_compute(b_hh);
  auto [h_next, ws] = xc.scalar_type() == at::kDouble ? cell_forward<double>(xc, hc, wi, wh, bi, bh, save_workspace)
                                                      : cell_forward<float>(xc, hc, wi, wh, bi, bh, save_workspace);
  return {h_next.to(x.scalar_type()), ws};
}

GruLayerFwdResult gru_layer_fwd(const GruLayerFwdArgs& args) {
  const auto& [x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save_workspace] = args;
  check_layer_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths);
  const auto xc = as_compute(x), hc = as_compute(h0), wi = as_compute(w_ih), wh = as_compute(w_hh);
  const auto bi = opt_compute(b_ih), bh = opt_compute(b_hh);
  const auto len = lengths_contiguous(lengths);
  const int64_t* len_p = len.has_value() ? len->data_ptr<int64_t>() : nullptr;
  auto [out, h_n, ws] = xc.scalar_type() == at::kDouble
                            ? layer_forward<double>(xc, hc, wi, wh, bi, bh, len_p, save_workspace)
                            : layer_forward<float>(xc, hc, wi, wh, bi, bh, len_p, save_workspace);
  return {out.to(x.scalar_type()), h_n.to(x.scalar_type()), ws};
}

GruLayerBwdResult gru_layer_bwd(const GruLayerBwdArgs& args) {
  const auto& [grad_out, grad_h_n, x, h0, w_ih, w_hh, lengths, workspace, has_bias] = args;
  check_layer_args(x, h0, w_ih, w_hh, std::nullopt, std::nullopt, lengths);
  const int64_t T_len = x.size(0), B = x.size(1), D = w_ih.size(0), H = w_hh.size(2);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T_len, B, D * H}), "gru_layer_bwd: grad_out must be (T, B, D*H) = (",
              T_len, ", ", B, ", ", D * H, "); got ", grad_out.sizes());
  TORCH_CHECK(grad_h_n.sizes() == at::IntArrayRef({D, B, H}), "gru_layer_bwd: grad_h_n must be (D, B, H) = (", D, ", ",
              B, ", ", H, "); got ", grad_h_n.sizes());
  TORCH_CHECK(workspace.sizes() == at::IntArrayRef({D, T_len, B, kWorkspaceGates * H}),
              "gru_layer_bwd: workspace must be (D, T, B, 5H); got ", workspace.sizes());
  const at::ScalarType dtype = x.scalar_type(), ws_dtype = compute_type(dtype);
  TORCH_CHECK(grad_out.scalar_type() == dtype && grad_h_n.scalar_type() == dtype,
              "gru_layer_bwd: grad_out and grad_h_n must have x's dtype ", dtype, "; got ", grad_out.scalar_type(),
              ", ", grad_h_n.scalar_type());
  TORCH_CHECK(workspace.scalar_type() == ws_dtype, "gru_layer_bwd: workspace must be the forward's ", ws_dtype,
              " workspace; got ", workspace.scalar_type());
  const auto xc = as_compute(x), wi = as_compute(w_ih), wh = as_compute(w_hh);
  const auto go = as_compute(grad_out), ghn = as_compute(grad_h_n), ws = as_compute(workspace);
  const auto len = lengths_contiguous(lengths);
  const int64_t* len_p = len.has_value() ? len->data_ptr<int64_t>() : nullptr;
  auto grads = xc.scalar_type() == at::kDouble ? layer_backward<double>(go, ghn, xc, wi, wh, len_p, ws, has_bias)
                                               : layer_backward<float>(go, ghn, xc, wi, wh, len_p, ws, has_bias);
  auto [dx, dh0, dw_ih, dw_hh, db_ih, db_hh] = grads;
  return {dx.to(x.scalar_type()),       dh0.to(h0.scalar_type()),     dw_ih.to(w_ih.scalar_type()),
          dw_hh.to(w_hh.scalar_type()), db_ih.to(w_ih.scalar_type()), db_hh.to(w_hh.scalar_type())};
}

}  // namespace bmk::cpu::CPU_CAPABILITY
