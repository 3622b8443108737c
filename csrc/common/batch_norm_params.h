#pragma once
// The arguments of bmkernels::batch_norm_act_fwd / batch_norm_act_bwd (schemas: csrc/registration.cpp),
// one params struct per op (csrc/common/op_params.h): what the CPU kernels and the autograd pass on.
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/op_params.h"

namespace bmk {

// out, mean, invstd, var (biased), pre-activation
using BatchNormActFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// dx, dweight, dbias, dresidual
using BatchNormActBwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BatchNormActGradMask = std::array<bool, 4>;  // which of BatchNormActBwdResult to compute

// clang-format off
#define BMK_BATCH_NORM_ACT_FWD_ARGS(X)            \
  X(const at::Tensor&, x)                         \
  X(const std::optional<at::Tensor>&, weight)     \
  X(const std::optional<at::Tensor>&, bias)       \
  X(const std::optional<at::Tensor>&, residual)   \
  X(double, eps)                                  \
  X(int64_t, activation)                          \
  X(double, slope)                                \
  X(bool, save_preact)

#define BMK_BATCH_NORM_ACT_BWD_ARGS(X)        \
  X(const at::Tensor&, grad_out)              \
  X(const at::Tensor&, x)                     \
  X(const std::optional<at::Tensor>&, weight) \
  X(const at::Tensor&, mean)                  \
  X(const at::Tensor&, invstd)                \
  X(const at::Tensor&, act_saved)             \
  X(int64_t, activation)                      \
  X(double, slope)                            \
  X(bool, saved_is_output)                    \
  X(bmk::BatchNormActGradMask, output_mask)
// clang-format on

BMK_OP_ARGS(BatchNormActFwdArgs, BatchNormActFwdResult, BMK_BATCH_NORM_ACT_FWD_ARGS)
BMK_OP_ARGS(BatchNormActBwdArgs, BatchNormActBwdResult, BMK_BATCH_NORM_ACT_BWD_ARGS)

}  // namespace bmk
