"""Padding as per-batch key ranges and the public causal offset (bmkernels.attention key_range=,
key_padding_mask= as ranges, causal_offset=), on the CPU kernel and the Triton kernel (under the
interpreter without a GPU): against the reference, forward and every gradient (tolerance rule:
tests/conftest.py), gradcheck, opcheck, torch.compile, bad input through the public function and the
raw operators, and -- for Triton -- the key blocks outside a range counted as skipped."""

import sys

import pytest
import torch

import bmkernels
from bmkernels.ops.attention import key_range_of
from bmkernels.reference import attention as reference
from bmkernels.testing import FLOAT_DTYPES, check_against_reference, make_qkv


def kernel_fn(backend=None, **options):
    return lambda q, k, v, **tensors: bmkernels.attention(q, k, v, backend=backend, **options, **tensors)


def reference_fn(**options):
    return lambda q, k, v, **tensors: reference.attention(q, k, v, **options, **tensors)


def ranges(*rows):
    return torch.tensor(rows, dtype=torch.int64)


# (key_range rows for B = 3 over Lk = 70, options): right padding, left padding, an empty sequence,
# a range inside one key block, with causal alignments, a window and GQA.
CASES = {
    "right": ([[0, 70], [0, 41], [0, 1]], {}),
    "left": ([[0, 70], [29, 70], [69, 70]], {}),
    "both_ends": ([[3, 67], [10, 20], [0, 70]], {}),
    "empty_row": ([[0, 70], [0, 0], [35, 35]], {}),
    "causal_top_left": ([[0, 70], [0, 41], [12, 70]], {"causal": True}),
    "causal_bottom_right": ([[0, 70], [0, 41], [12, 70]], {"causal": True, "causal_alignment": "bottom_right"}),
    "window": ([[0, 70], [5, 50], [30, 70]], {"window": (9, 3)}),
    "softcap_alibi": ([[0, 70], [0, 33], [20, 70]], {"softcap": 2.0, "alibi_slopes": torch.tensor([0.2, 0.4])}),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_key_range_matches_reference(case, dtype):
    rows, options = CASES[case]
    q, k, v = make_qkv(batch=3, q_heads=2, kv_heads=1, q_len=45, k_len=70, head_dim=16, v_head_dim=12, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, "key_range": ranges(*rows)}
    check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype)


@pytest.mark.parametrize("side", ("right", "left"))
def test_key_padding_mask_runs_as_ranges(side, monkeypatch):
    """Right/left padding reaches the kernel as key ranges (no mask tensor), and matches the reference."""
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=40, k_len=40, head_dim=8)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    if side == "right":
        pad[1, 30:] = True
    else:
        pad[1, :10] = True
    seen = []
    real_op = torch.ops.bmkernels.attention_fwd

    def spy(*args, **kwargs):
        seen.append(args)
        return real_op(*args, **kwargs)

    monkeypatch.setattr("bmkernels.ops.attention.forward_op", lambda op, backend: spy)
    check_against_reference(
        kernel_fn(causal=True), reference_fn(causal=True), {"q": q, "k": k, "v": v, "key_padding_mask": pad}, q.dtype
    )
    mask_arg, key_range_arg = seen[0][4], seen[0][-1]
    assert mask_arg is None
    expected = [[0, 40], [0, 30]] if side == "right" else [[0, 40], [10, 40]]
    assert key_range_arg.tolist() == expected


def test_key_padding_with_holes_is_a_mask():
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=20, k_len=20, head_dim=8)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 5:8] = True  # a hole: not one run of keys
    assert key_range_of(~pad) is None
    check_against_reference(kernel_fn(), reference_fn(), {"q": q, "k": k, "v": v, "key_padding_mask": pad}, q.dtype)


def test_key_range_of():
    keep = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert key_range_of(keep).tolist() == [[0, 3], [1, 4], [0, 0], [0, 4], [1, 2]]
    assert key_range_of(torch.tensor([[1, 0, 1]], dtype=torch.bool)) is None
    assert key_range_of(torch.zeros(2, 0, dtype=torch.bool)).tolist() == [[0, 0], [0, 0]]


