"""The CPU decoding kernel (torch.ops.bmkernels.attention_kvcache_fwd, through flash_attn_with_kvcache) on
each of its paths, on every ISA build this CPU runs: register blocks of 8/4/2/1 query rows (rows = GQA group
x Lq, in blocks of 16) and their remainders, the 16-key score reduction and its partial tiles (cache lengths
that are not multiples of 16 or of the 64-key tile), key splits (flash-decoding) and their combination,
per-batch cache lengths (0 and 1 included), causal rows that see no key, awkward head dims, paged and
strided caches, tasks over one kv head or all of them. Ground truth: bmkernels.reference.flash_attn in
float64, under the tolerance rule."""

import functools

import pytest
import torch

from bmkernels import flash_attn
from bmkernels.reference import flash_attn as ref
from bmkernels.testing import assert_within_rule, cpu_supports
from tests.ops.test_flash_attn import _paged

ISAS = ("scalar", "avx2", "avx512")

# name: group (Hq / Hkv), Lq, D, Dv, Hkv, cache lengths per batch, options. rows = group * Lq.
CASES = {
    "rows1_d64": (1, 1, 64, 64, 1, (1300, 0, 1, 77), {}),
    "rows4_d128_causal": (4, 1, 128, 128, 2, (77, 1000, 1, 0), {"causal": True}),
    "rows8_d72": (8, 1, 72, 72, 1, (1301, 16, 33, 1), {}),
    "rows3_d40_causal": (1, 3, 40, 40, 2, (2, 0, 513, 65), {"causal": True}),
    "rows7_d64_paged": (1, 7, 64, 64, 1, (1, 700, 129, 7), {"causal": True, "paged": 7}),
    "rows12_d128": (4, 3, 128, 128, 1, (1700,), {}),
    "rows13_d72_causal": (1, 13, 72, 40, 2, (12, 1000, 0, 15), {"causal": True}),
    "rows15_d40": (1, 15, 40, 72, 1, (63, 64, 65, 999), {"paged": 48}),
    "rows16_d64_causal": (8, 2, 64, 64, 1, (1100,), {"causal": True}),
    "rows20_d128_causal": (4, 5, 128, 128, 2, (3, 900, 1, 0), {"causal": True, "strided": True}),
    "rows24_d72": (8, 3, 72, 72, 1, (1, 31, 1300, 17), {"batch_idx": True}),
    "rows56_d64_causal": (8, 7, 64, 64, 1, (700, 5), {"causal": True}),
    "rows64_d40_window": (4, 16, 40, 40, 1, (333, 16), {"window_size": (50, 0)}),
    "rows128_d128_causal": (8, 16, 128, 128, 1, (600, 14), {"causal": True, "softcap": 3.0}),
    # several kv heads per task (a batch of >= 2 tasks per thread) and one head per task (B1)
    "rows8_d64_hkv4_paged": (2, 4, 64, 64, 4, (5, 700, 64, 130), {"paged": 16}),
    "rows4_d64_hkv4_causal": (4, 1, 64, 64, 4, (900,), {"causal": True}),
}


def _cache(rows, length, heads, dim, *, dtype, seed, strided=False):
    """(rows, length, heads, dim); strided: a view every other head of a wider cache (head stride 2 * dim)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(rows, length, 2 * heads if strided else heads, dim, generator=g).to(dtype)
    return full[:, :, ::2] if strided else full


def _inputs(case, dtype):
    group, q_len, dim, v_dim, kv_heads, lengths, opts = CASES[case]
    opts = dict(opts)
    batch, heads, length = len(lengths), group * kv_heads, max(lengths)
    paged, batch_idx, strided = opts.pop("paged", None), opts.pop("batch_idx", False), opts.pop("strided", False)
    g = torch.Generator().manual_seed(len(case))
    # q in (B, Hq, Lq, D) memory, seen as (B, Lq, Hq, D): rows read through their strides
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype).transpose(1, 2)
    rows = batch + 1 if batch_idx else batch
    k_cache = _cache(rows, length, kv_heads, dim, dtype=dtype, seed=1, strided=strided)
    v_cache = _cache(rows, length, kv_heads, v_dim, dtype=dtype, seed=2, strided=strided)
    if strided:  # and a value cache whose last dim is not contiguous (copied by the operator)
        v_cache = v_cache.transpose(1, 3).contiguous().transpose(1, 3)
    if paged:
        k_cache, opts["block_table"] = _paged(k_cache, paged, seed=3)
        v_cache, _ = _paged(v_cache, paged, seed=3)
    elif batch_idx:
        opts["cache_batch_idx"] = torch.arange(rows - 1, -1, -1, dtype=torch.int32)[:batch]
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32), opts


@functools.cache
def _expected(case, dtype):
    """The case's inputs, its float64 truth and the same-dtype reference (computed once for all ISAs)."""
    q, k_cache, v_cache, seqlens, opts = _inputs(case, dtype)
    truth, truth_lse, _ = ref.kvcache_attention(q.double(), k_cache.double(), v_cache.double(), seqlens, **opts)
    same = truth if dtype == torch.float64 else ref.kvcache_attention(q, k_cache, v_cache, seqlens, **opts)[0]
    return (q, k_cache, v_cache, seqlens, opts), truth, truth_lse, same


def _check(case, dtype):
    (q, k_cache, v_cache, seqlens, opts), truth, truth_lse, same = _expected(case, dtype)
    out, lse = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, return_softmax_lse=True, **opts
    )
    assert out.shape == truth.shape and out.dtype == dtype
    assert_within_rule("out", out, truth, same, dtype)
    assert_within_rule("lse", lse, truth_lse, truth_lse.to(lse.dtype).double(), dtype)
    return out, lse


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_decode_kernel_matches_reference(isa, case, dtype, monkeypatch):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    _check(case, dtype)


def test_decode_kernel_isas_agree_in_float64(monkeypatch):
    """float64 (other vector widths: 8 lanes on AVX-512, 4 on AVX2) on every ISA, against the reference
    and against each other."""
    results = {}
    for isa in (i for i in ISAS if cpu_supports(i)):
        monkeypatch.setenv("BMK_CPU_ISA", isa)
        results[isa] = [_check(case, torch.float64) for case in list(CASES)[::2]]  # every block size is in
    base = results.pop("scalar")
    for isa, res in results.items():
        for (out, lse), (out0, lse0) in zip(res, base, strict=True):
            torch.testing.assert_close(out, out0, rtol=0, atol=1e-12, msg=lambda m, isa=isa: f"{isa}: {m}")
            torch.testing.assert_close(lse, lse0, rtol=0, atol=1e-12, msg=lambda m, isa=isa: f"{isa}: {m}")


def test_decode_rows_without_keys_are_zero():
    """seqlens 0, and causal rows placed before the cache's first key (Lq > cache length): zeros, lse -inf."""
    q = torch.randn(2, 9, 8, 64)
    cache = torch.randn(2, 40, 2, 64)
    out, lse = flash_attn.flash_attn_with_kvcache(
        q, cache, cache, cache_seqlens=torch.tensor([0, 4], dtype=torch.int32), causal=True, return_softmax_lse=True
    )
    assert not out[0].any() and torch.isneginf(lse[0]).all()
    assert not out[1, :5].any() and torch.isneginf(lse[1, :, :5]).all()
    assert out[1, 5:].abs().sum(-1).gt(0).all() and torch.isfinite(lse[1, :, 5:]).all()
