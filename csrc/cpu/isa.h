#pragma once
// Run-time choice among the per-ISA builds of the CPU kernels (see setup.py: each kernel source is
// compiled once per ISA, inside namespace bmk::cpu::<ISA>).
#include <string>

namespace bmk::cpu {

enum class Isa { scalar, avx2, avx512 };

// BMK_CPU_ISA=scalar|avx2|avx512 if set (an error if this CPU lacks it), else the best supported.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace bmk::cpu

// Declares a kernel function in every per-ISA namespace.
#define BMK_DECLARE_ISA_KERNEL(ret, name, ...) \
  namespace bmk::cpu::DEFAULT {                \
  ret name(__VA_ARGS__);                       \
  }                                            \
  namespace bmk::cpu::AVX2 {                   \
  ret name(__VA_ARGS__);                       \
  }                                            \
  namespace bmk::cpu::AVX512 {                 \
  ret name(__VA_ARGS__);                       \
  }

// Calls the build of kernel `name` for the active ISA.
#define BMK_ISA_CALL(name, ...)                        \
  [&]() {                                              \
    switch (::bmk::cpu::active_isa()) {                \
      case ::bmk::cpu::Isa::avx512:                    \
        return ::bmk::cpu::AVX512::name(__VA_ARGS__);  \
      case ::bmk::cpu::Isa::avx2:                      \
        return ::bmk::cpu::AVX2::name(__VA_ARGS__);    \
      default:                                         \
        return ::bmk::cpu::DEFAULT::name(__VA_ARGS__); \
    }                                                  \
  }()
