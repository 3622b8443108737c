"""bmkernels.attention and bmkernels.scaled_dot_product_attention (CPU kernel) against the
reference (bmkernels/reference/attention.py) and torch.nn.functional.scaled_dot_product_attention:
forward, every gradient, lse, every feature, dtypes, awkward shapes, ISA paths, dropout, gradcheck,
opcheck, torch.compile, bad inputs and empty tensors. Tolerance rule: tests/conftest.py."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bmkernels
from bmkernels.reference import attention as reference
from bmkernels.testing import (
    FLOAT_DTYPES,
    check_against_reference,
    cpu_supports,
    make_qkv,
)

ISAS = ("scalar", "avx2", "avx512")


def kernel_fn(**options):
    return lambda q, k, v, **tensors: bmkernels.attention(q, k, v, **options, **tensors)


def reference_fn(**options):
    return lambda q, k, v, **tensors: reference.attention(q, k, v, **options, **tensors)


def draw_seed(manual_seed):
    """The Philox seed bmkernels.attention draws after torch.manual_seed(manual_seed) (ops/attention.py
    _draw_seed), drawn the same way."""
    torch.manual_seed(manual_seed)
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)


def dropout_pair(manual_seed, p, grid, **options):
    """(kernel_fn, reference_fn) for dropout p: the kernel draws its seed after
    torch.manual_seed(manual_seed); the reference gets the keep-mask that seed gives."""
    keep = bmkernels.dropout_keep_mask(draw_seed(manual_seed), *grid, p)

    def kern(q, k, v, **tensors):
        torch.manual_seed(manual_seed)
        return bmkernels.attention(q, k, v, dropout_p=p, **options, **tensors)

    def ref(q, k, v, **tensors):
        return reference.attention(q, k, v, dropout_p=p, dropout_mask=keep, **options, **tensors)

    return kern, ref


def rand_float(*shape, dtype=torch.float32, requires_grad=False, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def rand_bool(*shape, p_keep=0.7, seed=6):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p_keep


# ------------------------------------------------------------------------------------------------
# The tolerance rule itself can fail.


def test_tolerance_rule_rejects_wrong_results():
    q, k, v = make_qkv(q_len=9, k_len=11)
    inputs = {"q": q, "k": k, "v": v}
    with pytest.raises(AssertionError, match="out .*kernel error"):  # 1e-4 relative off in float32
        check_against_reference(
            lambda q, k, v: bmkernels.attention(q, k, v) * (1 + 1e-4), reference_fn(), inputs, torch.float32
        )
    with pytest.raises(AssertionError, match="grad k"):  # a gradient off by 1e-4 everywhere

        def wrong_dk(q, k, v):
            return bmkernels.attention(q, k, v) + 1e-4 * (k.sum() - k.sum().detach())

        check_against_reference(wrong_dk, reference_fn(), inputs, torch.float32)
    with pytest.raises(AssertionError, match="out"):  # a NaN
        check_against_reference(
            lambda q, k, v: bmkernels.attention(q, k, v).index_fill(2, torch.tensor([3]), math.nan),
            reference_fn(),
            inputs,
            torch.float32,
        )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with pytest.raises(AssertionError, match="float64"):  # float64 held to 1e-10
        check_against_reference(
            lambda q, k, v: bmkernels.attention(q, k, v) * (1 + 1e-9),
            reference_fn(),
            {"q": q64, "k": k64, "v": v64},
            torch.float64,
        )
    # and the unmodified kernel passes the same checks
    check_against_reference(kernel_fn(), reference_fn(), inputs, torch.float32)


# ------------------------------------------------------------------------------------------------
# Every feature, forward + lse + every gradient, in every dtype.
# Each case: (shape kwargs for make_qkv, options for attention, extra tensors builder).
B, H, LQ, LK, D = 2, 2, 17, 33, 16


def _bias(shape, grad=True):
    return lambda dtype: {"bias": rand_float(*shape, dtype=dtype, requires_grad=grad, seed=11)}


def _mask(shape):
    return lambda dtype: {"mask": rand_bool(*shape)}


def _key_padding(dtype):
    pad = torch.zeros(B, LK, dtype=torch.bool)
    pad[0, 5:9] = True
    pad[1, -7:] = True
    return {"key_padding_mask": pad}


def _alibi(shape):
    return lambda dtype: {"alibi_slopes": torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 0.5}


FEATURES = {
    "plain": ({}, {}, None),
    "lq_gt_lk": ({"q_len": 33, "k_len": 17}, {}, None),
    "causal_top_left_lq_lt_lk": ({}, {"causal": True}, None),
    "causal_top_left_lq_gt_lk": ({"q_len": 33, "k_len": 17}, {"causal": True}, None),
    "causal_bottom_right_lq_lt_lk": ({}, {"causal": True, "causal_alignment": "bottom_right"}, None),
    # the first Lq - Lk queries see no key under bottom-right alignment: zeros and lse = -inf
    "causal_bottom_right_lq_gt_lk": (
        {"q_len": 33, "k_len": 17},
        {"causal": True, "causal_alignment": "bottom_right"},
        None,
    ),
    "bias_full_grad": ({}, {}, _bias((B, H, LQ, LK))),
    "bias_lq_lk_grad": ({}, {}, _bias((LQ, LK))),
    "bias_b11lk_grad": ({}, {}, _bias((B, 1, 1, LK))),
    "bias_1hlqlk_grad": ({}, {}, _bias((1, H, LQ, LK))),
    "bias_b1lqlk_grad": ({}, {}, _bias((B, 1, LQ, LK))),
    "bias_no_grad": ({}, {}, _bias((B, H, 1, LK), grad=False)),
    "mask_lq_lk": ({}, {}, _mask((LQ, LK))),
    "mask_b11lk": ({}, {}, _mask((B, 1, 1, LK))),
    "mask_full": ({}, {}, _mask((B, H, LQ, LK))),
    "key_padding_mask": ({}, {}, _key_padding),
    "window": ({}, {"window": (3, 2)}, None),
    "window_left_unbounded": ({}, {"window": (-1, 2)}, None),
    "window_right_unbounded": ({}, {"window": (4, -1)}, None),
    "window_causal": ({}, {"window": (5, -1), "causal": True}, None),
    "window_causal_bottom_right": (
        {},
        {"window": (5, 3), "causal": True, "causal_alignment": "bottom_right"},
        None,
    ),
    "softcap": ({}, {"softcap": 2.0}, None),
    "alibi_h": ({}, {"causal": True}, _alibi((H,))),
    "alibi_bh_bottom_right": ({}, {"causal_alignment": "bottom_right"}, _alibi((B, H))),
    "gqa": ({"q_heads": 4, "kv_heads": 2}, {}, None),
    "mqa_causal": ({"q_heads": 4, "kv_heads": 1}, {"causal": True}, None),
    "scale": ({}, {"scale": 0.37}, None),
    # scores of std ~12: the online softmax must subtract its running max, never overflow
    "large_scores": ({}, {"scale": 3.0, "causal": True}, _bias((LQ, LK))),
    "v_head_dim_differs": ({"v_head_dim": 24}, {}, None),
    "everything": (
        {"q_heads": 4, "kv_heads": 2, "v_head_dim": 8},
        {"causal": True, "causal_alignment": "bottom_right", "window": (9, 1), "softcap": 3.0, "scale": 0.3},
        lambda dtype: {
            **_bias((B, 4, LQ, LK))(dtype),
            **_mask((B, 1, LQ, LK))(dtype),
            **_key_padding(dtype),
            **_alibi((4,))(dtype),
        },
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", FEATURES)
def test_feature_matches_reference(case, dtype):
    shape, options, extra = FEATURES[case]
    q, k, v = make_qkv(**{"batch": B, "q_heads": H, "q_len": LQ, "k_len": LK, "head_dim": D, **shape}, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, **(extra(dtype) if extra else {})}
    options = {**options, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize(
    "case",
    ["plain", "causal_bottom_right_lq_lt_lk", "bias_lq_lk_grad", "gqa", "softcap", "alibi_h", "window"],
)
def test_gradient_through_lse(case, dtype):
    """A loss that uses lse as well as out: the lse gradient folds into the backward."""
    shape, options, extra = FEATURES[case]
    q, k, v = make_qkv(**{"batch": B, "q_heads": H, "q_len": LQ, "k_len": LK, "head_dim": D, **shape}, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, **(extra(dtype) if extra else {})}
    options = {**options, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype, lse_grad=True)


def test_lse_only_loss():
    """Gradient of a loss on lse alone (out unused) matches the reference."""
    q, k, v = make_qkv(q_len=9, k_len=13, dtype=torch.float64)
    bias = rand_float(9, 13, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(
        bmkernels.attention(q, k, v, bias=bias, return_lse=True)[1].sum(), (q, k, bias), allow_unused=True
    )
    want = torch.autograd.grad(reference.attention(q, k, v, bias=bias, return_lse=True)[1].sum(), (q, k, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Shapes: head dims, lengths, layouts.


@pytest.mark.parametrize(
    "head_dim,v_head_dim",
    [
        (1, 1),
        (8, 8),
        (40, 40),
        (59, 59),
        (64, 64),
        (111, 111),
        (128, 128),
        (256, 256),
        (512, 512),
        (64, 32),
        (40, 111),
        (8, 1),
        (1, 8),
        (512, 64),
    ],
)
def test_head_dims(head_dim, v_head_dim):
    q, k, v = make_qkv(q_len=17, k_len=33, head_dim=head_dim, v_head_dim=v_head_dim)
    options = {"causal": True, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, torch.float32)


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("head_dim", (59, 128))
def test_head_dims_other_dtypes(head_dim, dtype):
    q, k, v = make_qkv(q_len=17, k_len=33, head_dim=head_dim, dtype=dtype)
    options = {"causal": True, "causal_alignment": "bottom_right", "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, dtype)


@pytest.mark.parametrize(
    "q_len,k_len", [(1, 1), (1, 17), (17, 1), (97, 113), (113, 97), (203, 203), (203, 17), (17, 203)]
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": True, "causal_alignment": "bottom_right"},
        {"causal": True, "window": (37, -1)},
        {"window": (20, 45), "causal_alignment": "bottom_right"},
    ],
    ids=["full", "causal_br", "causal_window", "window_br"],
)
def test_awkward_lengths(q_len, k_len, options):
    q, k, v = make_qkv(batch=1, q_len=q_len, k_len=k_len, head_dim=24)
    options = {**options, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, torch.float32)


@pytest.mark.parametrize(
    "dtype,q_len,options",
    [
        (torch.float32, 1025, {"causal": True}),
        (torch.bfloat16, 7, {"causal": True, "causal_alignment": "bottom_right", "window": (300, -1)}),
    ],
    ids=["f32_causal_square", "bf16_decode_window"],
)
def test_length_1025(dtype, q_len, options):
    """Lengths past the kernels' query/key blocks (64/512 forward, 128/128 backward)."""
    q, k, v = make_qkv(batch=1, q_heads=1, q_len=q_len, k_len=1025, head_dim=32, dtype=dtype)
    bias = rand_float(1, 1, 1, 1025, dtype=dtype, requires_grad=True)
    options = {**options, "return_lse": True}
    check_against_reference(
        kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v, "bias": bias}, dtype
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("transposed", "sliced"))
def test_non_contiguous_inputs(layout, dtype):
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=17, k_len=23, head_dim=24, v_head_dim=8, dtype=dtype, layout=layout)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    bias = rand_float(2, 4, 23, 17, dtype=dtype).transpose(-1, -2).requires_grad_()  # a transposed view
    mask = rand_bool(23, 1).expand(23, 17).t()  # stride-0 view
    pad = torch.zeros(2, 46, dtype=torch.bool)[:, ::2]
    pad[1, :3] = True
    assert not (bias.is_contiguous() or mask.is_contiguous() or pad.is_contiguous())
    options = {"causal": True, "causal_alignment": "bottom_right", "return_lse": True}
    check_against_reference(
        kernel_fn(**options),
        reference_fn(**options),
        {"q": q, "k": k, "v": v, "bias": bias, "mask": mask, "key_padding_mask": pad},
        dtype,
    )


