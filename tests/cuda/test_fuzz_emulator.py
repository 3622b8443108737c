"""Property-based fuzzing of the CUDA C++ kernels run by the SIMT emulator on CPU tensors (backend
"cuda_emulated"; tests/fuzzing.py's strategies and checks): attention, conv2d, the GRU cell and the multi-layer
GRU with random shapes, options and input layouts, forward and every gradient against the float64 reference.
Tiny shapes (the emulator runs one fiber per CUDA thread); float32, float16 and bfloat16. CI runs the fixed "ci"
profile; `make fuzz` the long one (BMK_FUZZ_PROFILE=long)."""

import pytest
import torch
from hypothesis import given

from bmkernels import _extension
from tests import fuzzing

pytestmark = pytest.mark.skipif(
    set(_extension.emulated_kernels()) != {"attention", "conv2d", "gru"}, reason="built without BMK_CUDA_EMULATOR=1"
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@fuzzing.fuzz_settings(40)
@given(case=fuzzing.attention_cases(DTYPES, max_len=9, max_dim=16, max_kv_heads=2))
def test_attention(case):
    fuzzing.check_attention(case, "cuda_emulated")


@fuzzing.fuzz_settings(40)
@given(case=fuzzing.conv_cases(DTYPES, max_size=7, max_channels=3))
def test_conv2d(case):
    fuzzing.check_conv(case, "cuda_emulated")


@fuzzing.fuzz_settings(30)
@given(case=fuzzing.gru_cell_cases(DTYPES, max_size=6, max_batch=6))
def test_gru_cell(case):
    fuzzing.check_gru_cell(case, "cuda_emulated")


@fuzzing.fuzz_settings(30)
@given(case=fuzzing.gru_cases(DTYPES, max_steps=4, max_size=5, max_layers=2))
def test_gru(case):
    fuzzing.check_gru(case, "cuda_emulated")