def test_key_range_and_padding_intersect():
    q, k, v = make_qkv(batch=2, q_heads=1, q_len=9, k_len=30, head_dim=8, requires_grad=False)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    pad[:, 25:] = True
    out = bmkernels.attention(q, k, v, key_range=ranges([5, 30], [0, 20]), key_padding_mask=pad)
    truth = reference.attention(q, k, v, key_range=ranges([5, 25], [0, 20]))
    torch.testing.assert_close(out, truth)


def test_empty_range_gives_zeros_and_zero_gradients():
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=6, k_len=8, head_dim=4)
    out, lse = bmkernels.attention(q, k, v, key_range=ranges([0, 8], [3, 3]), return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))


def test_padding_keys_get_zero_gradients():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=10, k_len=300, head_dim=8)
    bmkernels.attention(
        q, k, v, causal=True, causal_alignment="bottom_right", key_range=ranges([140, 290])
    ).sum().backward()
    assert torch.equal(k.grad[:, :, :140], torch.zeros_like(k.grad[:, :, :140]))
    assert torch.equal(v.grad[:, :, 290:], torch.zeros_like(v.grad[:, :, 290:]))
    assert k.grad[:, :, 285:290].abs().sum() > 0


@pytest.mark.parametrize("offset", (-3, 0, 4, 12))
def test_causal_offset_matches_reference(offset):
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=9, k_len=14, head_dim=8)
    options = {"causal": True, "causal_offset": offset, "window": (5, -1)}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, q.dtype)


def test_causal_offset_equals_alignments():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=5, k_len=11, head_dim=8, requires_grad=False)
    bottom = bmkernels.attention(q, k, v, causal=True, causal_alignment="bottom_right")
    torch.testing.assert_close(bmkernels.attention(q, k, v, causal=True, causal_offset=6), bottom, rtol=0, atol=0)


def test_huge_window_is_unbounded():
    """A window bound of sys.maxsize means no bound (no int64 overflow in the position sums)."""
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=7, k_len=9, head_dim=8, requires_grad=False)
    out = bmkernels.attention(q, k, v, window=(sys.maxsize, sys.maxsize))
    torch.testing.assert_close(out, bmkernels.attention(q, k, v))
    causal = bmkernels.attention(q, k, v, causal=True, window=(sys.maxsize, 0))
    torch.testing.assert_close(causal, bmkernels.attention(q, k, v, causal=True))


def test_gradcheck_key_range():
    q, k, v = make_qkv(batch=2, q_heads=2, kv_heads=1, q_len=5, k_len=7, head_dim=4, dtype=torch.float64)

    def fn(q, k, v):
        # bottom-right: every query sees a key of its range (an empty row's lse is -inf: no finite difference)
        return bmkernels.attention(
            q, k, v, causal=True, causal_alignment="bottom_right", key_range=ranges([1, 7], [0, 4]), return_lse=True
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def _fwd_args(key_range):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=7, k_len=9, head_dim=8, requires_grad=False)
    return (q, k, v, None, None, None, None, 0.35, 0.0, -1, 0, 2, 0.0, key_range)


def test_opcheck_with_key_range():
    args = _fwd_args(ranges([2, 9], [0, 5]))
    torch.library.opcheck(torch.ops.bmkernels.attention_fwd.default, args)
    q, k, v, *rest = args
    out, lse = torch.ops.bmkernels.attention_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, out, lse, None, *rest[:-1], False, rest[-1])
    torch.library.opcheck(torch.ops.bmkernels.attention_bwd.default, bwd)


def test_old_operator_calls_keep_working():
    """key_range is the last argument, with a default: a call without it is unchanged."""
    args = _fwd_args(None)
    with_default = torch.ops.bmkernels.attention_fwd(*args[:-1])
    torch.testing.assert_close(with_default, torch.ops.bmkernels.attention_fwd(*args))


def test_compile_fullgraph_key_range():
    torch._dynamo.reset()
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=11, k_len=13, head_dim=8)
    key_range = ranges([0, 13], [4, 10])

    def fn(q, k, v, key_range):
        return bmkernels.attention(q, k, v, causal=True, causal_offset=2, key_range=key_range)

    eager = fn(q, k, v, key_range)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, key_range)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    g_compiled = torch.autograd.grad(compiled.sum(), (q, k, v))
    for a, b in zip(g_eager, g_compiled, strict=True):
        torch.testing.assert_close(b, a)