# bf16 runs its forward GEMMs in bf16 where AMX makes that faster (BMK_CPU_BF16_GEMM=auto); both
# paths are forced here so that each is tested on every machine.
BF16_GEMM_CASES = ["plain", "causal_bottom_right_lq_lt_lk", "mask_full", "key_padding_mask", "softcap", "gqa"]
BF16_GEMM_CASES += ["v_head_dim_differs", "large_scores", "everything"]


@pytest.mark.parametrize("gemm", ("native", "fp32"))
@pytest.mark.parametrize("case", BF16_GEMM_CASES)
def test_bf16_gemm_paths(case, gemm, monkeypatch):
    monkeypatch.setenv("BMK_CPU_BF16_GEMM", gemm)
    shape, options, extra = FEATURES[case]
    dims = {"batch": B, "q_heads": H, "q_len": LQ, "k_len": LK, "head_dim": D, **shape}
    q, k, v = make_qkv(**dims, dtype=torch.bfloat16)
    inputs = {"q": q, "k": k, "v": v, **(extra(torch.bfloat16) if extra else {})}
    options = {**options, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, torch.bfloat16)


@pytest.mark.parametrize("gemm", ("native", "fp32"))
@pytest.mark.parametrize("head_dim,v_head_dim,q_len,k_len", [(1, 1, 5, 7), (59, 24, 97, 333), (128, 128, 130, 300)])
def test_bf16_gemm_paths_shapes(head_dim, v_head_dim, q_len, k_len, gemm, monkeypatch):
    """Odd head dims and lengths that are not multiples of the tiles, through sliced (strided) inputs."""
    monkeypatch.setenv("BMK_CPU_BF16_GEMM", gemm)
    q, k, v = make_qkv(
        q_len=q_len, k_len=k_len, head_dim=head_dim, v_head_dim=v_head_dim, dtype=torch.bfloat16, layout="sliced"
    )
    options = {"causal": True, "causal_alignment": "bottom_right", "dropout_p": 0.0, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, torch.bfloat16)


