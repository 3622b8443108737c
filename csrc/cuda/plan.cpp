// The launch planning of the CUDA kernels (csrc/cuda/plan.h) as an operator, so that the tests check
// every plan on the CPU: compiled into every build, with or without CUDA.
#include "cuda/plan.h"

#include <torch/library.h>

#include <vector>

#include "cuda/conv_plan.h"
#include "cuda/gru.h"

namespace bmk {
namespace {

// [head_bucket, block_n, threads, grid x, grid y, grid z, shared bytes, vector loads]; raises the plan's error.
std::vector<int64_t> attention_cuda_plan(int64_t dtype, int64_t head_dim, int64_t v_head_dim, int64_t q_len,
                                         int64_t k_len, int64_t batch, int64_t q_heads, int64_t shared_limit,
                                         bool aligned16) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "attention_cuda_plan: dtype must be 0 (f16), 1 (bf16) or 2 (f32); got ", dtype);
  std::string error;
  const AttentionFwdPlan p = plan_attention_fwd(static_cast<CudaDtype>(dtype), head_dim, v_head_dim, q_len, k_len,
                                                batch, q_heads, static_cast<size_t>(shared_limit), aligned16, error);
  TORCH_CHECK(error.empty(), "bmkernels attention (CUDA kernel): ", error);
  return {p.head_bucket, p.block_n, p.threads, p.grid[0], p.grid[1], p.grid[2], static_cast<int64_t>(p.shared_bytes),
          p.vector_loads};
}

// [epilogue threads, epilogue blocks, grad channels per block, grad threads per channel, grad grid x, grad grid y,
// chunk pixels, grad shared bytes, partial floats]: conv_plan.h's plans for an output of numel elements
// viewed as [outer, channels, inner] with pixels = outer x inner; raises the grad plan's error.
std::vector<int64_t> conv_cuda_plan(int64_t numel, int64_t channels, int64_t inner, int64_t pixels) {
  std::string error;
  const ConvEpiloguePlan e = plan_conv_epilogue(numel);
  const ConvGradPlan g = plan_conv_grad(channels, inner, pixels, error);
  TORCH_CHECK(error.empty(), "bmkernels conv2d (CUDA kernel): ", error);
  return {e.threads,
          e.blocks,
          g.channels_per_block,
          g.threads_per_channel,
          g.grid[0],
          g.grid[1],
          g.chunk_pixels,
          static_cast<int64_t>(g.shared_bytes),
          static_cast<int64_t>(g.partial_floats)};
}

// conv_plan.h's v2 plan: [threads, block m, block n, block k, grid x, grid y, gemm m, gemm k, k tiles, shared bytes],
// or [] where v2 does not take the problem (v1 runs it); raises only for bad arguments.
std::vector<int64_t> conv_igemm_cuda_plan(int64_t dtype, int64_t batch, int64_t channels, int64_t out_channels,
                                          int64_t kernel_h, int64_t kernel_w, int64_t out_h, int64_t out_w,
                                          int64_t groups, bool aligned16) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "conv_igemm_cuda_plan: dtype must be 0 (f16), 1 (bf16) or 2 (f32); got ",
              dtype);
  std::string why;
  const ConvIgemmPlan p = plan_conv_igemm(static_cast<CudaDtype>(dtype), batch, channels, out_channels, kernel_h,
                                          kernel_w, out_h, out_w, groups, aligned16, why);
  if (!why.empty()) return {};
  return {p.threads, p.block_m, p.block_n, p.block_k, p.grid[0],
          p.grid[1], p.gemm_m,  p.gemm_k,  p.k_tiles, static_cast<int64_t>(p.shared_bytes)};
}

// conv_plan.h's reason why v2 does not take a problem ("" where it does).
std::string conv_igemm_cuda_fallback(int64_t dtype, int64_t batch, int64_t channels, int64_t out_channels,
                                     int64_t kernel_h, int64_t kernel_w, int64_t out_h, int64_t out_w, int64_t groups,
                                     bool aligned16) {
  std::string why;
  plan_conv_igemm(static_cast<CudaDtype>(dtype), batch, channels, out_channels, kernel_h, kernel_w, out_h, out_w,
                  groups, aligned16, why);
  return why;
}

// [threads, blocks] of the GRU gate kernels (csrc/cuda/gru.h) for one step; raises the plan's error.
std::vector<int64_t> gru_cuda_plan(int64_t directions, int64_t batch, int64_t hidden) {
  std::string error;
  const GruGatesPlan p = plan_gru_gates(directions, batch, hidden, error);
  TORCH_CHECK(error.empty(), "bmkernels gru (CUDA kernel): ", error);
  return {p.threads, p.blocks};
}

// [threads, slices, units, blocks, weight bytes, shared bytes] of the persistent GRU forward (csrc/cuda/gru.h);
// raises the reason where it does not fit.
std::vector<int64_t> gru_persistent_cuda_plan(int64_t directions, int64_t batch, int64_t hidden, int64_t elem_bytes,
                                              int64_t sms, int64_t shared_limit) {
  std::string why;
  const GruPersistentPlan p =
      plan_gru_persistent(directions, batch, hidden, elem_bytes, sms, static_cast<size_t>(shared_limit), why);
  TORCH_CHECK(why.empty(), "bmkernels gru (CUDA kernel): ", why);
  return {p.threads,
          p.slices,
          p.units,
          p.blocks,
          static_cast<int64_t>(p.weight_bytes),
          static_cast<int64_t>(p.shared_bytes)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bmkernels, m) {
  m.def("gru_cuda_plan(int directions, int batch, int hidden) -> int[]", &gru_cuda_plan);
  m.def(
      "gru_persistent_cuda_plan(int directions, int batch, int hidden, int elem_bytes, int sms, int shared_limit) "
      "-> int[]",
      &gru_persistent_cuda_plan);
  m.def("conv_cuda_plan(int numel, int channels, int inner, int pixels) -> int[]", &conv_cuda_plan);
  m.def(
      "conv_igemm_cuda_plan(int dtype, int batch, int channels, int out_channels, int kernel_h, int kernel_w, "
      "int out_h, int out_w, int groups, bool aligned16) -> int[]",
      &conv_igemm_cuda_plan);
  m.def(
      "conv_igemm_cuda_fallback(int dtype, int batch, int channels, int out_channels, int kernel_h, int kernel_w, "
      "int out_h, int out_w, int groups, bool aligned16) -> str",
      &conv_igemm_cuda_fallback);
  m.def(
      "attention_cuda_plan(int dtype, int head_dim, int v_head_dim, int q_len, int k_len, int batch, int q_heads, "
      "int shared_limit, bool aligned16) -> int[]",
      &attention_cuda_plan);
}

}  // namespace bmk
