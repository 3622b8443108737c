"""Attention sinks (gpt-oss's s_aux): a learned logit per query head that joins every row's softmax
denominator and adds no value, on the raw operator bmkernels::attention_fwd (sinks=, CPU kernel):
against a float64 plain-PyTorch reference, forward, lse and every gradient (tolerance rule:
tests/conftest.py), rows with no visible key, gradcheck, opcheck, bad input and the backends that do not
support it."""

import pytest
import torch

from bmkernels import _extension
from bmkernels.testing import FLOAT_DTYPES, check_against_reference, make_qkv

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not built")

SCALE = 0.3


def kernel(q, k, v, sinks, mask=None):
    return torch.ops.bmkernels.attention_fwd(q, k, v, None, mask, None, None, SCALE, 0.0, -1, -1, 0, 0.0, sinks=sinks)


def reference(q, k, v, sinks, mask=None):
    """Softmax over each row's scores and its head's sink, the sink's probability dropped."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * SCALE
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    full = torch.cat([scores, sink], dim=-1)
    out = torch.softmax(full, dim=-1)[..., :-1] @ v
    lse = torch.logsumexp(full, dim=-1)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def make_sinks(heads, dtype=torch.float32, seed=3):
    """float32 logits (float64 for float64 inputs: the gradient comes in the sinks' dtype)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, generator=gen) * 2).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
def test_sinks_match_reference(dtype, layout):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, k_len=53, head_dim=16, dtype=dtype, layout=layout)
    sinks = make_sinks(4, torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = {"q": q, "k": k, "v": v, "sinks": sinks}
    check_against_reference(kernel, reference, inputs, dtype, lse_grad=True)


def test_sinks_with_rows_that_see_no_key():
    """A row with every key masked gives out 0 and lse the sink (its softmax is the sink alone)."""
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=9, k_len=12, head_dim=8)
    mask = torch.rand(2, 1, 9, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[1, :, 4] = False
    sinks = make_sinks(2)
    inputs = {"q": q, "k": k, "v": v, "sinks": sinks, "mask": mask}
    out, lse, _ = check_against_reference(kernel, reference, inputs, torch.float32)
    assert torch.equal(out[1, :, 4], torch.zeros_like(out[1, :, 4]))
    assert torch.equal(lse[1, :, 4], sinks.detach())


def test_sinks_gradcheck():
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=5, k_len=7, head_dim=4, dtype=torch.float64)
    sinks = make_sinks(2, torch.float64)
    torch.autograd.gradcheck(lambda *t: kernel(*t), (q, k, v, sinks))


def test_sinks_opcheck():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=6, k_len=6, head_dim=8)
    args = (q, k, v, None, None, None, None, SCALE, 0.0, -1, -1, 0, 0.0)
    torch.library.opcheck(torch.ops.bmkernels.attention_fwd.default, args, {"sinks": make_sinks(2)})


def test_sinks_bad_input_names_the_argument():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, head_dim=8, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"sinks must be a floating CPU tensor of shape \(Hq,\) = \(2\); got \[3\]"):
        kernel(q, k, v, torch.zeros(3))
    with pytest.raises(RuntimeError, match="sinks must be a floating"):
        kernel(q, k, v, torch.zeros(2, dtype=torch.int64))


@pytest.mark.skipif("attention" not in _extension.emulated_kernels(), reason="no emulated CUDA attention in this build")
def test_sinks_not_supported_on_the_cuda_kernel():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, head_dim=16, requires_grad=False)
    args = (q, k, v, None, None, None, None, SCALE, 0.0, -1, -1, 0, 0.0)
    with pytest.raises(RuntimeError, match="sinks are not supported on the CUDA kernel"):
        torch.ops.bmkernels.attention_emulated_fwd(*args, sinks=torch.zeros(2))


def test_sinks_not_supported_on_the_triton_kernel():
    pytest.importorskip("triton", reason="triton is not installed")
    triton_attention = pytest.importorskip("bmkernels.triton.attention")
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, head_dim=16, requires_grad=False)
    args = (q, k, v, None, None, None, None, SCALE, 0.0, -1, -1, 0, 0.0)
    with pytest.raises(RuntimeError, match="sinks are not supported on the Triton kernel"):
        triton_attention.attention_fwd(*args, sinks=torch.zeros(2))
