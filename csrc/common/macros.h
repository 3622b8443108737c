#pragma once
// Math in csrc/common/ is shared by the CPU and CUDA kernels: one definition, tested on the CPU.
#if defined(__CUDACC__)
#define BMK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BMK_HOST_DEVICE inline
#endif
