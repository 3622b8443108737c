// Probe kernels of the architecture layer. arch_probe dumps each lane's registers after ldmatrix (x4,
// x4.trans, x2, x1), mma m16n8k16, a shuffle and a zero-filling cp.async: on a GPU this is the ground
// truth for the emulator's fragment tables (.ci/gpu_check compares the two); in the emulator the tests
// compare it with the PTX ISA's tables. arch_race_demo: a shared-memory exchange with or without
// its barriers, for testing the race detector (and compute-sanitizer racecheck on a GPU).
#include "cuda/arch.cuh"
#include "cuda/arch_probe.h"

namespace bmk::BMK_CUDA_NS {
namespace {

template <typename T>
BMK_DEVICE void arch_probe_body(const uint16_t* tile, uint32_t* out) {
  const int lane = arch::lane();
  auto* s = reinterpret_cast<uint16_t*>(arch::shared_base());
  // lane l copies bytes 16l.. of the row-major tile; every fourth lane only 8 of them (the rest zero-filled)
  arch::cp_async16(s + lane * 8, tile + lane * 8, lane % 4 == 3 ? 8 : 16);
  arch::cp_async_commit();
  arch::cp_async_wait<0>();
  arch::syncthreads();
  uint32_t* o = out + lane * kArchProbeWords;
  const uint16_t* row = s + (lane % 16) * 16 + (lane / 16) * 8;  // A-operand addressing of a 16x16 tile
  uint32_t x4[4], x4t[4], x2[2], x1[1];
  arch::ldmatrix_x4<false>(x4, row);
  arch::ldmatrix_x4<true>(x4t, row);
  arch::ldmatrix_x2<false>(x2, row);
  arch::ldmatrix_x1<false>(x1, row);
  float d[4];
  for (int e = 0; e < 4; ++e) d[e] = static_cast<float>(lane * 4 + e);
  arch::mma_16816<T>(d, x4, x2);  // A = the tile, B(k, n) = tile(n, k) for n < 8, C(lane, e) = 4 lane + e
  const float shuffled = arch::shfl_xor(static_cast<float>(lane), 5);
  for (int i = 0; i < 4; ++i) o[i] = x4[i], o[4 + i] = x4t[i];
  o[8] = x2[0], o[9] = x2[1], o[10] = x1[0];
  for (int e = 0; e < 4; ++e) std::memcpy(o + 11 + e, d + e, 4);
  std::memcpy(o + 15, &shuffled, 4);
  for (int i = 0; i < 4; ++i) o[16 + i] = arch::ld_shared(reinterpret_cast<const uint32_t*>(s) + lane * 4 + i);
}

// Two rounds of "write my slot, read my neighbour's" over 64 threads (variant 0), or within each warp
// (3); variants 1, 2, 4 drop the barrier before the read, after it, or the __syncwarp.
BMK_DEVICE void arch_race_body(int variant, int32_t* out) {
  const int tid = arch::thread_x();
  auto* buf = reinterpret_cast<int32_t*>(arch::shared_base());
  const bool in_warp = variant >= 3;
  const int neighbour = in_warp ? (tid / 32) * 32 + (tid + 1) % 32 : (tid + 1) % 64;
  for (int round = 0; round < 2; ++round) {
    arch::st_shared(buf + tid, tid * 10 + round);
    if (variant == 0 || variant == 2) arch::syncthreads();
    if (variant == 3) arch::syncwarp();
    out[round * 64 + tid] = arch::ld_shared(buf + neighbour);
    if (variant == 0 || variant == 1) arch::syncthreads();
    if (variant == 3) arch::syncwarp();
  }
}

#if !defined(BMK_CUDA_EMULATOR)
template <typename T>
__global__ void arch_probe_kernel(const uint16_t* tile, uint32_t* out) {
  arch_probe_body<T>(tile, out);
}
__global__ void arch_race_kernel(int variant, int32_t* out) { arch_race_body(variant, out); }
#endif

}  // namespace

int launch_arch_probe(const uint16_t* tile, bool bf16, uint32_t* out, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({}, {32, 1, 1}, 512,
              [&] { bf16 ? arch_probe_body<arch::bf16>(tile, out) : arch_probe_body<arch::f16>(tile, out); });
  return 0;
#else
  auto* kernel = bf16 ? arch_probe_kernel<arch::bf16> : arch_probe_kernel<arch::f16>;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  // clang-format off
  kernel<<<1, 32, 512, cuda_stream>>>(tile, out);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

int launch_arch_race_demo(int variant, int32_t* out, Stream stream) {
#if defined(BMK_CUDA_EMULATOR)
  (void)stream;
  emu::launch({}, {64, 1, 1}, 64 * 4, [&] { arch_race_body(variant, out); });
  return 0;
#else
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  // clang-format off
  arch_race_kernel<<<1, 64, 64 * 4, cuda_stream>>>(variant, out);
  // clang-format on
  return int(cudaGetLastError());
#endif
}

}  // namespace bmk::BMK_CUDA_NS
