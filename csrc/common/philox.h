#pragma once
// Counter-based dropout RNG. Philox4x32-10 exactly as triton.language.rand computes it (counter
// (lo, hi, 0, 0), key = the 64-bit seed, first output word, same int-to-float map), so the CPU,
// CUDA and Triton kernels draw the same mask for the same seed and element index.
#include <cstdint>

#include "common/macros.h"

namespace bmk {

BMK_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

BMK_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform in [0, 1): the int32 view folded to non-negative, times the largest scale below 2^-31.
BMK_HOST_DEVICE float uniform_from_bits(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// An element is kept when its uniform draw is >= p (probability 1 - p).
BMK_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t counter, float p) {
  return uniform_from_bits(philox_first_word(seed, counter)) >= p;
}

}  // namespace bmk
