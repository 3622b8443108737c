#pragma once
// The architecture layer every CUDA kernel of bmkernels is written against (docs/cuda.md): tensor-core
// mma m16n8k16 (f16/bf16 -> f32), ldmatrix (x1/x2/x4, .trans), cp.async (zero-fill, commit/wait),
// shared-memory loads/stores, warp shuffles, barriers, f16/bf16 conversions. Under nvcc: the PTX. Under
// g++ (BMK_CUDA_EMULATOR): the SIMT emulator of csrc/cuda/emulator.h, with the fragment layouts of the
// PTX ISA applied exactly. Every shared-memory access of a kernel goes through this layer, so the
// emulator's race detector sees all of them. Kernel files include no torch header.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/config.h"

#if !defined(BMK_CUDA_EMULATOR)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define BMK_DEVICE __device__ __forceinline__
#define BMK_UNROLL _Pragma("unroll")
#define BMK_KERNEL_ATTRS(threads) __global__ void __launch_bounds__(threads, 1)
#else
#include <cmath>
#include <string>

#include "cuda/emulator.h"
#define BMK_DEVICE inline
#define BMK_UNROLL
#define BMK_KERNEL_ATTRS(threads) void
#define __host__
#define __device__
#define __forceinline__ inline
#define __restrict__
#endif

namespace bmk::BMK_CUDA_NS::arch {

// Element type tags of the kernels; storage is raw bits, converted through this layer.
struct f16 {
  using storage = uint16_t;
};
struct bf16 {
  using storage = uint16_t;
};
struct f32 {
  using storage = float;
};

#if !defined(BMK_CUDA_EMULATOR)

BMK_DEVICE int thread_x() { return threadIdx.x; }
BMK_DEVICE int block_x() { return blockIdx.x; }
BMK_DEVICE int block_y() { return blockIdx.y; }
BMK_DEVICE int block_z() { return blockIdx.z; }
BMK_DEVICE int lane() { return threadIdx.x & 31; }
BMK_DEVICE unsigned char* shared_base() {
  extern __shared__ __align__(16) unsigned char bmk_shared[];
  return bmk_shared;
}
BMK_DEVICE void syncthreads() { __syncthreads(); }
BMK_DEVICE void syncwarp() { __syncwarp(); }
BMK_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
BMK_DEVICE float shfl(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BMK_DEVICE void trap() { __trap(); }

template <typename T>
BMK_DEVICE T ld_shared(const T* p) {
  return *p;
}
template <typename T>
BMK_DEVICE void st_shared(T* p, T v) {
  *p = v;
}

BMK_DEVICE uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// cp.async of 16 bytes (.cg: L2 only); src_bytes < 16 zero-fills the rest (0: all zeros, src unread).
BMK_DEVICE void cp_async16(void* shared_dst, const void* global_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)), "l"(global_src),
               "r"(src_bytes));
}
BMK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
BMK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// ldmatrix: lanes 8m..8m+7 give the row addresses of 8x8 b16 matrix m; register m of lane l holds
// (row l/4, cols 2(l%4), +1) of matrix m, or with Trans (rows 2(l%4), +1 of col l/4).
template <bool Trans>
BMK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  }
}
template <bool Trans>
BMK_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row)));
  }
}
template <bool Trans>
BMK_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)));
  }
}

// D = A B + C, m16n8k16, A row-major 16x16 (4 regs of 2), B col-major 16x8 (2 regs), C/D f32 (4 regs):
// with g = lane/4, t = lane%4: a{0,1,2,3} = A(g, 2t..), A(g+8, 2t..), A(g, 2t+8..), A(g+8, 2t+8..);
// b{0,1} = B(2t.., g), B(2t+8.., g); c{0,1,2,3} = C(g, 2t), C(g, 2t+1), C(g+8, 2t), C(g+8, 2t+1).
template <typename T>
BMK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, f16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

