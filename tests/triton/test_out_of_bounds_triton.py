"""Out-of-bounds reads of the Triton kernels (under the interpreter without a GPU): the CPU op's cases
(tests/ops/test_out_of_bounds.py: inputs and incoming gradients as views into NaN-poisoned storage) on
backend "triton", forward and every gradient. Tiny shapes; float32 (the interpreter has no bfloat16)."""

import pytest
import torch

pytest.importorskip("bmkernels.triton", reason="triton is not installed")

from tests.ops import test_out_of_bounds as oob  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# row gaps (with poison before and after) and reversed storage order reach every addressing path
KINDS = ["gaps", "permuted"]


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", oob._ids(oob.attention_cases))
def test_attention(name, kind):
    oob.check_case(oob.attention_cases, "triton", name, kind, DEVICE, q_len=3, k_len=5, head_dim=4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", oob._ids(oob.flash_attn_cases))
def test_flash_attn(name, kind):
    oob.check_case(oob.flash_attn_cases, "triton", name, kind, DEVICE)


@pytest.mark.parametrize("kind", KINDS + ["channels_last"])
@pytest.mark.parametrize("name", oob._ids(oob.conv_cases))
def test_conv2d(name, kind):
    oob.check_case(oob.conv_cases, "triton", name, kind, DEVICE)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", oob._ids(oob.gru_cases))
def test_gru(name, kind):
    oob.check_case(oob.gru_cases, "triton", name, kind, DEVICE)
