"""Property-based fuzzing of the CPU kernels (hypothesis; strategies and checks in tests/fuzzing.py):
attention, conv2d, the GRU cell and the multi-layer GRU, with random shapes, options, dtypes and input
layouts, forward and every gradient against the float64 reference. CI runs the fixed "ci" profile;
`make fuzz` the long one (BMK_FUZZ_PROFILE=long)."""

import pytest
import torch
from hypothesis import given

from tests import fuzzing

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@pytest.fixture(autouse=True)
def own_conv_engine(monkeypatch):
    """conv2d runs bmkernels' own kernels, not a faster engine it might pick (tests/ops/test_conv_engine.py)."""
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")


@fuzzing.fuzz_settings(300)
@given(case=fuzzing.attention_cases(DTYPES + (torch.float16,)))
def test_attention(case):
    fuzzing.check_attention(case, "cpu")


@fuzzing.fuzz_settings(250)
@given(case=fuzzing.conv_cases(DTYPES))
def test_conv2d(case):
    fuzzing.check_conv(case, "cpu")


@fuzzing.fuzz_settings(150)
@given(case=fuzzing.gru_cell_cases(DTYPES))
def test_gru_cell(case):
    fuzzing.check_gru_cell(case, "cpu")


@fuzzing.fuzz_settings(200)
@given(case=fuzzing.gru_cases(DTYPES))
def test_gru(case):
    fuzzing.check_gru(case, "cpu")
