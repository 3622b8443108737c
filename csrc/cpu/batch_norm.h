#pragma once
// CPU training-mode BatchNorm fused with its residual and activation (csrc/cpu/batch_norm.cpp), one
// build per ISA. Arguments as in the bmkernels::batch_norm_act_fwd / batch_norm_act_bwd schemas
// (csrc/registration.cpp).
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace bmk::cpu {
// out, mean, invstd, var (biased), pre-activation
using BatchNormActFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// dx, dweight, dbias, dresidual
using BatchNormActBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}  // namespace bmk::cpu

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::BatchNormActFwdResult, batch_norm_act_fwd, const at::Tensor& x,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, double eps, int64_t activation, double slope,
                       bool save_preact)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::BatchNormActBwdResult, batch_norm_act_bwd, const at::Tensor& grad_out,
                       const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& act_saved, int64_t activation, double slope,
                       bool saved_is_output, std::array<bool, 4> output_mask)