@pytest.mark.parametrize("gemm", ("native", "fp32"))
@pytest.mark.parametrize("layout", ("transposed", "sliced"))
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("head_dim,v_head_dim,k_len", [(40, 40, 601), (33, 17, 545), (96, 80, 64)])
def test_bf16_gemm_paths_packing(head_dim, v_head_dim, k_len, causal, layout, gemm, monkeypatch):
    """The native path packs K and V in VNNI pairs (zero pads for an odd D, Dv or key tail): head dims
    that are not multiples of 32, odd ones, and key lengths past the 512-key tile with an odd tail."""
    monkeypatch.setenv("BMK_CPU_BF16_GEMM", gemm)
    q, k, v = make_qkv(
        batch=1, q_len=70, k_len=k_len, head_dim=head_dim, v_head_dim=v_head_dim, dtype=torch.bfloat16, layout=layout
    )
    options = {"causal": causal, "causal_alignment": "bottom_right", "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, torch.bfloat16)


def test_bf16_gemm_bad_setting(monkeypatch):
    monkeypatch.setenv("BMK_CPU_BF16_GEMM", "amx")
    q, k, v = make_qkv(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="BMK_CPU_BF16_GEMM must be auto, native or fp32; got 'amx'"):
        bmkernels.attention(q, k, v)


def test_broadcast_incoming_gradients():
    """out.sum() and lse.sum() send stride-0 (expanded) gradients into the backward."""
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=21, k_len=18, head_dim=12, dtype=torch.float64)
    bias = rand_float(21, 18, dtype=torch.float64, requires_grad=True)

    def grads(fn):
        out, lse = fn(q, k, v, bias=bias, causal=True, causal_alignment="bottom_right", return_lse=True)
        return torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, bias))

    for got, want in zip(grads(bmkernels.attention), grads(reference.attention), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Rows with no visible key: zeros, lse = -inf, zero finite gradients.


def _fully_masked_case(how, dtype):
    """(kernel inputs, options, reference inputs, fully masked (b, h, i) rows as a bool (B, H, Lq))."""
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=7, k_len=5, head_dim=8, dtype=dtype)
    empty = torch.zeros(2, 2, 7, dtype=torch.bool)
    bias = rand_float(2, 2, 7, 5, dtype=dtype, requires_grad=True, seed=9)
    inputs, options = {"q": q, "k": k, "v": v, "bias": bias}, {}
    ref_inputs = dict(inputs)
    if how == "mask":
        mask = torch.ones(2, 2, 7, 5, dtype=torch.bool)
        mask[0, 1, 3] = False
        mask[1, :, 0] = False
        inputs["mask"] = ref_inputs["mask"] = mask
        empty[0, 1, 3] = empty[1, :, 0] = True
    elif how == "key_padding_mask":
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[1] = True
        inputs["key_padding_mask"] = ref_inputs["key_padding_mask"] = pad
        empty[1] = True
    elif how == "window":  # top-left, Lq > Lk: queries 5 and 6 have no key at distance 0
        options = {"window": (0, 0)}
        empty[:, :, 5:] = True
    elif how == "causal_bottom_right":  # Lq > Lk: the first Lq - Lk queries precede every key
        options = {"causal": True, "causal_alignment": "bottom_right"}
        empty[:, :, :2] = True
    elif how == "bias_neg_inf":
        neg_inf = torch.zeros(2, 2, 7, 5, dtype=torch.bool)
        neg_inf[0, 0, 4] = neg_inf[1, 1, 6] = True
        neg_inf[1, 0, 2, :3] = True  # partly -inf: that row still has keys
        inputs["bias"] = bias.detach().masked_fill(neg_inf, float("-inf")).requires_grad_()
        # the reference's autograd gives NaN for an all -inf bias row (its logsumexp backward
        # computes 0 * exp(-inf - (-inf))); the same function written with a mask is the truth here
        ref_inputs["mask"] = ~neg_inf
        empty[0, 0, 4] = empty[1, 1, 6] = True
    return inputs, options, ref_inputs, empty


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("how", ("mask", "key_padding_mask", "window", "causal_bottom_right", "bias_neg_inf"))
def test_fully_masked_rows(how, dtype):
    inputs, options, ref_inputs, empty = _fully_masked_case(how, dtype)
    options = {**options, "return_lse": True}
    out, lse = bmkernels.attention(**inputs, **options)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "fully masked rows must give zeros"
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(
        (out * torch.randn_like(out)).sum(), (inputs["q"], inputs["k"], inputs["v"], inputs["bias"])
    )
    for g in grads:
        assert torch.isfinite(g).all(), "gradients must be finite (never NaN)"
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty])), "dq of an empty row must be 0"
    assert torch.equal(grads[3][empty], torch.zeros_like(grads[3][empty])), "dbias of an empty row must be 0"

    # and everything matches the reference (bias -inf: the kernel sees the -inf bias, the reference
    # the equivalent mask)
    def kern(**t):
        if how == "bias_neg_inf":
            t["bias"] = t["bias"].masked_fill(~t.pop("mask"), float("-inf"))
        return bmkernels.attention(**t, **options)

    check_against_reference(kern, reference_fn(**options), ref_inputs, dtype)


# ------------------------------------------------------------------------------------------------
# Dropout.


@pytest.mark.parametrize(
    "dtype,p,options",
    [
        (torch.float64, 0.3, {}),
        (torch.float64, 0.25, {"causal": True}),  # p exact in float32
        (torch.float32, 0.3, {"causal": True}),
        (torch.bfloat16, 0.3, {"window": (4, 4)}),
        (torch.float16, 0.1, {}),
        (torch.float32, 0.6, {"softcap": 2.0, "causal": True, "causal_alignment": "bottom_right"}),
    ],
    ids=["f64", "f64_p_exact_in_f32", "f32_causal", "bf16_window", "f16", "f32_softcap_br"],
)
def test_dropout_matches_reference_given_mask(dtype, p, options):
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=LQ, k_len=LK, dtype=dtype)
    bias = rand_float(LQ, LK, dtype=dtype, requires_grad=True)
    kern, ref = dropout_pair(321, p, (2, 4, LQ, LK), **options, return_lse=True)
    check_against_reference(kern, ref, {"q": q, "k": k, "v": v, "bias": bias}, dtype, lse_grad=True)


