#pragma once
// Launch planning of the CUDA conv2d kernels (csrc/cuda/conv.h), plain C++, tested on the CPU through
// torch.ops.bmkernels.conv_cuda_plan (tests/cuda/test_cuda_emulator_conv.py): grids, chunking, limits.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/plan.h"

namespace bmk {

constexpr int kConvThreads = 256;
constexpr int64_t kConvEpilogueItems = 4;        // elements per thread and grid-stride pass (memory-bound)
constexpr int64_t kConvMaxBlocks = 1 << 16;      // the epilogue's grid-stride loop covers the rest
constexpr int kConvChannelTile = 32;             // grad pass, channels_last: a warp's lanes over 32 channels
constexpr int64_t kConvGradPixelsPerThread = 8;  // grad pass: least pixels a thread sums per chunk
constexpr int64_t kConvMaxChunks = 1024;         // grad pass: most pixel chunks (partial sums: chunks x C floats)

struct ConvEpiloguePlan {
  int threads = kConvThreads;
  int64_t blocks = 0;
  bool empty() const { return blocks == 0; }
};

inline ConvEpiloguePlan plan_conv_epilogue(int64_t numel) {
  ConvEpiloguePlan plan;
  const int64_t per_block = kConvThreads * kConvEpilogueItems;
  plan.blocks = numel <= 0 ? 0 : std::min<int64_t>((numel + per_block - 1) / per_block, kConvMaxBlocks);
  return plan;
}

// Grid (channel tiles, pixel chunks). A block's threads split into channels_per_block channel lanes x
// threads_per_channel pixel lanes: channels_last (inner == 1) reads 32 consecutive channels per warp, NCHW
// 256 consecutive pixels of one channel plane; each thread sums its pixels, the block reduces in shared memory.
struct ConvGradPlan {
  int threads = kConvThreads, channels_per_block = 0, threads_per_channel = 0;
  int64_t grid[2] = {0, 0};  // (channel tiles, chunks)
  int64_t chunk_pixels = 0;
  size_t shared_bytes = 0, partial_floats = 0;
  bool empty() const { return grid[0] == 0 || grid[1] == 0; }
};

inline ConvGradPlan plan_conv_grad(int64_t channels, int64_t inner, int64_t pixels, std::string& error) {
  ConvGradPlan plan;
  error.clear();
  if (channels < 0 || inner < 1 || pixels < 0) {
    error = "conv grad pass: channels and pixels must be >= 0 and inner >= 1";
    return plan;
  }
  plan.channels_per_block = inner == 1 ? kConvChannelTile : 1;
  plan.threads_per_channel = kConvThreads / plan.channels_per_block;
  plan.shared_bytes = size_t(kConvThreads) * 4;
  if (channels == 0 || pixels == 0) return plan;
  const int64_t least = plan.threads_per_channel * kConvGradPixelsPerThread;
  const int64_t wanted = (pixels + kConvMaxChunks - 1) / kConvMaxChunks;
  // whole pixel lanes per chunk
  plan.chunk_pixels =
      std::max(least, (wanted + plan.threads_per_channel - 1) / plan.threads_per_channel * plan.threads_per_channel);
  plan.grid[0] = (channels + plan.channels_per_block - 1) / plan.channels_per_block;
  plan.grid[1] = (pixels + plan.chunk_pixels - 1) / plan.chunk_pixels;
  plan.partial_floats = size_t(plan.grid[1]) * size_t(channels);
  if (plan.grid[0] > 2147483647 || plan.grid[1] > 65535) {
    error = "conv grad pass: grid (" + std::to_string(plan.grid[0]) + ", " + std::to_string(plan.grid[1]) +
            ") exceeds CUDA's limits (2^31 - 1, 65535)";
  }
  return plan;
}

// v2, the implicit-GEMM forward (conv.h's ConvIgemmParams): 4 warps x 16 output pixels per block, BlockN output
// channels (32 or 64, whichever pads K less; ties: 64), reduction tiles of 32 (r, s, c) double-buffered by cp.async.
constexpr int kConvIgemmThreads = 128;
constexpr int kConvIgemmBlockM = 64;
constexpr int kConvIgemmBlockK = 32;
constexpr int kConvIgemmStages = 2;
constexpr int kConvIgemmPitch = kConvIgemmBlockK + 8;  // elements: +16 bytes, so ldmatrix rows fall in distinct banks
constexpr int kConvIgemmChunk = 8;                     // elements per 16-byte cp.async

constexpr size_t conv_igemm_shared_bytes(int block_n) {
  return size_t(kConvIgemmStages) * (kConvIgemmBlockM + block_n) * kConvIgemmPitch * 2;
}

struct ConvIgemmPlan {
  int threads = kConvIgemmThreads, block_m = kConvIgemmBlockM, block_n = 0, block_k = kConvIgemmBlockK;
  int64_t grid[2] = {0, 0};  // (pixel blocks, channel blocks)
  int64_t gemm_m = 0, gemm_k = 0, k_tiles = 0;
  size_t shared_bytes = 0;
  bool empty() const { return grid[0] == 0 || grid[1] == 0; }
};

// The plan for a conv2d of x (batch, channels, in_h, in_w) with weight (out_channels, channels / groups, kernel_h,
// kernel_w) and output (out_h, out_w); `why` non-empty: v2 cannot run it (v1 does), saying why.
inline ConvIgemmPlan plan_conv_igemm(CudaDtype dtype, int64_t batch, int64_t channels, int64_t out_channels,
                                     int64_t kernel_h, int64_t kernel_w, int64_t out_h, int64_t out_w, int64_t groups,
                                     bool aligned16, std::string& why) {
  ConvIgemmPlan plan;
  why.clear();
  if (dtype == CudaDtype::f32) {
    why = "float32 (tensor cores take float16 / bfloat16)";
  } else if (groups != 1) {
    why = "groups = " + std::to_string(groups) + " (v2 takes groups = 1)";
  } else if (channels % kConvIgemmChunk) {
    why = "C_in = " + std::to_string(channels) + " is not a multiple of 8 (16-byte copies)";
  } else if (!aligned16) {
    why = "x or weight does not start at a 16-byte boundary";
  } else if (batch < 0 || channels < 1 || out_channels < 1 || kernel_h < 1 || kernel_w < 1 || out_h < 1 || out_w < 1) {
    why = "sizes out of range";
  }
  if (!why.empty()) return plan;
  const auto padded = [&](int64_t n) { return (out_channels + n - 1) / n * n; };
  plan.block_n = padded(32) < padded(64) ? 32 : 64;
  plan.shared_bytes = conv_igemm_shared_bytes(plan.block_n);
  plan.gemm_m = batch * out_h * out_w;
  plan.gemm_k = kernel_h * kernel_w * channels;
  plan.k_tiles = (plan.gemm_k + kConvIgemmBlockK - 1) / kConvIgemmBlockK;
  plan.grid[0] = (plan.gemm_m + kConvIgemmBlockM - 1) / kConvIgemmBlockM;
  plan.grid[1] = (out_channels + plan.block_n - 1) / plan.block_n;
  if (plan.grid[0] > 2147483647 || plan.grid[1] > 65535) {
    why = "grid (" + std::to_string(plan.grid[0]) + ", " + std::to_string(plan.grid[1]) +
          ") exceeds CUDA's limits (2^31 - 1, 65535)";
  }
  return plan;
}

}  // namespace bmk
