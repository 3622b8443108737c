#pragma once
// Tile GEMM for the CPU kernels: C[M x N] (+)= A[M x K] * B[K x N], all row-major with leading
// dimensions. float goes to torch's brgemm micro-kernel (oneDNN) when
// this torch exports it; other types, and torch builds without it, use a vectorized loop.
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

// C[M x N] (+)= A * B with bf16 A and B (row-major, unpacked) and float C, for CPUs where torch's
// bf16 brgemm runs on AMX tiles (could_pack: several times the fp32 brgemm's rate on a Sapphire
// Rapids-class Xeon); without AMX it is slower than converting to fp32 (as on Zen 4), so callers
// take it only where native_bf16_gemm() says so.
inline void tile_gemm_bf16(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
#else
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float sum = accumulate ? C[i * ldc + n] : 0.f;
      for (int64_t kk = 0; kk < K; ++kk) sum += float(A[i * lda + kk]) * float(B[kk * ldb + n]);
      C[i * ldc + n] = sum;
    }
  }
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
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  static const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
  return amx;
#else
  return false;
#endif
}

// Ends a thread's run of tile_gemm calls (releases brgemm's per-thread state where it has one).
inline void tile_gemm_done() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

}  // namespace bmk::cpu::CPU_CAPABILITY
