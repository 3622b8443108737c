#pragma once
// Launch planning of the CUDA attention kernels, plain C++ (tested on the CPU for every dtype x head
// dim x length, tests/test_cuda_emulator.py): which compiled instantiation runs a problem, its grid,
// threads and shared memory, checked against the grid limits and the device's shared-memory limit.
#include <cstddef>
#include <cstdint>
#include <string>

namespace bmk {

enum class CudaDtype : int { f16 = 0, bf16 = 1, f32 = 2 };

// The compiled instantiations: (dtype, head-dim bucket) -> key block. The bucket holds max(D, Dv).
constexpr int kAttentionHeadBuckets[] = {64, 128, 256};
constexpr int kAttentionBlockM = 64;  // query rows per block: 4 warps x 16
constexpr int kAttentionThreads = 128;
constexpr int64_t kMaxHeadDim = 256;

constexpr int attention_fwd_block_n(CudaDtype dtype, int bucket) {
  // keys per block: the S accumulators (block_n / 2 registers) plus O (bucket / 2) stay under the
  // register budget; f32 also stages P in shared memory, so it takes the smaller block earlier
  if (dtype == CudaDtype::f32) return bucket >= 256 ? 32 : 64;
  return bucket >= 256 ? 32 : 64;
}

constexpr int attention_elem_bytes(CudaDtype dtype) { return dtype == CudaDtype::f32 ? 4 : 2; }

// Row pitch of the shared tiles in elements: the bucket plus 16 bytes, so ldmatrix rows fall in distinct banks.
constexpr int attention_pitch(CudaDtype dtype, int bucket) { return bucket + 16 / attention_elem_bytes(dtype); }

constexpr size_t attention_fwd_shared_bytes(CudaDtype dtype, int bucket) {
  const int block_n = attention_fwd_block_n(dtype, bucket);
  const size_t tiles =
      size_t(kAttentionBlockM + 2 * block_n) * attention_pitch(dtype, bucket) * attention_elem_bytes(dtype);
  // f32: P (16 rows x block_n per warp) goes through shared memory for the SIMT P V product
  const size_t p_stage = dtype == CudaDtype::f32 ? size_t(kAttentionThreads / 32) * 16 * block_n * 4 : 0;
  return tiles + p_stage;
}

struct AttentionFwdPlan {
  CudaDtype dtype = CudaDtype::f32;
  int head_bucket = 0, block_n = 0, threads = kAttentionThreads;
  int64_t grid[3] = {0, 0, 0};  // (query blocks, Hq, B)
  size_t shared_bytes = 0;
  bool vector_loads = false;  // 16-byte cp.async of rows (else element loads)
  bool empty() const { return grid[0] == 0 || grid[1] == 0 || grid[2] == 0; }
};

// The plan for a problem, or the reason there is none (error non-empty). shared_limit: the device's
// opt-in shared memory per block; aligned16: whether q, k, v rows start at 16-byte boundaries.
inline AttentionFwdPlan plan_attention_fwd(CudaDtype dtype, int64_t head_dim, int64_t v_head_dim, int64_t q_len,
                                           int64_t k_len, int64_t batch, int64_t q_heads, size_t shared_limit,
                                           bool aligned16, std::string& error) {
  AttentionFwdPlan plan;
  plan.dtype = dtype;
  error.clear();
  const int64_t widest = head_dim > v_head_dim ? head_dim : v_head_dim;
  if (head_dim < 1 || v_head_dim < 1 || widest > kMaxHeadDim) {
    error = "head dims must be in [1, 256] on CUDA; got D = " + std::to_string(head_dim) +
            ", Dv = " + std::to_string(v_head_dim);
    return plan;
  }
  if (q_len < 0 || k_len < 0 || batch < 0 || q_heads < 0) {
    error = "negative sizes";
    return plan;
  }
  for (int bucket : kAttentionHeadBuckets) {
    if (widest <= bucket) {
      plan.head_bucket = bucket;
      break;
    }
  }
  plan.block_n = attention_fwd_block_n(dtype, plan.head_bucket);
  plan.shared_bytes = attention_fwd_shared_bytes(dtype, plan.head_bucket);
  if (plan.shared_bytes > shared_limit) {
    error = "the head-dim-" + std::to_string(plan.head_bucket) + " kernel needs " + std::to_string(plan.shared_bytes) +
            " bytes of shared memory per block; this device allows " + std::to_string(shared_limit);
    return plan;
  }
  plan.grid[0] = (q_len + kAttentionBlockM - 1) / kAttentionBlockM;
  plan.grid[1] = q_heads;
  plan.grid[2] = batch;
  if (plan.grid[0] > 2147483647 || plan.grid[1] > 65535 || plan.grid[2] > 65535) {
    error = "grid (" + std::to_string(plan.grid[0]) + ", " + std::to_string(plan.grid[1]) + ", " +
            std::to_string(plan.grid[2]) + ") exceeds CUDA's limits (2^31 - 1, 65535, 65535): Lq / 64, Hq, B";
    return plan;
  }
  const int chunk = 16 / attention_elem_bytes(dtype);  // elements per 16-byte copy
  plan.vector_loads = aligned16 && head_dim % chunk == 0 && v_head_dim % chunk == 0;
  return plan;
}

// The backward (SIMT, f32 tiles in shared memory): a dK/dV kernel per (key block, kv head, batch) looping
// over the GQA group and the query blocks in order, and a dQ kernel per (query block, head, batch): no
// atomics, deterministic.
// Keys of a dK/dV block, queries of a dQ block: dK and dV take 2 x block x bucket / 128 registers per thread.
constexpr int attention_bwd_block(int bucket) { return bucket >= 256 ? 16 : 32; }

constexpr size_t attention_bwd_shared_bytes(int bucket) {
  // K, V, Q, dO tiles (block x bucket) and the P and dS tiles (block x block), all f32
  const size_t block = attention_bwd_block(bucket);
  return (4 * block * bucket + 2 * block * block) * 4;
}

struct AttentionBwdPlan {
  CudaDtype dtype = CudaDtype::f32;
  int head_bucket = 0, block = 0, threads = kAttentionThreads;
  int64_t dkdv_grid[3] = {0, 0, 0};  // (key blocks, Hkv, B)
  int64_t dq_grid[3] = {0, 0, 0};    // (query blocks, Hq, B)
  size_t shared_bytes = 0;
};

inline AttentionBwdPlan plan_attention_bwd(CudaDtype dtype, int64_t head_dim, int64_t v_head_dim, int64_t q_len,
                                           int64_t k_len, int64_t batch, int64_t q_heads, int64_t kv_heads,
                                           size_t shared_limit, std::string& error) {
  AttentionBwdPlan plan;
  plan.dtype = dtype;
  const AttentionFwdPlan fwd =
      plan_attention_fwd(dtype, head_dim, v_head_dim, q_len, k_len, batch, q_heads, ~size_t(0), false, error);
  if (!error.empty()) return plan;
  plan.head_bucket = fwd.head_bucket;
  plan.block = attention_bwd_block(plan.head_bucket);
  plan.shared_bytes = attention_bwd_shared_bytes(plan.head_bucket);
  if (plan.shared_bytes > shared_limit) {
    error = "the head-dim-" + std::to_string(plan.head_bucket) + " backward needs " +
            std::to_string(plan.shared_bytes) + " bytes of shared memory per block; this device allows " +
            std::to_string(shared_limit);
    return plan;
  }
  const int64_t blocks = attention_bwd_block(plan.head_bucket);
  plan.dkdv_grid[0] = (k_len + blocks - 1) / blocks, plan.dkdv_grid[1] = kv_heads, plan.dkdv_grid[2] = batch;
  plan.dq_grid[0] = (q_len + blocks - 1) / blocks, plan.dq_grid[1] = q_heads, plan.dq_grid[2] = batch;
  if (plan.dkdv_grid[0] > 2147483647 || plan.dq_grid[0] > 2147483647 || q_heads > 65535 || batch > 65535) {
    error = "backward grids exceed CUDA's limits (2^31 - 1, 65535, 65535): L / block, H, B";
  }
  return plan;
}

}  // namespace bmk
