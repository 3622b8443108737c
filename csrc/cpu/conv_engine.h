#pragma once
// Which engine runs the heavy part of a CPU conv2d_fwd / conv2d_bwd call: bmkernels' own kernels
// (csrc/cpu/conv.cpp) or ATen's convolution (oneDNN where torch has it) with the fused epilogue in
// ATen ops around it. BMK_CONV_ENGINE=auto (default) | bmkernels | aten. In auto, the first call of
// each shape key (geometry, dtype, layout, bias / residual / activation, which gradients) times both
// engines and caches the faster, as cuDNN's benchmark mode does; later calls only look the key up.
// Compiled once (not per ISA): one cache per process.
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/conv.h"

namespace bmk::cpu {

// The conv2d_fwd / conv2d_bwd operators of the CPU dispatch key: the engine choice around `own_fwd` /
// `own_bwd`.
// bmkernels' own kernels (the active ISA's), with the operators' signatures.
using OwnConvFwd = ConvFwdResult (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                     at::IntArrayRef, int64_t, int64_t, double, bool);
using OwnConvBwd = ConvBwdResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, double, bool,
                                     std::array<bool, 4>);

ConvFwdResult conv2d_fwd_engine(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                double slope, bool save_preact, OwnConvFwd own_fwd);

ConvBwdResult conv2d_bwd_engine(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                                bool saved_is_output, std::array<bool, 4> output_mask, OwnConvBwd own_bwd);

// The cached choices as (key, engine) pairs, and their removal (bmkernels.ops.conv.engine_choices()).
std::vector<std::pair<std::string, std::string>> conv_engine_choices();
void clear_conv_engine_choices();

}  // namespace bmk::cpu
