#pragma once
// The CUDA attention kernels' interface, plain C++ (no torch, no CUDA header): what the torch glue
// (csrc/cuda/attention.cpp) fills in and launches. Built twice: by nvcc for the GPU (namespace
// bmk::cuda) and by g++ for the SIMT emulator (bmk::cuda_emulated, BMK_CUDA_EMULATOR).
#include <cstddef>
#include <cstdint>

#include "cuda/arch_probe.h"
#include "cuda/config.h"
#include "cuda/plan.h"

namespace bmk::BMK_CUDA_NS {

// Strides are in elements, for the (B, H, L, D) dims (bias and mask: of their (B, Hq, Lq, Lk) expansion,
// 0 where they broadcast). Offsets are computed in int64.
struct AttentionFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                // (B, Hq, Lq) contiguous
  const void* bias;          // q's dtype, or null
  const bool* mask;          // true = keep, or null
  const float* alibi;        // (B, Hq) contiguous, or null
  const int64_t* key_range;  // (B, 2) contiguous [begin, end), or null
  const int64_t* seed;       // one int64 in device memory (dropout only)
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4], bias_stride[4], mask_stride[4];
  int64_t batch, q_heads, kv_heads, q_len, k_len, head_dim, v_head_dim;
  int64_t window_left, window_right, diag_offset;  // saturated (bmk::saturated_window)
  float scale, softcap, dropout_p;
};

// The backward's extra inputs and outputs; fwd holds the forward's arguments.
struct AttentionBwdParams {
  AttentionFwdParams fwd;
  const void* dout;    // grad of out, strides dout_stride
  const float* lse;    // (B, Hq, Lq) contiguous
  const float* delta;  // (B, Hq, Lq): rowsum(dout * out) - grad_lse
  void* dq;            // (B, Hq, Lq, D) contiguous, q's dtype
  void* dk;            // (B, Hkv, Lk, D) contiguous
  void* dv;            // (B, Hkv, Lk, Dv) contiguous
  float* dbias;        // (B, Hq, Lq, Lk) contiguous float32, or null
  int64_t dout_stride[4];
};

// One per instantiation file (attention_fwd_<dtype>_<bucket>.cu, written by generate.py); each returns the
// launch's error code (0: none).
int launch_attention_fwd_f16_64(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_f16_128(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_f16_256(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_bf16_64(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_bf16_128(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_bf16_256(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_f32_64(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_f32_128(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);
int launch_attention_fwd_f32_256(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream);

int launch_attention_bwd_f16_64(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_f16_128(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_f16_256(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_bf16_64(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_bf16_128(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_bf16_256(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_f32_64(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_f32_128(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);
int launch_attention_bwd_f32_256(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream);

// Launches the planned forward instantiation on `stream`.
inline int launch_attention_fwd(const AttentionFwdParams& p, const AttentionFwdPlan& plan, Stream stream) {
  using Launch = int (*)(const AttentionFwdParams&, const AttentionFwdPlan&, Stream);
  static constexpr Launch kTable[3][3] = {
      {launch_attention_fwd_f16_64, launch_attention_fwd_f16_128, launch_attention_fwd_f16_256},
      {launch_attention_fwd_bf16_64, launch_attention_fwd_bf16_128, launch_attention_fwd_bf16_256},
      {launch_attention_fwd_f32_64, launch_attention_fwd_f32_128, launch_attention_fwd_f32_256}};
  const int bucket = plan.head_bucket == 64 ? 0 : plan.head_bucket == 128 ? 1 : 2;
  return kTable[static_cast<int>(plan.dtype)][bucket](p, plan, stream);
}

}  // namespace bmk::BMK_CUDA_NS

namespace bmk::BMK_CUDA_NS {
// Launches the planned backward instantiation (dK/dV kernel, then dQ kernel) on `stream`.
inline int launch_attention_bwd(const AttentionBwdParams& p, const AttentionBwdPlan& plan, Stream stream) {
  using Launch = int (*)(const AttentionBwdParams&, const AttentionBwdPlan&, Stream);
  static constexpr Launch kTable[3][3] = {
      {launch_attention_bwd_f16_64, launch_attention_bwd_f16_128, launch_attention_bwd_f16_256},
      {launch_attention_bwd_bf16_64, launch_attention_bwd_bf16_128, launch_attention_bwd_bf16_256},
      {launch_attention_bwd_f32_64, launch_attention_bwd_f32_128, launch_attention_bwd_f32_256}};
  const int bucket = plan.head_bucket == 64 ? 0 : plan.head_bucket == 128 ? 1 : 2;
  return kTable[static_cast<int>(plan.dtype)][bucket](p, plan, stream);
}
}  // namespace bmk::BMK_CUDA_NS
