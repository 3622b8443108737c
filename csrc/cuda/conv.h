#pragma once
// The CUDA conv2d kernels' interface, plain C++ (no torch, no CUDA header): what the torch glue
// (csrc/cuda/conv.cpp) fills in and launches. The convolution itself runs in ATen (cuDNN on the GPU);
// these kernels are the fused rest: the forward epilogue and the backward's dZ + bias-gradient pass.
// Tensors are dense [outer, C, inner] (NCHW: outer = N, inner = H W; channels_last: outer = N H W,
// inner = 1): element i is channel (i / inner) % C.
#include <cstdint>

#include "cuda/arch_probe.h"
#include "cuda/config.h"
#include "cuda/conv_plan.h"

namespace bmk::BMK_CUDA_NS {

// out = act(z + bias + residual); preact = z + bias + residual when asked. out may be z (in place).
struct ConvEpilogueParams {
  const void* z;         // the convolution's output, x's dtype
  const float* bias;     // (C,) or null
  const void* residual;  // z's layout and dtype, or null
  void* out;
  void* preact;  // or null
  int64_t numel, channels, inner;
  int activation;  // bmk::Activation
  float slope;
  CudaDtype dtype;
  int64_t grid_stride;  // set by the launch: blocks x threads
};

// dz = grad * act'(saved) (saved: the output when saved_is_output, else the pre-activation; null: no
// activation, dz = grad) and the bias gradient: per-chunk partial sums, then a second kernel adds the
// chunks in order per channel (deterministic, no atomics).
struct ConvGradParams {
  const void* grad;                 // grad_out, z's layout
  const void* saved;                // or null
  void* dz;                         // or null (only the bias gradient wanted)
  float* partial;                   // (chunks, C), or null (no bias gradient)
  float* dbias;                     // (C,), with partial
  int64_t channels, inner, pixels;  // pixels = outer * inner
  int activation;
  float slope;
  bool saved_is_output;
  CudaDtype dtype;
  int channels_per_block;        // set by the launch, from the plan
  int64_t chunk_pixels, chunks;  // likewise
};

// v2, f16/bf16 (csrc/cuda/conv_igemm.cu): the whole forward as an implicit GEMM over NHWC, out = act(x * w + bias
// + residual) with the epilogue in registers. GEMM rows: output pixels (n, p, q); columns: output channels;
// reduction: (r, s, c), c fastest. Needs groups == 1, C % 8 == 0 and 16-byte aligned x and weight (plan_conv_igemm).
struct ConvIgemmParams {
  const void* x;         // (N, H, W, C) dense
  const void* weight;    // (K, R, S, C) dense
  const float* bias;     // (K,) or null
  const void* residual;  // (N, P, Q, K) dense, or null
  void* out;             // (N, P, Q, K)
  void* preact;          // likewise, or null
  int64_t batch, in_h, in_w, channels, out_h, out_w, out_channels;
  int kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int activation;  // bmk::Activation
  float slope;
  CudaDtype dtype;
};

int launch_conv_epilogue(const ConvEpilogueParams& p, const ConvEpiloguePlan& plan, Stream stream);
int launch_conv_igemm(const ConvIgemmParams& p, const ConvIgemmPlan& plan, Stream stream);
int launch_conv_grad(const ConvGradParams& p, const ConvGradPlan& plan, Stream stream);

}  // namespace bmk::BMK_CUDA_NS
