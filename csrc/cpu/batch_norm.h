#pragma once
// CPU training-mode BatchNorm fused with its residual and activation (csrc/cpu/batch_norm.cpp), one
// build per ISA; each takes its op's argument struct.
#include "common/batch_norm_params.h"
#include "cpu/isa.h"

BMK_DECLARE_ISA_KERNEL(::bmk::BatchNormActFwdResult, batch_norm_act_fwd, const ::bmk::BatchNormActFwdArgs& args)
BMK_DECLARE_ISA_KERNEL(::bmk::BatchNormActBwdResult, batch_norm_act_bwd, const ::bmk::BatchNormActBwdArgs& args)
