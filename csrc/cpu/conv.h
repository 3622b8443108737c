#pragma once
// CPU fused conv2d kernels (csrc/cpu/conv.cpp), one build per ISA. Arguments as in the
// bmkernels::conv2d_fwd / conv2d_bwd schemas (csrc/registration.cpp).
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace bmk::cpu {
using ConvFwdResult = std::tuple<at::Tensor, at::Tensor>;                          // out, pre-activation
using ConvBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // dx, dweight, dbias, dresidual
}  // namespace bmk::cpu

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::ConvFwdResult, conv2d_fwd, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t activation, double slope, bool save_preact)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::ConvBwdResult, conv2d_bwd, const at::Tensor& grad_out, const at::Tensor& x,
                       const at::Tensor& weight, const at::Tensor& act_saved, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
                       double slope, bool saved_is_output, std::array<bool, 4> output_mask)