def test_dropout_keep_rate():
    p, grid = 0.3, (2, 3, 64, 80)
    keep = bmkernels.dropout_keep_mask(draw_seed(0), *grid, p)
    assert keep.dtype == torch.bool and keep.shape == grid
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # no structure: the rate holds in every (batch, head) too
    per_head = keep.double().mean(dim=(2, 3))
    assert (per_head - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / (64 * 80))
    # other seeds give other masks; p = 0 keeps everything
    assert not torch.equal(keep, bmkernels.dropout_keep_mask(draw_seed(1), *grid, p))
    assert bmkernels.dropout_keep_mask(draw_seed(0), *grid, 0.0).all()


def test_dropout_output_rescaled():
    """With v = 1 every output is the kept probability mass / (1 - p): its mean is ~1."""
    q, k, _ = make_qkv(batch=4, q_heads=4, q_len=64, k_len=64, requires_grad=False)
    v = torch.ones(4, 4, 64, 1)
    torch.manual_seed(0)
    out = bmkernels.attention(q, k, v, dropout_p=0.5)
    assert abs(out.mean().item() - 1.0) < 0.05
    assert out.std().item() > 0.05  # dropout really happened


def test_determinism_with_dropout():
    def run(seed):
        q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=40, k_len=70, head_dim=24)
        bias = rand_float(40, 70, requires_grad=True)
        torch.manual_seed(seed)
        out, lse = bmkernels.attention(q, k, v, bias=bias, causal=True, dropout_p=0.25, return_lse=True)
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse.sum(), (q, k, v, bias))
        return (out, lse, *grads)

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b), "same torch.manual_seed must give bit-identical results"
    assert not torch.equal(first[0], other[0])


# ------------------------------------------------------------------------------------------------
# The Philox stream is triton.language.rand's.

_TRITON_RAND = textwrap.dedent("""
    import json
    import torch
    import triton
    import triton.language as tl
    import bmkernels

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.rand(seed, offsets), mask=offsets < n)

    failures = []
    grid = (2, 3, 7, 45)
    n = 2 * 3 * 7 * 45
    for seed in (0, 1234567, -(2**63) + 5, 2**63 - 2, -987654321987):
        u = torch.empty(n, dtype=torch.float32)
        rand_kernel[(triton.cdiv(n, 256),)](u, seed, n, BLOCK=256)
        for p in (0.1, 0.5, 0.9):
            keep = bmkernels.dropout_keep_mask(torch.tensor([seed], dtype=torch.int64), *grid, p)
            want = (u >= p).view(grid)
            if not torch.equal(keep, want):
                failures.append((seed, p, int((keep != want).sum())))
    print(json.dumps({"failures": failures, "mean_u": float(u.mean())}))
""")


@pytest.mark.slow
def test_philox_matches_triton_rand():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not importable, so tl.rand cannot be run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("BMK_CPU_ISA", None)
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_RAND],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(pathlib.Path(__file__).resolve().parents[2]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], f"(seed, p, mismatches): {report['failures']}"
    assert 0.4 < report["mean_u"] < 0.6


# ------------------------------------------------------------------------------------------------
# CPU instruction-set paths (BMK_CPU_ISA is read at every call).

ISA_CASES = {
    "plain": ({}, {}),  # the vectorized backward fast path (no score terms, no dropout)
    "terms": (
        {"causal": True, "causal_alignment": "bottom_right", "window": (11, 2), "softcap": 4.0},
        {"bias": True, "mask": True, "alibi": True},
    ),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", ISA_CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_isa_paths(isa, case, dtype, monkeypatch):
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    if not cpu_supports(isa):
        with pytest.raises(RuntimeError, match="does not support"):
            bmkernels.attention(*make_qkv(requires_grad=False))
        return
    assert bmkernels.build_info()["active_cpu_isa"] == isa
    options, tensors = ISA_CASES[case]
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=37, k_len=45, head_dim=19, v_head_dim=21, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v}
    if tensors.get("bias"):
        inputs["bias"] = rand_float(2, 1, 37, 45, dtype=dtype, requires_grad=True)
    if tensors.get("mask"):
        inputs["mask"] = rand_bool(37, 45, p_keep=0.85)
    if tensors.get("alibi"):
        inputs["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    options = {**options, "return_lse": True}
    check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype)
    # p = 0.25 is exact in float32: the kernels' float32 dropout_p is tested in
    # test_dropout_matches_reference_given_mask
    kern, ref = dropout_pair(5, 0.25, (2, 4, 37, 45), **options)
    check_against_reference(kern, ref, inputs, dtype)


