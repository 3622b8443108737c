"""Property-based fuzzing of the Triton kernels (tests/fuzzing.py's strategies and checks): attention, conv2d,
the GRU cell and the multi-layer GRU on backend "triton", random shapes, options and input layouts, forward
and every gradient against the float64 reference. Without a GPU under the Triton interpreter: tiny shapes,
float32 and float16 (the interpreter has no bfloat16 arithmetic); on a GPU the same cases on CUDA tensors,
bfloat16 too. CI runs the fixed "ci" profile; `make fuzz` the long one (BMK_FUZZ_PROFILE=long)."""

import pytest
import torch
from hypothesis import given

pytest.importorskip("bmkernels.triton", reason="triton is not installed")

from tests import fuzzing  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ())
# tanh and sigmoid from exp saturate correctly where exp overflows to inf; numpy (the interpreter) warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@fuzzing.fuzz_settings(12)
@given(case=fuzzing.attention_cases(DTYPES, max_len=9, max_dim=16, max_kv_heads=2))
def test_attention(case):
    fuzzing.check_attention(case, "triton", DEVICE)


@fuzzing.fuzz_settings(12)
@given(case=fuzzing.conv_cases(DTYPES, max_size=7, max_channels=3))
def test_conv2d(case):
    fuzzing.check_conv(case, "triton", DEVICE)


@fuzzing.fuzz_settings(10)
@given(case=fuzzing.gru_cell_cases(DTYPES, max_size=6, max_batch=6))
def test_gru_cell(case):
    fuzzing.check_gru_cell(case, "triton", DEVICE)


@fuzzing.fuzz_settings(8)
@given(case=fuzzing.gru_cases(DTYPES, max_steps=4, max_size=5, max_layers=2))
def test_gru(case):
    fuzzing.check_gru(case, "triton", DEVICE)
