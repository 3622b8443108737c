#pragma once
// CPU attention kernels (csrc/cpu/attention.cpp), one build per ISA. Arguments as in the
// bmkernels::attention_fwd / attention_bwd schemas (csrc/registration.cpp).
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace bmk::cpu {
using AttentionFwdResult = std::tuple<at::Tensor, at::Tensor>;                          // out, lse
using AttentionBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv, dbias
}  // namespace bmk::cpu

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::AttentionFwdResult, attention_fwd, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                       const std::optional<at::Tensor>& rng_seed, double scale, double softcap, int64_t window_left,
                       int64_t window_right, int64_t diag_offset, double dropout_p,
                       const std::optional<at::Tensor>& key_range, const std::optional<at::Tensor>& segments)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::AttentionBwdResult, attention_bwd, const at::Tensor& grad_out, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                       const std::optional<at::Tensor>& rng_seed, double scale, double softcap, int64_t window_left,
                       int64_t window_right, int64_t diag_offset, double dropout_p, bool bias_grad,
                       const std::optional<at::Tensor>& key_range, const std::optional<at::Tensor>& segments)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::AttentionFwdResult, attention_kvcache_fwd, const at::Tensor& q,
                       const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                       const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
                       const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t window_left,
                       int64_t window_right)

BMK_DECLARE_ISA_KERNEL(at::Tensor, attention_dropout_mask, const at::Tensor& rng_seed, int64_t batch, int64_t heads,
                       int64_t q_len, int64_t k_len, double dropout_p)