def test_isa_paths_agree(monkeypatch):
    """Every ISA build draws the same dropout mask and gives (nearly) the same float64 results."""
    q, k, v = make_qkv(q_len=29, k_len=31, head_dim=13, dtype=torch.float64)
    bias = rand_float(29, 31, dtype=torch.float64, requires_grad=True)
    results = {}
    for isa in (i for i in ISAS if cpu_supports(i)):
        monkeypatch.setenv("BMK_CPU_ISA", isa)
        keep = bmkernels.dropout_keep_mask(draw_seed(3), 2, 2, 29, 31, 0.4)
        torch.manual_seed(3)
        out = bmkernels.attention(q, k, v, bias=bias, causal=True, dropout_p=0.4)
        results[isa] = (keep, out, *torch.autograd.grad(out.sum(), (q, k, v, bias)))
    assert "scalar" in results and len(results) >= 2
    base = results.pop("scalar")
    for isa, res in results.items():
        assert torch.equal(res[0], base[0]), f"{isa} dropout mask differs from scalar's"
        for a, b in zip(res[1:], base[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, isa=isa: f"{isa}: {m}")


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile.

GRADCHECK_CASES = {
    "causal": ({}, {"causal": True}),
    "bias_mask_softcap": ({"bias": (1, 2, 5, 6), "mask": True}, {"softcap": 1.5}),
    "bias_broadcast_window_br": ({"bias": (5, 6)}, {"window": (2, 1), "causal_alignment": "bottom_right"}),
    "gqa_alibi_causal_br": (
        {"gqa": True, "alibi": True},
        {"causal": True, "causal_alignment": "bottom_right"},
    ),
    "fully_masked_row": ({"bias": (1, 1, 5, 6), "empty_row": True}, {"scale": 0.7}),
    "dropout": ({"bias": (1, 2, 5, 6)}, {"dropout_p": 0.3, "causal": True}),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(case):
    tensors, options = GRADCHECK_CASES[case]
    q, k, v = make_qkv(
        batch=1,
        q_heads=2,
        kv_heads=1 if tensors.get("gqa") else 2,
        q_len=5,
        k_len=6,
        head_dim=4,
        v_head_dim=3,
        dtype=torch.float64,
    )
    bias = rand_float(*tensors["bias"], dtype=torch.float64, requires_grad=True) if "bias" in tensors else None
    mask = None
    if tensors.get("mask"):
        mask = rand_bool(5, 6, p_keep=0.7)
        mask[:, 0] = True
    if tensors.get("empty_row"):
        mask = torch.ones(5, 6, dtype=torch.bool)
        mask[2] = False
    alibi = torch.tensor([0.3, 0.7], dtype=torch.float64) if tensors.get("alibi") else None
    with_lse = not tensors.get("empty_row")  # an empty row's lse is -inf: no finite difference there

    def fn(q, k, v, *bias_arg):
        torch.manual_seed(11)  # dropout: the same mask at every evaluation
        return bmkernels.attention(
            q,
            k,
            v,
            bias=bias_arg[0] if bias_arg else None,
            mask=mask,
            alibi_slopes=alibi,
            return_lse=with_lse,
            **options,
        )

    inputs = (q, k, v) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _fwd_args(optional, dtype=torch.float32, requires_grad=True):
    q, k, v = make_qkv(
        batch=2,
        q_heads=4,
        kv_heads=2,
        q_len=7,
        k_len=9,
        head_dim=8,
        v_head_dim=5,
        dtype=dtype,
        requires_grad=requires_grad,
    )
    if not optional:
        return (q, k, v, None, None, None, None, 0.35, 0.0, -1, -1, 0, 0.0)
    bias = rand_float(2, 1, 7, 9, dtype=dtype, requires_grad=requires_grad)
    mask = rand_bool(7, 9, p_keep=0.8)
    alibi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    seed = torch.tensor([42], dtype=torch.int64)
    return (q, k, v, bias, mask, alibi, seed, 0.35, 2.5, 4, 1, 2, 0.2)


@pytest.mark.parametrize("optional", (False, True), ids=("no_optional", "all_optional"))
def test_opcheck_attention_fwd(optional):
    torch.library.opcheck(torch.ops.bmkernels.attention_fwd.default, _fwd_args(optional))


@pytest.mark.parametrize("optional", (False, True), ids=("no_optional", "all_optional"))
def test_opcheck_attention_bwd(optional):
    args = _fwd_args(optional, requires_grad=False)
    q, k, v, bias, mask, alibi, seed, *params = args
    out, lse = torch.ops.bmkernels.attention_fwd(*args)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if optional else None
    bwd_args = (grad_out, q, k, v, out, lse, grad_lse, bias, mask, alibi, seed, *params, optional)
    torch.library.opcheck(torch.ops.bmkernels.attention_bwd.default, bwd_args)
    dq, dk, dv, dbias = torch.ops.bmkernels.attention_bwd(*bwd_args)
    assert dbias.shape == ((2, 4, 7, 9) if optional else (0,))


def test_opcheck_dropout_mask():
    torch.library.opcheck(
        torch.ops.bmkernels.attention_dropout_mask.default,
        (torch.tensor([9], dtype=torch.int64), 2, 3, 5, 7, 0.25),
    )


def _compare_compiled(fn, inputs):
    eager = fn(**inputs)
    compiled = torch.compile(fn, fullgraph=True)(**inputs)
    eager, compiled = (x if isinstance(x, tuple) else (x,) for x in (eager, compiled))
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    weights = [torch.randn_like(o) for o in eager]
    g_eager = torch.autograd.grad(sum((o * w).sum() for o, w in zip(eager, weights, strict=True)), leaves)
    g_compiled = torch.autograd.grad(sum((o * w).sum() for o, w in zip(compiled, weights, strict=True)), leaves)
    for a, b in zip(eager + g_eager, compiled + g_compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_attention():
    torch._dynamo.reset()
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=11, k_len=13, head_dim=8)
    bias = rand_float(11, 13, requires_grad=True)
    mask = rand_bool(2, 1, 1, 13, p_keep=0.9)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, -2:] = True

    def fn(q, k, v, bias, mask, pad):
        return bmkernels.attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            key_padding_mask=pad,
            causal=True,
            causal_alignment="bottom_right",
            window=(6, -1),
            softcap=3.0,
            alibi_slopes=torch.tensor([0.1, 0.2, 0.3, 0.4]),
            return_lse=True,
        )

    _compare_compiled(fn, {"q": q, "k": k, "v": v, "bias": bias, "mask": mask, "pad": pad})


def test_compile_sdpa():
    torch._dynamo.reset()
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=11, k_len=13, head_dim=8)
    mask = rand_bool(11, 13, p_keep=0.9)
    mask[:, 0] = True

    def fn(q, k, v, mask):
        return (
            bmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4, enable_gqa=True),
            bmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        )

    _compare_compiled(fn, {"q": q, "k": k, "v": v, "mask": mask})


# ------------------------------------------------------------------------------------------------
# scaled_dot_product_attention: a drop-in for torch's.


def sdpa_pair(**options):
    return (
        lambda query, key, value, **t: bmkernels.scaled_dot_product_attention(query, key, value, **options, **t),
        lambda query, key, value, **t: F.scaled_dot_product_attention(query, key, value, **options, **t),
    )


def _sdpa_tensors(lead, q_heads, kv_heads, q_len, k_len, head_dim, v_head_dim, dtype):
    gen = torch.Generator().manual_seed(4)

    def one(heads, length, dim):
        shape = (*lead, length, dim) if heads is None else (*lead, heads, length, dim)
        return torch.randn(shape, generator=gen).to(dtype).requires_grad_()

    return one(q_heads, q_len, head_dim), one(kv_heads, k_len, head_dim), one(kv_heads, k_len, v_head_dim)


