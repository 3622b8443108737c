#pragma once
// The arguments of bmkernels::attention_fwd / attention_bwd and their emulated CUDA twins, and of
// attention_kvcache_fwd / attention_dropout_mask (schemas: csrc/registration.cpp), one params struct per
// op (csrc/common/op_params.h): what the CPU kernels and the autograd pass on.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/op_params.h"

namespace bmk {

using AttentionFwdResult = std::tuple<at::Tensor, at::Tensor>;                          // out, lse
using AttentionBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv, dbias

// clang-format off
#define BMK_ATTENTION_FWD_ARGS(X)                   \
  X(const at::Tensor&, q)                           \
  X(const at::Tensor&, k)                           \
  X(const at::Tensor&, v)                           \
  X(const std::optional<at::Tensor>&, bias)         \
  X(const std::optional<at::Tensor>&, mask)         \
  X(const std::optional<at::Tensor>&, alibi_slopes) \
  X(const std::optional<at::Tensor>&, rng_seed)     \
  X(double, scale)                                  \
  X(double, softcap)                                \
  X(int64_t, window_left)                           \
  X(int64_t, window_right)                          \
  X(int64_t, diag_offset)                           \
  X(double, dropout_p)                              \
  X(const std::optional<at::Tensor>&, key_range)    \
  X(const std::optional<at::Tensor>&, segments)     \
  X(const std::optional<at::Tensor>&, sinks)

#define BMK_ATTENTION_BWD_ARGS(X)                   \
  X(const at::Tensor&, grad_out)                    \
  X(const at::Tensor&, q)                           \
  X(const at::Tensor&, k)                           \
  X(const at::Tensor&, v)                           \
  X(const at::Tensor&, out)                         \
  X(const at::Tensor&, lse)                         \
  X(const std::optional<at::Tensor>&, grad_lse)     \
  X(const std::optional<at::Tensor>&, bias)         \
  X(const std::optional<at::Tensor>&, mask)         \
  X(const std::optional<at::Tensor>&, alibi_slopes) \
  X(const std::optional<at::Tensor>&, rng_seed)     \
  X(double, scale)                                  \
  X(double, softcap)                                \
  X(int64_t, window_left)                           \
  X(int64_t, window_right)                          \
  X(int64_t, diag_offset)                           \
  X(double, dropout_p)                              \
  X(bool, bias_grad)                                \
  X(const std::optional<at::Tensor>&, key_range)    \
  X(const std::optional<at::Tensor>&, segments)

#define BMK_ATTENTION_KVCACHE_FWD_ARGS(X)              \
  X(const at::Tensor&, q)                              \
  X(const at::Tensor&, k_cache)                        \
  X(const at::Tensor&, v_cache)                        \
  X(const at::Tensor&, cache_seqlens)                  \
  X(const std::optional<at::Tensor>&, block_table)     \
  X(const std::optional<at::Tensor>&, cache_batch_idx) \
  X(const std::optional<at::Tensor>&, alibi_slopes)    \
  X(double, scale)                                     \
  X(double, softcap)                                   \
  X(int64_t, window_left)                              \
  X(int64_t, window_right)

#define BMK_ATTENTION_DROPOUT_MASK_ARGS(X) \
  X(const at::Tensor&, rng_seed)           \
  X(int64_t, batch)                        \
  X(int64_t, heads)                        \
  X(int64_t, q_len)                        \
  X(int64_t, k_len)                        \
  X(double, dropout_p)
// clang-format on

BMK_OP_ARGS(AttentionFwdArgs, AttentionFwdResult, BMK_ATTENTION_FWD_ARGS)
BMK_OP_ARGS(AttentionBwdArgs, AttentionBwdResult, BMK_ATTENTION_BWD_ARGS)
BMK_OP_ARGS(AttentionKvcacheFwdArgs, AttentionFwdResult, BMK_ATTENTION_KVCACHE_FWD_ARGS)
BMK_OP_ARGS(AttentionDropoutMaskArgs, at::Tensor, BMK_ATTENTION_DROPOUT_MASK_ARGS)

}  // namespace bmk
