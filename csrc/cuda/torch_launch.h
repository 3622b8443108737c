#pragma once
// What the torch glue of every kernel family (csrc/cuda/*.cpp) shares: which tensors the build runs on (CUDA
// tensors; CPU tensors in the emulator build), the kernels' dtype code, and the launch: on the GPU on torch's
// current stream, its error code turned into a TORCH_CHECK; in the emulator build, the emulator's report
// (races, deadlocks, failed device checks) turned into one.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <stdexcept>

#include "cuda/config.h"
#include "cuda/plan.h"

#if !defined(BMK_CUDA_EMULATOR)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace bmk::BMK_CUDA_NS {

#if defined(BMK_CUDA_EMULATOR)
inline constexpr const char* kDeviceName = "CPU";
inline bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
#else
inline constexpr const char* kDeviceName = "CUDA";
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
#endif

// The kernels' code of dtype t; an error naming `what` and the argument `name` for any other dtype.
inline CudaDtype dtype_code(at::ScalarType t, const char* what, const char* name) {
  switch (t) {
    case at::kHalf:
      return CudaDtype::f16;
    case at::kBFloat16:
      return CudaDtype::bf16;
    case at::kFloat:
      return CudaDtype::f32;
    default:
      TORCH_CHECK(false, what, ": ", name, " must be float16, bfloat16 or float32; got ", t);
  }
}

// launch(void* stream) -> int error code (0: none)
template <typename F>
void run_launch(const char* what, F&& launch) {
#if defined(BMK_CUDA_EMULATOR)
  try {
    launch(nullptr);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, what, ": ", e.what());
  }
#else
  const int err = launch(at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, what, ": launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
}

}  // namespace bmk::BMK_CUDA_NS
