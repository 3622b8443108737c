#pragma once
// CPU GRU kernels (csrc/cpu/gru.cpp), one build per ISA. Arguments as in the bmkernels::gru_*
// schemas (csrc/registration.cpp).
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace bmk::cpu {
using GruCellFwdResult = std::tuple<at::Tensor, at::Tensor>;               // h_next, workspace
using GruLayerFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, h_n, workspace
// dx, dh0, dw_ih, dw_hh, db_ih, db_hh
using GruLayerBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}  // namespace bmk::cpu

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::GruCellFwdResult, gru_cell_fwd, const at::Tensor& x, const at::Tensor& h,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, bool save_workspace)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::GruLayerFwdResult, gru_layer_fwd, const at::Tensor& x, const at::Tensor& h0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& lengths,
                       bool save_workspace)

BMK_DECLARE_ISA_KERNEL(::bmk::cpu::GruLayerBwdResult, gru_layer_bwd, const at::Tensor& grad_out,
                       const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, const at::Tensor& workspace,
                       bool has_bias)
