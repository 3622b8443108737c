#pragma once
// Helpers of the element-wise kernels (conv epilogue and grad pass, GRU gates): float32 loads and rounded
// stores of a tensor in one of the kernels' dtypes, and the launch of a kernel template for a run-time dtype.
#include "cuda/arch.cuh"
#include "cuda/plan.h"

namespace bmk::BMK_CUDA_NS {

template <typename T>
BMK_DEVICE float load(const void* base, int64_t i) {
  return arch::to_float(T{}, static_cast<const typename T::storage*>(base)[i]);
}

template <typename T>
BMK_DEVICE void store(void* base, int64_t i, float v) {
  static_cast<typename T::storage*>(base)[i] = arch::from_float(T{}, v);
}

// launch.template operator()<T>() for the arch:: tag of dtype.
template <typename Launch>
int by_dtype(CudaDtype dtype, const Launch& launch) {
  switch (dtype) {
    case CudaDtype::f16:
      return launch.template operator()<arch::f16>();
    case CudaDtype::bf16:
      return launch.template operator()<arch::bf16>();
    default:
      return launch.template operator()<arch::f32>();
  }
}

}  // namespace bmk::BMK_CUDA_NS
