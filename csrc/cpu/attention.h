#pragma once
// CPU attention kernels (csrc/cpu/attention.cpp), one build per ISA; each takes its op's argument struct.
#include "common/attention_params.h"
#include "cpu/isa.h"

BMK_DECLARE_ISA_KERNEL(::bmk::AttentionFwdResult, attention_fwd, const ::bmk::AttentionFwdArgs& args)
BMK_DECLARE_ISA_KERNEL(::bmk::AttentionBwdResult, attention_bwd, const ::bmk::AttentionBwdArgs& args)
BMK_DECLARE_ISA_KERNEL(::bmk::AttentionFwdResult, attention_kvcache_fwd, const ::bmk::AttentionKvcacheFwdArgs& args)
BMK_DECLARE_ISA_KERNEL(at::Tensor, attention_dropout_mask, const ::bmk::AttentionDropoutMaskArgs& args)
