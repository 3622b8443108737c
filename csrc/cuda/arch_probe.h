#pragma once
// The architecture layer's probe and race-demo kernels (csrc/cuda/arch_probe.cu), plain C++ interface.
#include <cstdint>

#include "cuda/config.h"

namespace bmk::BMK_CUDA_NS {

using Stream = void*;                // cudaStream_t on the GPU (a pointer type), unused by the emulator
constexpr int kArchProbeWords = 20;  // per lane: ldmatrix x4, x4.trans, x2, x1, mma D, shuffle, cp.async bytes

// tile: 16 x 16 b16 values (16-byte aligned); out: 32 lanes x kArchProbeWords words. Return: error code.
int launch_arch_probe(const uint16_t* tile, bool bf16, uint32_t* out, Stream stream);
// out: 2 x 64 int32; variant 0..4 (csrc/cuda/arch_probe.cu).
int launch_arch_race_demo(int variant, int32_t* out, Stream stream);

}  // namespace bmk::BMK_CUDA_NS