BAD_RANGES = {
    "dtype": (torch.tensor([[0, 9], [0, 9]], dtype=torch.int32), ValueError, "key_range must be int64"),
    "shape": (ranges([0, 9]), ValueError, r"shape \(B, 2\)"),
    "end_past_keys": (ranges([0, 9], [0, 10]), ValueError, "row 1 is"),
    "begin_after_end": (ranges([5, 4], [0, 9]), ValueError, "row 0 is"),
    "negative": (ranges([-1, 4], [0, 9]), ValueError, "row 0 is"),
    "not_a_tensor": ([[0, 9], [0, 9]], TypeError, "key_range must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD_RANGES)
def test_bad_key_range(case):
    bad, error, match = BAD_RANGES[case]
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=7, k_len=9, head_dim=8, requires_grad=False)
    with pytest.raises(error, match=match):
        bmkernels.attention(q, k, v, key_range=bad)


@pytest.mark.parametrize("case", [c for c in BAD_RANGES if c != "not_a_tensor"])
def test_bad_key_range_raw_operators(case):
    bad = BAD_RANGES[case][0]
    args = _fwd_args(bad)
    with pytest.raises(RuntimeError, match="key_range"):
        torch.ops.bmkernels.attention_fwd(*args)
    good_out, good_lse = torch.ops.bmkernels.attention_fwd(*args[:-1])
    q, k, v, *rest = args
    with pytest.raises(RuntimeError, match="key_range"):
        torch.ops.bmkernels.attention_bwd(
            torch.ones_like(good_out), q, k, v, good_out, good_lse, None, *rest[:-1], False, bad
        )


@pytest.mark.parametrize(
    "value,error,match",
    [
        (True, TypeError, "causal_offset must be an int"),
        (2.0, TypeError, "causal_offset must be an int"),
        (2**62, ValueError, "within"),
    ],
)
def test_bad_causal_offset(value, error, match):
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=3, k_len=3, head_dim=4, requires_grad=False)
    with pytest.raises(error, match=match):
        bmkernels.attention(q, k, v, causal=True, causal_offset=value)


def test_causal_offset_with_alignment_is_an_error():
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=3, k_len=3, head_dim=4, requires_grad=False)
    with pytest.raises(ValueError, match="not both"):
        bmkernels.attention(q, k, v, causal=True, causal_offset=1, causal_alignment="bottom_right")


# ------------------------------------------------------------------------------------------------
# Bool masks with structure: the kernels visit only the tiles inside each block's hull of kept keys.


def _document_mask(length, docs, shape=(1, 1)):
    doc = torch.arange(length) * docs // length
    return (doc[:, None] == doc[None, :]).expand(*shape, length, length)


@pytest.mark.parametrize(
    "mask_of",
    [
        lambda: _document_mask(300, 4),  # shared by every batch and head
        lambda: torch.stack([_document_mask(300, 3)[0], _document_mask(300, 5)[0]]).expand(2, 3, 300, 300),
        lambda: _document_mask(300, 4, (2, 3)) & (torch.arange(300) < 290)[:, None],  # fully masked query rows
        lambda: _document_mask(300, 6).transpose(-1, -2).contiguous() | torch.eye(300, dtype=torch.bool),
    ],
    ids=("shared", "per_batch", "empty_rows", "transposed_layout"),
)
@pytest.mark.parametrize("causal", (False, True))
def test_structured_masks_match_reference(mask_of, causal):
    q, k, v = make_qkv(batch=2, q_heads=3, kv_heads=1, q_len=300, k_len=300, head_dim=16)
    options = {"causal": causal}
    check_against_reference(
        kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v, "mask": mask_of()}, q.dtype
    )


def test_mask_blocks_all_kept_and_mixed():
    """Query blocks whose mask rows are all kept skip the mask select, the others apply it: 64-row
    blocks all kept, one block mixed, one block with a masked column (and the backward's key blocks)."""
    gen = torch.Generator().manual_seed(8)
    mask = torch.ones(200, 260, dtype=torch.bool)
    mask[64:128] = torch.rand(64, 260, generator=gen) < 0.6
    mask[150:, 131] = False
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=200, k_len=260, head_dim=16)
    check_against_reference(kernel_fn(), reference_fn(), {"q": q, "k": k, "v": v, "mask": mask}, q.dtype)