SDPA_CASES = {
    "2d_causal": ((), None, None, 9, 12, 8, 8, {"is_causal": True}, None),
    "3d": ((3,), None, None, 9, 9, 8, 8, {}, None),
    "3d_float_mask_grad": ((3,), None, None, 9, 11, 8, 8, {}, ("float", (3, 9, 11))),
    "3d_causal_lq_gt_lk": ((3,), None, None, 13, 9, 8, 6, {"is_causal": True}, None),
    "4d_bool_mask_2d": ((2,), 3, 3, 9, 12, 8, 8, {}, ("bool", (9, 12))),
    "4d_bool_mask_b11s": ((2,), 3, 3, 9, 12, 8, 8, {}, ("bool", (2, 1, 1, 12))),
    "4d_float_mask_grad": ((2,), 3, 3, 9, 12, 8, 8, {}, ("float", (2, 3, 9, 12))),
    "4d_float_mask_h11": ((2,), 3, 3, 9, 12, 8, 8, {}, ("float", (3, 1, 12))),
    "4d_causal_lq_lt_lk": ((2,), 3, 3, 9, 12, 8, 8, {"is_causal": True}, None),
    "4d_scale": ((2,), 3, 3, 9, 12, 8, 5, {"scale": 0.21}, None),
    "4d_gqa": ((2,), 6, 2, 9, 12, 8, 8, {"enable_gqa": True, "is_causal": True}, None),
    "5d_bool_mask": ((2, 3), 2, 2, 7, 10, 8, 8, {}, ("bool", (3, 1, 7, 10))),
    "5d_float_mask_gqa": ((2, 3), 4, 2, 7, 10, 8, 8, {"enable_gqa": True}, ("float", (2, 1, 1, 1, 10))),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_matches_torch(case, dtype):
    lead, hq, hkv, lq, lk, d, dv, options, mask_spec = SDPA_CASES[case]
    q, k, v = _sdpa_tensors(lead, hq, hkv, lq, lk, d, dv, dtype)
    inputs = {"query": q, "key": k, "value": v}
    if mask_spec:
        kind, shape = mask_spec
        if kind == "bool":
            mask = rand_bool(*shape, p_keep=0.8)
            mask[..., 0] = True  # every row keeps a key: torch gives NaN otherwise (tested below)
        else:
            mask = rand_float(*shape, dtype=dtype, requires_grad=True)
        inputs["attn_mask"] = mask
    ours, torchs = sdpa_pair(**options)
    out, _, _ = check_against_reference(ours, torchs, inputs, dtype)
    assert out.shape == (*q.shape[:-1], v.shape[-1])


def test_sdpa_fully_masked_row():
    """A query whose keys are all masked gets zeros and zero gradients (documented). PyTorch before
    2.5 gave NaN there; since its math path uses a safe softmax (torch 2.14 here) it gives zeros
    too, so the only allowed difference is NaN on torch's side."""
    q, k, v = _sdpa_tensors((2,), 2, 2, 5, 6, 8, 8, torch.float32)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[3] = False
    neg_inf = torch.zeros(5, 6).masked_fill(~mask, float("-inf"))
    for attn_mask in (mask, neg_inf):
        ours = bmkernels.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        assert torch.equal(ours[:, :, 3], torch.zeros(2, 2, 8))
        assert torch.isnan(theirs[:, :, 3]).all() or torch.equal(theirs[:, :, 3], ours[:, :, 3])
        rows = torch.arange(5) != 3
        torch.testing.assert_close(ours[:, :, rows], theirs[:, :, rows], rtol=1e-5, atol=1e-6)
        dq, dk, dv = torch.autograd.grad(ours.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert torch.equal(dq[:, :, 3], torch.zeros(2, 2, 8))


def test_sdpa_dropout_matches_reference():
    q, k, v = _sdpa_tensors((2,), 2, 2, 9, 11, 8, 8, torch.float64)
    p = 0.375  # exact in float32 (float32 rounding of p: test_dropout_matches_reference_given_mask[f64])
    keep = bmkernels.dropout_keep_mask(draw_seed(77), 2, 2, 9, 11, p)
    torch.manual_seed(77)
    out = bmkernels.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    want = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, dropout_mask=keep)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

BAD_INPUTS = [
    ("q_rank", lambda q, k, v: {"tensors": {"q": q[0]}}, ValueError, "q must be 4-D"),
    ("k_rank", lambda q, k, v: {"tensors": {"k": k.unsqueeze(0)}}, ValueError, "k must be 4-D"),
    ("not_tensor", lambda q, k, v: {"tensors": {"v": v.tolist()}}, TypeError, "v must be a torch.Tensor"),
    (
        "int_dtype",
        lambda q, k, v: {"tensors": {"q": q.long(), "k": k.long(), "v": v.long()}},
        TypeError,
        "q must be float32",
    ),
    ("batch", lambda q, k, v: {"tensors": {"k": k[:1], "v": v[:1]}}, ValueError, "batch sizes differ"),
    (
        "kv_heads",
        lambda q, k, v: {"tensors": {"v": v[:, :1]}},
        ValueError,
        "k and v must have the same heads",
    ),
    ("kv_length", lambda q, k, v: {"tensors": {"v": v[:, :, :3]}}, ValueError, "k and v must have the same"),
    ("head_dim", lambda q, k, v: {"tensors": {"k": k[..., :4]}}, ValueError, "head dims differ"),
    (
        "heads_not_multiple",
        lambda q, k, v: {"tensors": {"q": q[:, :3]}},
        ValueError,
        r"q heads \(3\) must be a multiple of k/v heads \(2\)",
    ),
    ("mixed_dtype", lambda q, k, v: {"tensors": {"v": v.double()}}, TypeError, "share a dtype"),
    ("mixed_device", lambda q, k, v: {"tensors": {"k": k.to("meta")}}, ValueError, "one device"),
    (
        "mask_broadcast",
        lambda q, k, v: {"mask": torch.ones(5, 7, dtype=torch.bool)},
        ValueError,
        "mask of shape",
    ),
    (
        "mask_rank",
        lambda q, k, v: {"mask": torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)},
        ValueError,
        "mask of shape",
    ),
    ("mask_not_bool", lambda q, k, v: {"mask": torch.ones(5, 6)}, TypeError, "mask must be bool"),
    (
        "mask_device",
        lambda q, k, v: {"mask": torch.ones(5, 6, dtype=torch.bool, device="meta")},
        ValueError,
        "mask must be on",
    ),
    (
        "bias_dtype",
        lambda q, k, v: {"bias": torch.zeros(5, 6, dtype=torch.float64)},
        TypeError,
        "bias must have q's dtype",
    ),
    ("bias_broadcast", lambda q, k, v: {"bias": torch.zeros(3, 5, 6)}, ValueError, "bias of shape"),
    (
        "bias_device",
        lambda q, k, v: {"bias": torch.zeros(5, 6, device="meta")},
        ValueError,
        "bias must be on",
    ),
    ("window_negative", lambda q, k, v: {"window": (-2, 1)}, ValueError, "window"),
    ("window_right_negative", lambda q, k, v: {"window": (1, -3)}, ValueError, "window"),
    ("window_not_pair", lambda q, k, v: {"window": (1, 2, 3)}, TypeError, "window"),
    ("window_int", lambda q, k, v: {"window": 4}, TypeError, "window"),
    ("window_float", lambda q, k, v: {"window": (1.0, 2)}, TypeError, "window"),
    ("dropout_one", lambda q, k, v: {"dropout_p": 1.0}, ValueError, "dropout_p"),
    ("dropout_negative", lambda q, k, v: {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ("scale_inf", lambda q, k, v: {"scale": float("inf")}, ValueError, "scale"),
    ("scale_nan", lambda q, k, v: {"scale": float("nan")}, ValueError, "scale"),
    ("scale_string", lambda q, k, v: {"scale": "0.5"}, ValueError, "scale"),
    ("softcap_negative", lambda q, k, v: {"softcap": -1.0}, ValueError, "softcap"),
    ("softcap_inf", lambda q, k, v: {"softcap": float("inf")}, ValueError, "softcap"),
    ("alibi_shape", lambda q, k, v: {"alibi_slopes": torch.ones(2)}, ValueError, "alibi_slopes"),
    ("alibi_shape_bh", lambda q, k, v: {"alibi_slopes": torch.ones(4, 2)}, ValueError, "alibi_slopes"),
    (
        "alibi_int",
        lambda q, k, v: {"alibi_slopes": torch.ones(4, dtype=torch.int64)},
        ValueError,
        "alibi_slopes",
    ),
    (
        "alibi_requires_grad",
        lambda q, k, v: {"alibi_slopes": torch.ones(4, requires_grad=True)},
        ValueError,
        "alibi_slopes gets no gradient",
    ),
    (
        "alibi_device",
        lambda q, k, v: {"alibi_slopes": torch.ones(4, device="meta")},
        ValueError,
        "alibi_slopes",
    ),
    (
        "key_padding_shape",
        lambda q, k, v: {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)},
        ValueError,
        "key_padding_mask",
    ),
    (
        "key_padding_dtype",
        lambda q, k, v: {"key_padding_mask": torch.zeros(2, 6)},
        TypeError,
        "key_padding_mask",
    ),
    ("causal_alignment", lambda q, k, v: {"causal_alignment": "bottom_left"}, ValueError, "causal_alignment"),
]


@pytest.mark.parametrize("make,error,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(make, error, match):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=6, head_dim=8, requires_grad=False)
    overrides = make(q, k, v)
    tensors = {"q": q, "k": k, "v": v, **overrides.pop("tensors", {})}
    with pytest.raises(error, match=match):
        bmkernels.attention(tensors["q"], tensors["k"], tensors["v"], **overrides)


def test_alibi_requiring_grad_is_fine_without_grad_mode():
    q, k, v = make_qkv(q_heads=2, q_len=5, k_len=6, requires_grad=False)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    with torch.no_grad():
        out = bmkernels.attention(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(out, reference.attention(q, k, v, alibi_slopes=slopes.detach()))


SDPA_BAD = [  # changes to (query (2, 4, 5, 8), key and value (2, 4, 6, 8)), error, message
    (
        "causal_and_mask",
        lambda q, k: {"attn_mask": torch.ones(5, 6, dtype=torch.bool), "is_causal": True},
        ValueError,
        "attn_mask must not be set when is_causal",
    ),
    ("heads_without_gqa", lambda q, k: {"key": k[:, :2], "value": k[:, :2]}, ValueError, "enable_gqa"),
    ("mask_dtype", lambda q, k: {"attn_mask": torch.ones(5, 6, dtype=torch.float64)}, TypeError, "attn_mask"),
    (
        "mask_broadcast",
        lambda q, k: {"attn_mask": torch.ones(3, 1, 5, 6, dtype=torch.bool)},
        ValueError,
        "mask",
    ),
    ("query_1d", lambda q, k: {"query": q[0, 0, 0]}, ValueError, "query must have at least 2 dims"),
    (
        "batch_not_broadcastable",
        lambda q, k: {"key": torch.randn(3, 4, 6, 8), "value": torch.randn(3, 4, 6, 8)},
        ValueError,
        "do not broadcast",
    ),
    ("dropout", lambda q, k: {"dropout_p": 1.5}, ValueError, "dropout_p"),
]


@pytest.mark.parametrize("change,error,match", [c[1:] for c in SDPA_BAD], ids=[c[0] for c in SDPA_BAD])
def test_sdpa_bad_input(change, error, match):
    q, k, _ = make_qkv(batch=2, q_heads=4, q_len=5, k_len=6, head_dim=8, requires_grad=False)
    with pytest.raises(error, match=match):
        bmkernels.scaled_dot_product_attention(**{"query": q, "key": k, "value": k, **change(q, k)})


# ------------------------------------------------------------------------------------------------
# Empty tensors: a defined result, never a crash.


@pytest.mark.parametrize("batch,q_len,k_len", [(0, 5, 6), (2, 0, 6), (2, 5, 0), (2, 0, 0)])
def test_empty(batch, q_len, k_len):
    q, k, v = make_qkv(batch=batch, q_heads=2, q_len=q_len, k_len=k_len, head_dim=8, v_head_dim=3)
    bias = torch.zeros(q_len, k_len, requires_grad=True)
    out, lse = bmkernels.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    assert out.shape == (batch, 2, q_len, 3) and lse.shape == (batch, 2, q_len)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()  # nothing to attend to (or nothing at all)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=False)
    for g, t in zip(grads, (q, k, v, bias), strict=True):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))
    assert torch.equal(out, reference.attention(q, k, v, bias=bias, causal=True))


@pytest.mark.parametrize(
    "lead,q_len,k_len",
    [((2, 3), 4, 0), ((0, 3), 4, 5), ((2,), 0, 5), ((2,), 4, 0)],
    ids=["5d_no_keys", "5d_empty_batch", "4d_no_queries", "4d_no_keys"],
)
def test_empty_sdpa(lead, q_len, k_len):
    """Like torch's: zeros where there are no keys, an empty result for an empty batch or query."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(*lead, 2, q_len, 8, generator=gen)
    k = torch.randn(*lead, 2, k_len, 8, generator=gen)
    v = torch.randn(*lead, 2, k_len, 3, generator=gen)
    out = bmkernels.scaled_dot_product_attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == want.shape == (*lead, 2, q_len, 3)
    assert torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------
# The registered ops called directly: bad arguments raise RuntimeError, never crash.


def _op_args(**changes):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=6, head_dim=8, requires_grad=False)
    args = {
        "q": q,
        "k": k,
        "v": v,
        "bias": None,
        "mask": None,
        "alibi_slopes": None,
        "rng_seed": None,
        "scale": 0.3,
        "softcap": 0.0,
        "window_left": -1,
        "window_right": -1,
        "diag_offset": 0,
        "dropout_p": 0.0,
    }
    args.update(changes)
    return list(args.values())


OP_BAD = [
    ("q_3d", {"q": torch.randn(4, 5, 8)}, "4-D"),
    ("batch", {"k": torch.randn(1, 2, 6, 8), "v": torch.randn(1, 2, 6, 8)}, "batch sizes differ"),
    ("kv_len", {"v": torch.randn(2, 2, 4, 8)}, "same heads and length"),
    ("head_dim", {"k": torch.randn(2, 2, 6, 7)}, "head dims differ"),
    ("heads", {"q": torch.randn(2, 3, 5, 8)}, "multiple"),
    ("dtype", {"v": torch.randn(2, 2, 6, 8, dtype=torch.float64)}, "share a dtype"),
    ("int", {"q": torch.ones(2, 4, 5, 8, dtype=torch.int32)}, "float32, float64"),
    ("bias_dtype", {"bias": torch.zeros(5, 6, dtype=torch.float64)}, "bias"),
    ("bias_5d", {"bias": torch.zeros(1, 1, 1, 5, 6)}, "bias"),
    ("bias_no_broadcast", {"bias": torch.zeros(2, 4, 5, 7)}, "bias of shape .* cannot broadcast to the score grid"),
    ("mask_float", {"mask": torch.ones(5, 6)}, "mask must be bool"),
    ("mask_no_broadcast", {"mask": torch.ones(3, 6, dtype=torch.bool)}, "mask of shape .* cannot broadcast"),
    ("alibi_3d", {"alibi_slopes": torch.ones(1, 2, 4)}, "alibi_slopes"),
    ("dropout_without_seed", {"dropout_p": 0.5}, "rng_seed"),
    ("dropout_float_seed", {"dropout_p": 0.5, "rng_seed": torch.ones(1)}, "rng_seed"),
    ("dropout_one", {"dropout_p": 1.0}, "dropout_p"),
    ("scale", {"scale": float("nan")}, "scale"),
    ("softcap", {"softcap": -2.0}, "softcap"),
    ("window", {"window_left": -5}, "window"),
]


@pytest.mark.parametrize("changes,match", [c[1:] for c in OP_BAD], ids=[c[0] for c in OP_BAD])
def test_op_fwd_bad_input(changes, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bmkernels.attention_fwd(*_op_args(**changes))


def test_op_bwd_bad_input():
    args = _op_args()
    q, k, v = args[:3]
    out, lse = torch.ops.bmkernels.attention_fwd(*args)
    rest = args[3:]
    with pytest.raises(RuntimeError, match="grad_out and out must have shape"):
        torch.ops.bmkernels.attention_bwd(out[:, :, :2], q, k, v, out, lse, None, *rest, False)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.bmkernels.attention_bwd(out, q, k, v, out, lse.double(), None, *rest, False)
    with pytest.raises(RuntimeError, match="grad_lse must have lse's shape"):
        torch.ops.bmkernels.attention_bwd(out, q, k, v, out, lse, lse[:, :, :1], *rest, False)
    with pytest.raises(RuntimeError, match="bias_grad needs a bias"):
        torch.ops.bmkernels.attention_bwd(out, q, k, v, out, lse, None, *rest, True)
    # and a valid call still works afterwards
    dq, dk, dv, dbias = torch.ops.bmkernels.attention_bwd(out, q, k, v, out, lse, None, *rest, False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dbias.numel() == 0


def test_op_dropout_mask_bad_input():
    seed = torch.tensor([1], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="sizes must be >= 0"):
        torch.ops.bmkernels.attention_dropout_mask(seed, 1, -1, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.bmkernels.attention_dropout_mask(seed, 1, 1, 2, 2, 1.0)
    with pytest.raises(RuntimeError, match="rng_seed"):
        torch.ops.bmkernels.attention_dropout_mask(seed.float(), 1, 1, 2, 2, 0.5)
    with pytest.raises(RuntimeError, match="rng_seed"):
        torch.ops.bmkernels.attention_dropout_mask(torch.empty(0, dtype=torch.int64), 1, 1, 2, 2, 0.5)


# ------------------------------------------------------------------------------------------------
# Layout: the forward reads q, k, v in the projection layout (B, L, H, D) viewed as (B, H, L, D)
# without copying them, and writes out in q's layout, so the caller's transpose back is free.


def test_output_takes_the_projection_layout():
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=9, k_len=11, head_dim=8, v_head_dim=6, layout="transposed")
    out = bmkernels.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous() and out.shape == (2, 4, 9, 6)
    contiguous = bmkernels.attention(*(t.detach().contiguous() for t in (q, k, v)))
    assert contiguous.is_contiguous()
    torch.testing.assert_close(out, contiguous, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ("transposed", "sliced"))
def test_opcheck_attention_fwd_layouts(layout):
    """The fake kernel gives the real kernel's output strides for every input layout."""
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=7, k_len=9, head_dim=8, v_head_dim=5, layout=layout)
    torch.library.opcheck(
        torch.ops.bmkernels.attention_fwd.default, (q, k, v, None, None, None, None, 0.35, 0.0, -1, 0, 2, 0.0)
    )


