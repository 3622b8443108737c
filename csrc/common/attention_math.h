#pragma once
// Score-level math of bmkernels attention, shared by every kernel (see bmkernels/reference/attention.py
// for the specification). Positions: query i is aligned to key position i' = i + diag_offset
// (0 top-left, Lk - Lq bottom-right); a window bound of -1 is unbounded; causal is window_right = 0.
#include <cstdint>

#include "common/macros.h"

namespace bmk {

BMK_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
BMK_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

struct AttentionWindow {
  int64_t left;         // keys j >= i' - left are visible (-1: no bound)
  int64_t right;        // keys j <= i' + right are visible (-1: no bound)
  int64_t diag_offset;  // i' = i + diag_offset
  int64_t q_len;
  int64_t k_len;

  // This batch's keys (key_range): keys outside [key_begin, key_end) are padding, never visible.
  int64_t key_begin = 0;
  int64_t key_end = INT64_MAX;

  // The window restricted to one sequence's keys [begin, end) (0 <= begin <= end <= k_len).
  BMK_HOST_DEVICE AttentionWindow for_keys(int64_t begin, int64_t end) const {
    AttentionWindow w = *this;
    w.key_begin = begin;
    w.key_end = end;
    return w;
  }
  BMK_HOST_DEVICE bool key_in_range(int64_t j) const { return j >= key_begin && j < key_end; }

  // Keys visible to query i: [first_key, end_key), possibly empty. Both ends grow with i.
  BMK_HOST_DEVICE int64_t first_key(int64_t i) const {
    const int64_t first = left < 0 ? 0 : min64(k_len, max64(0, i + diag_offset - left));
    return min64(k_len, max64(first, key_begin));
  }
  BMK_HOST_DEVICE int64_t end_key(int64_t i) const {
    const int64_t end = right < 0 ? k_len : min64(k_len, max64(0, i + diag_offset + right + 1));
    return max64(min64(end, key_end), first_key(i));
  }
  // Queries that see key j through the window: [first_query, end_query), possibly empty; both ends
  // grow with j. The key range is not applied here: callers test key_in_range(j).
  BMK_HOST_DEVICE int64_t first_query(int64_t j) const {
    return right < 0 ? 0 : min64(q_len, max64(0, j - right - diag_offset));
  }
  BMK_HOST_DEVICE int64_t end_query(int64_t j) const {
    const int64_t end = left < 0 ? q_len : min64(q_len, max64(0, j + left - diag_offset + 1));
    return max64(end, first_query(j));
  }
};

// The window with bounds past every position unbounded and the diagonal offset capped, so that the
// position sums (i + offset +- bound) cannot overflow int64 however large the raw arguments are.
BMK_HOST_DEVICE AttentionWindow saturated_window(int64_t left, int64_t right, int64_t diag_offset, int64_t q_len,
                                                 int64_t k_len) {
  const int64_t span = q_len + k_len;
  constexpr int64_t kMaxOffset = int64_t(1) << 61;
  return {left > span ? -1 : left, right > span ? -1 : right, min64(max64(diag_offset, -kMaxOffset), kMaxOffset), q_len,
          k_len};
}

// Philox counter of score (b, h, i, j) in a (B, H, Lq, Lk) grid: independent of any tiling.
BMK_HOST_DEVICE uint64_t dropout_counter(int64_t bh, int64_t i, int64_t j, int64_t q_len, int64_t k_len) {
  return (static_cast<uint64_t>(bh) * q_len + i) * k_len + j;
}

}  // namespace bmk
