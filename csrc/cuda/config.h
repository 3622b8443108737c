#pragma once
// Which build of the CUDA kernel sources this is: nvcc for the GPU (namespace bmk::cuda), or g++ for the
// SIMT emulator (BMK_CUDA_EMULATOR, namespace bmk::cuda_emulated); both can sit in one extension.
#if defined(BMK_CUDA_EMULATOR)
#define BMK_CUDA_NS cuda_emulated
#else
#define BMK_CUDA_NS cuda
#endif