# ------------------------------------------------------------------------------------------------
# SDPA parity: every input torch's SDPA accepts, with torch's result (PyTorch's own OpInfo samples
# and the broadcasting forms they leave out).


def _torch_sdpa_samples():
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
    return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


def test_sdpa_matches_torch_on_its_opinfo_samples():
    samples = _torch_sdpa_samples()
    assert len(samples) >= 20
    for sample in samples:
        q, (k, v) = sample.input, sample.args[:2]
        kwargs = dict(sample.kwargs)
        if kwargs.get("dropout_p", 0.0) > 0:  # a different random stream: shapes and the dropout-free result
            out = bmkernels.scaled_dot_product_attention(q, k, v, **kwargs)
            assert out.shape == F.scaled_dot_product_attention(q, k, v, **kwargs).shape
            kwargs["dropout_p"] = 0.0
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        got = bmkernels.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(got, expected, msg=lambda m, s=sample: f"{m} ({s})")
        for a, b in zip(
            torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v)), strict=True
        ):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "shapes,kwargs",
    [
        (((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8)), {}),  # key/value batch broadcast
        (((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8)), {}),  # one kv head, no enable_gqa: broadcast
        (((4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8)), {"is_causal": True}),  # 3-D query, 4-D key/value
        (((3, 2, 4, 5, 8), (3, 1, 2, 6, 8), (1, 2, 2, 6, 8)), {"enable_gqa": True}),  # 5-D, GQA, broadcast
        (((5, 8), (6, 8), (6, 3)), {}),  # 2-D
        (((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8)), {"attn_mask": torch.randn(4, 1, 6, dtype=torch.float64)}),
    ],
)
def test_sdpa_broadcasts_as_torch(shapes, kwargs):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)
    got = bmkernels.scaled_dot_product_attention(q, k, v, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    for a, b in zip(
        torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(a, b)
