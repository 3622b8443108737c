#pragma once
// Tile GEMM for the CPU kernels: C[M x N] (+)= A[M x K] * B[K x N], all row-major with leading
// dimensions. float goes to torch's brgemm micro-kernel (oneDNN) when
// this torch exports it; other types, and torch builds without it, use a vectorized loop. bf16 (with B
// in VNNI pairs) has its own entry, tile_gemm_bf16.
// Included by per-ISA kernel sources only (it lives in namespace CPU_CAPABILITY).
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace bmk::cpu::CPU_CAPABILITY {

template <typename T>
void tile_gemm_loop(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < M; ++i) {
    T* c_row = C + i * ldc;
    if (!accumulate) std::fill(c_row, c_row + N, T(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = A[i * lda + kk];
      const T* b_row = B + kk * ldb;
      const Vec a_vec(a);
      int64_t n = 0;
      for (; n + Vec::size() <= N; n += Vec::size()) {
        at::vec::fmadd(a_vec, Vec::loadu(b_row + n), Vec::loadu(c_row + n)).store(c_row + n);
      }
      for (; n < N; ++n) c_row[n] += a * b_row[n];
    }
  }
}

template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  tile_gemm_loop(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <>
inline void tile_gemm<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                             float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
#else
  tile_gemm_loop(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
#endif
}

// Whether torch's bf16 brgemm runs on AMX tiles here (could_pack): several times the fp32 brgemm's
// rate on a Sapphire Rapids-class Xeon.
inline bool bf16_brgemm_on_amx() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
#else
  return false;
#endif
}

// C[M x N] (+)= A * B with bf16 A (row-major) and float C; B in VNNI pairs, the layout AMX multiplies:
// element (k, n) at B[(k / 2) * 2 * ldb + 2 * n + k % 2], K even (callers pad an odd K with zeros).
// Runs as torch's brgemm on AMX tiles where there are some; elsewhere a plain loop, only reached when
// BMK_CPU_BF16_GEMM=native forces it (converting to fp32 is faster there).
inline void tile_gemm_bf16(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  TORCH_CHECK(K % 2 == 0, "tile_gemm_bf16: K must be even (VNNI pairs); got ", K);
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (bf16_brgemm_on_amx()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
    return;
  }
#endif
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float sum = accumulate ? C[i * ldc + n] : 0.f;
      for (int64_t kk = 0; kk < K; ++kk) sum += float(A[i * lda + kk]) * float(B[(kk / 2) * 2 * ldb + 2 * n + kk % 2]);
      C[i * ldc + n] = sum;
    }
  }
}

// Ends a thread's run of tile_gemm_bf16 calls: releases the AMX tile state brgemm configured.
inline void tile_gemm_bf16_done() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (bf16_brgemm_on_amx()) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

// Whether bf16 kernels run their GEMMs in bf16 (tile_gemm_bf16) rather than converting tiles to fp32:
// BMK_CPU_BF16_GEMM=native|fp32 forces it (read per call, cheap, so tests reach both paths); auto or
// unset takes native where torch can pack bf16 for AMX.
inline bool native_bf16_gemm() {
  const char* env = std::getenv("BMK_CPU_BF16_GEMM");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "native" || mode == "fp32",
              "BMK_CPU_BF16_GEMM must be auto, native or fp32; got '", mode, "'");
  if (mode != "auto") return mode == "native";
  return bf16_brgemm_on_amx();
}

// Ends a thread's run of tile_gemm calls (releases brgemm's per-thread state where it has one).
inline void tile_gemm_done() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

}  // namespace bmk::cpu::CPU_CAPABILITY
