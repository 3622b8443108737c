"""Out-of-bounds reads of the CUDA C++ kernels run by the SIMT emulator (backend "cuda_emulated"): the CPU
op's cases (tests/ops/test_out_of_bounds.py: inputs and incoming gradients as views into NaN-poisoned
storage), forward and every gradient, tiny shapes."""

import pytest

from bmkernels import _extension
from tests.ops import test_out_of_bounds as oob

pytestmark = pytest.mark.skipif(
    set(_extension.emulated_kernels()) != {"attention", "conv2d", "gru"}, reason="built without BMK_CUDA_EMULATOR=1"
)
# row gaps (with poison before and after) and reversed storage order reach every addressing path
KINDS = ["gaps", "permuted"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", oob._ids(oob.attention_cases))
def test_attention(name, kind):
    oob.check_case(oob.attention_cases, "cuda_emulated", name, kind, q_len=3, k_len=5, head_dim=4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["func"])  # packed sequences (varlen) do not run on the CUDA kernel yet
def test_flash_attn(name, kind):
    oob.check_case(oob.flash_attn_cases, "cuda_emulated", name, kind)


@pytest.mark.parametrize("kind", KINDS + ["channels_last"])
@pytest.mark.parametrize("name", oob._ids(oob.conv_cases))
def test_conv2d(name, kind):
    oob.check_case(oob.conv_cases, "cuda_emulated", name, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", oob._ids(oob.gru_cases))
def test_gru(name, kind):
    oob.check_case(oob.gru_cases, "cuda_emulated", name, kind)
