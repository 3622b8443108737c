// The fused conv2d kernels on the architecture layer (docs/cuda.md, "conv and GRU"): the forward epilogue
// (bias + residual + activation, the pre-activation saved when asked) and the backward's grad pass
// (dz = grad * act' and per-chunk bias sums), plus the in-order reduction of those sums. Element-wise and
// memory-bound; every value computed in float32 and rounded once to the tensor's dtype.
#include "common/activations.h"
#include "cuda/arch.cuh"
#include "cuda/conv.h"
#include "cuda/elementwise.cuh"

namespace bmk::BMK_CUDA_NS {
namespace {

template <typename T>
struct ConvEpilogueKernel {
  static BMK_DEVICE void run(const ConvEpilogueParams& p) {
    const Activation act = static_cast<Activation>(p.activation);
    for (int64_t i = int64_t(arch::block_x()) * kConvThreads + arch::thread_x(); i < p.numel; i += p.grid_stride) {
      float v = load<T>(p.z, i);
      if (p.bias) v += p.bias[(i / p.inner) % p.channels];
      if (p.residual) v += load<T>(p.residual, i);
      if (p.preact) store<T>(p.preact, i, v);
      store<T>(p.out, i, activation_forward(act, v, p.slope));
    }
  }
};

template <typename T>
struct ConvGradKernel {
  static BMK_DEVICE void run(const ConvGradParams& p) {
    const Activation act = static_cast<Activation>(p.activation);
    const int t = arch::thread_x(), cpb = p.channels_per_block, tpc = kConvThreads / cpb;
    const int64_t c = int64_t(arch::block_x()) * cpb + t % cpb, chunk = arch::block_y();
    const int64_t q0 = chunk * p.chunk_pixels;
    const int64_t q1 = q0 + p.chunk_pixels < p.pixels ? q0 + p.chunk_pixels : p.pixels;
    float sum = 0.0f;
    if (c < p.channels) {
      for (int64_t q = q0 + t / cpb; q < q1; q += tpc) {
        const int64_t i = (q / p.inner) * p.channels * p.inner + c * p.inner + q % p.inner;
        float d = load<T>(p.grad, i);
        if (p.saved) {
          const float s = load<T>(p.saved, i);
          d *= p.saved_is_output ? activation_derivative_from_output(act, s, p.slope)
                                 : activation_derivative(act, s, p.slope);
        }
        if (p.dz) store<T>(p.dz, i, d);
        sum += d;
      }
    }
    if (!p.partial) return;  // uniform over the block
    float* red = reinterpret_cast<float*>(arch::shared_base());
    arch::st_shared(red + t, sum);
    // a fixed tree over each channel's pixel lanes: the same sums in the same order on every run
    for (int half = tpc / 2; half >= 1; half /= 2) {
      arch::syncthreads();
      if (t / cpb < half) arch::st_shared(red + t, arch::ld_shared(red + t) + arch::ld_shared(red + t + half * cpb));
    }
    if (t < cpb && c < p.channels) p.partial[chunk * p.channels + c] = arch::ld_shared(red + t);
  }
};

// dbias[c] = the chunks' partial sums of channel c, added in chunk order.
struct ConvBiasReduceKernel {
  static BMK_DEVICE void run(const ConvGradParams& p) {
    const int64_t c = int64_t(arch::block_x()) * kConvThreads + arch::thread_x();
    if (c >= p.channels) return;
    float s = 0.0f;
    for (int64_t k = 0; k < p.chunks; ++k) s += p.partial[k * p.channels + c];
    p.dbias[c] = s;
  }
};

#if !defined(BMK_CUDA_EMULATOR)
template <typename T>
BMK_KERNEL_ATTRS(kConvThreads)
conv_epilogue_kernel(const __grid_constant__ ConvEpilogueParams p) {
  ConvEpilogueKernel<T>::run(p);
}
template <typename T>
BMK_KERNEL_ATTRS(kConvThreads)
conv_grad_kernel(const __grid_constant__ ConvGradParams p) {
  ConvGradKernel<T>::run(p);
}
BMK_KERNEL_ATTRS(kConvThreads) conv_bias_reduce_kernel(const __grid_constant__ ConvGradParams p) {
  ConvBiasReduceKernel::run(p);
}
#endif

template <typename T>
int launch_epilogue(const ConvEpilogueParams& p, const ConvEpiloguePlan& plan, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.blocks), 1, 1}, {kConvThreads, 1, 1}, 0, [&] { ConvEpilogueKernel<T>::run(p); });
  return 0;
#else
  auto* kernel = conv_epilogue_kernel<T>;
  // clang-format off
  kernel<<<unsigned(plan.blocks), kConvThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

template <typename T>
int launch_grad(const ConvGradParams& p, const ConvGradPlan& plan, Stream stream) {
  const unsigned reduce_blocks = unsigned((p.channels + kConvThreads - 1) / kConvThreads);
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({unsigned(plan.grid[0]), unsigned(plan.grid[1]), 1}, {kConvThreads, 1, 1}, plan.shared_bytes,
              [&] { ConvGradKernel<T>::run(p); });
  if (p.partial) emu::launch({reduce_blocks, 1, 1}, {kConvThreads, 1, 1}, 0, [&] { ConvBiasReduceKernel::run(p); });
  return 0;
#else
  const auto s = static_cast<cudaStream_t>(stream);
  // clang-format off
  auto* kernel = conv_grad_kernel<T>;
  kernel<<<dim3(unsigned(plan.grid[0]), unsigned(plan.grid[1])), kConvThreads, plan.shared_bytes, s>>>(p);
  if (p.partial) conv_bias_reduce_kernel<<<reduce_blocks, kConvThreads, 0, s>>>(p);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

}  // namespace

int launch_conv_epilogue(const ConvEpilogueParams& params, const ConvEpiloguePlan& plan, Stream stream) {
  if (plan.empty()) return 0;
  ConvEpilogueParams p = params;
  p.grid_stride = plan.blocks * kConvThreads;
  return by_dtype(p.dtype, [&]<typename T>() { return launch_epilogue<T>(p, plan, stream); });
}

int launch_conv_grad(const ConvGradParams& params, const ConvGradPlan& plan, Stream stream) {
  if (plan.empty()) return 0;
  ConvGradParams p = params;
  p.channels_per_block = plan.channels_per_block, p.chunk_pixels = plan.chunk_pixels, p.chunks = plan.grid[1];
  return by_dtype(p.dtype, [&]<typename T>() { return launch_grad<T>(p, plan, stream); });
}

}  // namespace bmk::BMK_CUDA_NS