BMK_DEVICE float to_float(f16, uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
BMK_DEVICE float to_float(bf16, uint16_t bits) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
BMK_DEVICE uint16_t from_float(f16, float x) { return __half_as_ushort(__float2half_rn(x)); }
BMK_DEVICE uint16_t from_float(bf16, float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
BMK_DEVICE float exp(float x) { return expf(x); }
BMK_DEVICE float log(float x) { return logf(x); }
BMK_DEVICE float tanh(float x) { return tanhf(x); }
BMK_DEVICE float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }

#else  // the emulator

BMK_DEVICE int thread_x() { return static_cast<int>(emu::thread_idx().x); }
BMK_DEVICE int block_x() { return static_cast<int>(emu::block_idx().x); }
BMK_DEVICE int block_y() { return static_cast<int>(emu::block_idx().y); }
BMK_DEVICE int block_z() { return static_cast<int>(emu::block_idx().z); }
BMK_DEVICE int lane() { return emu::lane_id(); }
BMK_DEVICE unsigned char* shared_base() { return emu::shared_base(); }
BMK_DEVICE void syncthreads() { emu::syncthreads(); }
BMK_DEVICE void syncwarp() { emu::syncwarp(); }
[[noreturn]] inline void trap() { emu::fail("device trap"); }

// All lanes' values in, each lane's result out: the shuffle as a warp collective.
inline float shfl_index(float v, int src, int kind) {
  float out;
  struct In {
    float v;
    int src;
  } in{v, src};
  emu::warp_collective(kind, &in, &out, [](const void* const* ins, void* const* outs, int lanes) {
    for (int l = 0; l < lanes; ++l) {
      const int s = static_cast<const In*>(ins[l])->src;
      *static_cast<float*>(outs[l]) = s < lanes ? static_cast<const In*>(ins[s])->v : static_cast<const In*>(ins[l])->v;
    }
  });
  return out;
}
inline float shfl_xor(float v, int mask) { return shfl_index(v, lane() ^ mask, 1); }
inline float shfl(float v, int src_lane) { return shfl_index(v, src_lane, 2); }

template <typename T>
inline T ld_shared(const T* p) {
  emu::shared_read(p, sizeof(T));
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void st_shared(T* p, T v) {
  emu::shared_write(p, sizeof(T));
  std::memcpy(p, &v, sizeof(T));
}

inline void check_aligned(const void* p, uintptr_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes) emu::fail(std::string(what) + ": address not aligned to its size");
}

inline void cp_async16(void* shared_dst, const void* global_src, int src_bytes) {
  check_aligned(shared_dst, 16, "cp.async shared destination");
  if (src_bytes) check_aligned(global_src, 16, "cp.async global source");
  emu::async_copy(shared_dst, global_src, 16, static_cast<size_t>(src_bytes));
}
inline void cp_async_commit() { emu::async_commit(); }
template <int Pending>
inline void cp_async_wait() {
  emu::async_wait(Pending);
}

// ldmatrix as a warp collective over the lanes' row addresses (layout in the nvcc branch above).
template <int Count, bool Trans>
inline void ldmatrix(uint32_t* r, const void* row) {
  check_aligned(row, 16, "ldmatrix row");
  uint32_t out[Count];
  emu::warp_collective(10 + Count * 2 + Trans, &row, out, [](const void* const* ins, void* const* outs, int lanes) {
    if (lanes != 32) emu::fail("ldmatrix needs all 32 lanes");
    uint16_t m[4][8][8];
    for (int k = 0; k < Count; ++k)
      for (int rr = 0; rr < 8; ++rr) {
        const void* p = *static_cast<const void* const*>(ins[8 * k + rr]);
        emu::shared_read_by_lane(8 * k + rr, p, 16);
        std::memcpy(m[k][rr], p, 16);
      }
    for (int l = 0; l < 32; ++l)
      for (int k = 0; k < Count; ++k) {
        const int g = l / 4, t = l % 4;
        const uint16_t lo = Trans ? m[k][2 * t][g] : m[k][g][2 * t];
        const uint16_t hi = Trans ? m[k][2 * t + 1][g] : m[k][g][2 * t + 1];
        static_cast<uint32_t*>(outs[l])[k] = lo | (static_cast<uint32_t>(hi) << 16);
      }
  });
  std::memcpy(r, out, sizeof(out));
}
template <bool Trans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ldmatrix<4, Trans>(r, row);
}
template <bool Trans>
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  ldmatrix<2, Trans>(r, row);
}
template <bool Trans>
inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  ldmatrix<1, Trans>(r, row);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Round to nearest even, overflow to inf, subnormals kept (as __float2half_rn).
inline uint16_t float_to_half_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float a = std::fabs(x);
  if (std::isnan(x)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;
  if (a < 6.103515625e-05f) {  // subnormal: a multiple of 2^-24, rounded to even by nearbyint
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  int e;
  const float m = std::frexp(a, &e);                                         // a = m 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint(std::ldexp(m, 11)));  // 11 significant bits
  if (mant == 2048) mant = 1024, ++e;
  return sign | static_cast<uint16_t>(((e + 14) << 10) + (mant - 1024));
}

inline float to_float(f16, uint16_t bits) { return half_bits_to_float(bits); }
inline float to_float(bf16, uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}
inline uint16_t from_float(f16, float x) { return float_to_half_bits(x); }
inline uint16_t from_float(bf16, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }

// The mma as a warp collective: rebuild A (16x16), B (16x8) and C from the lanes' fragments, multiply
// (exact products, f32 sums in k order), hand each lane its fragment of D.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct In {
    uint32_t a[4], b[2];
    float c[4];
  } in;
  std::memcpy(in.a, a, sizeof(in.a));
  std::memcpy(in.b, b, sizeof(in.b));
  std::memcpy(in.c, d, sizeof(in.c));
  emu::warp_collective(3, &in, d, [](const void* const* ins, void* const* outs, int lanes) {
    if (lanes != 32) emu::fail("mma needs all 32 lanes");
    float A[16][16], B[16][8], C[16][8];
    auto half = [](uint32_t r, int i) { return to_float(T{}, static_cast<uint16_t>(i ? r >> 16 : r & 0xffffu)); };
    for (int l = 0; l < 32; ++l) {
      const In& x = *static_cast<const In*>(ins[l]);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 2; ++i) {
        A[g][2 * t + i] = half(x.a[0], i);
        A[g + 8][2 * t + i] = half(x.a[1], i);
        A[g][2 * t + 8 + i] = half(x.a[2], i);
        A[g + 8][2 * t + 8 + i] = half(x.a[3], i);
        B[2 * t + i][g] = half(x.b[0], i);
        B[2 * t + 8 + i][g] = half(x.b[1], i);
        C[g][2 * t + i] = x.c[i];
        C[g + 8][2 * t + i] = x.c[2 + i];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      float* out = static_cast<float*>(outs[l]);
      for (int k = 0; k < 4; ++k) {
        const int row = g + (k >= 2 ? 8 : 0), col = 2 * t + (k & 1);
        float acc = C[row][col];
        for (int kk = 0; kk < 16; ++kk) acc = std::fma(A[row][kk], B[kk][col], acc);
        out[k] = acc;
      }
    }
  });
}

#endif

// Two converted values packed into one 32-bit register (the low half first), as mma operands hold them.
template <typename T>
BMK_DEVICE uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float(T{}, lo)) | (static_cast<uint32_t>(from_float(T{}, hi)) << 16);
}
BMK_DEVICE float to_float(f32, float x) { return x; }
BMK_DEVICE float from_float(f32, float x) { return x; }

}  // namespace bmk::BMK_CUDA_NS::arch
