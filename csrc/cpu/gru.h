#pragma once
// CPU GRU kernels (csrc/cpu/gru.cpp), one build per ISA; each takes its op's argument struct.
#include "common/gru_params.h"
#include "cpu/isa.h"

BMK_DECLARE_ISA_KERNEL(::bmk::GruCellFwdResult, gru_cell_fwd, const ::bmk::GruCellFwdArgs& args)
BMK_DECLARE_ISA_KERNEL(::bmk::GruLayerFwdResult, gru_layer_fwd, const ::bmk::GruLayerFwdArgs& args)
BMK_DECLARE_ISA_KERNEL(::bmk::GruLayerBwdResult, gru_layer_bwd, const ::bmk::GruLayerBwdArgs& args)
