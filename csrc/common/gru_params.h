#pragma once
// The arguments of the bmkernels::gru_* operators (schemas: csrc/registration.cpp), one params struct
// per op (csrc/common/op_params.h): what the CPU kernels, the autograd and _C.gru_cell_step pass on.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/op_params.h"

namespace bmk {

using GruCellFwdResult = std::tuple<at::Tensor, at::Tensor>;               // h_next, workspace
using GruLayerFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, h_n, workspace
// dx, dh0, dw_ih, dw_hh, db_ih, db_hh
using GruLayerBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// clang-format off
#define BMK_GRU_CELL_FWD_ARGS(X)            \
  X(const at::Tensor&, x)                   \
  X(const at::Tensor&, h)                   \
  X(const at::Tensor&, w_ih)                \
  X(const at::Tensor&, w_hh)                \
  X(const std::optional<at::Tensor>&, b_ih) \
  X(const std::optional<at::Tensor>&, b_hh) \
  X(bool, save_workspace)

#define BMK_GRU_LAYER_FWD_ARGS(X)              \
  X(const at::Tensor&, x)                      \
  X(const at::Tensor&, h0)                     \
  X(const at::Tensor&, w_ih)                   \
  X(const at::Tensor&, w_hh)                   \
  X(const std::optional<at::Tensor>&, b_ih)    \
  X(const std::optional<at::Tensor>&, b_hh)    \
  X(const std::optional<at::Tensor>&, lengths) \
  X(bool, save_workspace)

#define BMK_GRU_LAYER_BWD_ARGS(X)              \
  X(const at::Tensor&, grad_out)               \
  X(const at::Tensor&, grad_h_n)               \
  X(const at::Tensor&, x)                      \
  X(const at::Tensor&, h0)                     \
  X(const at::Tensor&, w_ih)                   \
  X(const at::Tensor&, w_hh)                   \
  X(const std::optional<at::Tensor>&, lengths) \
  X(const at::Tensor&, workspace)              \
  X(bool, has_bias)
// clang-format on

BMK_OP_ARGS(GruCellFwdArgs, GruCellFwdResult, BMK_GRU_CELL_FWD_ARGS)
BMK_OP_ARGS(GruLayerFwdArgs, GruLayerFwdResult, BMK_GRU_LAYER_FWD_ARGS)
BMK_OP_ARGS(GruLayerBwdArgs, GruLayerBwdResult, BMK_GRU_LAYER_BWD_ARGS)

}  // namespace bmk
