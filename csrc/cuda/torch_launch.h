#pragma once
// Runs a kernel launch from the torch glue (csrc/cuda/*.cpp): on the GPU on torch's current stream, its
// error code turned into a TORCH_CHECK; in the emulator build, the emulator's report (races, deadlocks,
// failed device checks) turned into one.
#include <c10/util/Exception.h>

#include <stdexcept>

#include "cuda/config.h"

#if !defined(BMK_CUDA_EMULATOR)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace bmk::BMK_CUDA_NS {

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
