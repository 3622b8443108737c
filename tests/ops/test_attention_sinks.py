"""Attention sinks (gpt-oss's s_aux): a learned logit per query head that joins every row's softmax
denominator and adds no value, on the raw operator bmkernels::attention_fwd (sinks=, CPU kernel) and
through bmkernels.attention(..., sinks=) (with causal, window, GQA, padding; CPU and reference
backends): against a float64 plain-PyTorch reference, forward, lse and every gradient (tolerance rule:
tests/conftest.py), rows with no visible key, gradcheck, opcheck, bad input and the backends that do not
support it."""

import pytest
import torch

import bmkernels
from bmkernels import _backend, _extension
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


def public_reference(q, k, v, sinks, causal=False, window=None, key_padding_mask=None):
    """Plain PyTorch: scores (top-left causal, window (left, right), padding masked) and the head's sink
    in one softmax, the sink's column dropped."""
    q_len, k_len = q.shape[2], k.shape[2]
    i, j = torch.arange(q_len).view(-1, 1), torch.arange(k_len).view(1, -1)
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (j >= i - window[0]) & (j <= i + window[1])
    keep = keep.expand(q.shape[0], 1, q_len, k_len)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask.view(q.shape[0], 1, 1, k_len)
    return reference(q, k, v, sinks, mask=keep)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "options", ({}, {"causal": True}, {"causal": True, "window": (5, 0)}, {"window": (3, 4)}), ids=str
)
def test_public_attention_with_sinks_matches_reference(dtype, options):
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=21, k_len=21, head_dim=16, dtype=dtype)
    sinks = make_sinks(6, torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = {"q": q, "k": k, "v": v, "sinks": sinks}

    def public(**a):
        return bmkernels.attention(**a, scale=SCALE, return_lse=True, **options)

    check_against_reference(public, lambda **a: public_reference(**a, **options), inputs, dtype, lse_grad=True)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_public_attention_with_sinks_and_padding(backend):
    """Right padding (key ranges in the kernel), a row padded out entirely, transposed q/k/v, a
    strided bfloat16 sinks tensor (its gradient comes in bfloat16)."""
    q, k, v = make_qkv(batch=3, q_heads=4, kv_heads=1, q_len=13, k_len=13, head_dim=8, layout="transposed")
    sinks = (torch.randn(8, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)[::2]
    padding = torch.zeros(3, 13, dtype=torch.bool)
    padding[1, 9:] = True
    padding[2, :] = True
    inputs = {"q": q, "k": k, "v": v, "sinks": sinks.requires_grad_(), "key_padding_mask": padding}

    def public(**a):
        return bmkernels.attention(**a, scale=SCALE, causal=True, return_lse=True, backend=backend)

    out, lse, _ = check_against_reference(public, lambda **a: public_reference(**a, causal=True), inputs, torch.float32)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(lse[2], sinks.detach().float().view(-1, 1).expand(4, 13))


def test_public_attention_sinks_bad_input():
    q, k, v = make_qkv(batch=1, q_heads=4, kv_heads=2, q_len=4, head_dim=8, requires_grad=False)
    with pytest.raises(ValueError, match=r"sinks must be floating of shape \(Hq,\) = \(4,\); got torch.float32 \(2,\)"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match=r"sinks must be floating .* got torch.int64"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sinks must be floating .* got torch.float32 \(1, 4\)"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="sinks must be a torch.Tensor; got list"):
        bmkernels.attention(q, k, v, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match="sinks must be on q's device cpu; got meta"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(4, device="meta"))


@pytest.mark.skipif("attention" not in _backend.triton_ops(), reason="no Triton attention (triton not installed)")
def test_public_attention_sinks_refused_by_the_triton_backend():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, head_dim=16, requires_grad=False)
    with pytest.raises(RuntimeError, match="sinks are not supported on the Triton kernel"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(2), backend="triton")


@pytest.mark.skipif("attention" not in _extension.emulated_kernels(), reason="no emulated CUDA attention in this build")
def test_public_attention_sinks_refused_by_the_cuda_backend():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, head_dim=16, requires_grad=False)
    with pytest.raises(RuntimeError, match="sinks are not supported on the CUDA kernel"):
        bmkernels.attention(q, k, v, sinks=torch.zeros(2), backend="cuda_emulated")
