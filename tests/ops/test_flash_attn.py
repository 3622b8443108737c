"""bmkernels.flash_attn (FlashAttention's API) against bmkernels.reference.flash_attn, FlashAttention's
documented semantics in plain PyTorch: flash_attn_func, the packed variants, varlen (CPU packed-sequence
kernel, forward and gradients) and with_kvcache (CPU decoding kernel: dense and paged caches, in-place
appends, rotary), with their bad inputs."""

import pytest
import torch

from bmkernels import flash_attn
from bmkernels.reference import flash_attn as ref
from bmkernels.testing import check_against_reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (5, 3)},
    "causal_window": {"causal": True, "window_size": (7, -1)},
    "softcap": {"softcap": 2.5},
    "alibi": {"alibi": True},
}


def _leaf(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)


def _options(feature, heads, rows=None):
    opts = dict(FEATURES[feature])
    if opts.pop("alibi", False):
        slopes = torch.linspace(0.1, 0.9, heads, dtype=torch.float32)
        opts["alibi_slopes"] = slopes if rows is None else slopes.expand(rows, heads).contiguous() * 1.5
    return opts


def _batched_reference(q, k, v, **opts):
    slopes = opts.pop("alibi_slopes", None)
    outs, lses = [], []
    for b in range(q.shape[0]):
        s = slopes if slopes is None or slopes.dim() == 1 else slopes[b]
        out, lse = ref.sequence_attention(q[b], k[b], v[b], alibi_slopes=s, **opts)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses).to(torch.float64 if q.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize(("q_len", "k_len"), [(19, 19), (7, 33), (40, 9)])
def test_flash_attn_func_matches_reference(dtype, feature, q_len, k_len):
    heads, kv_heads, dim, v_dim = 4, 2, 24, 16
    opts = _options(feature, heads, rows=2 if feature == "alibi" and q_len == 7 else None)
    inputs = {
        "q": _leaf(2, q_len, heads, dim, dtype=dtype, seed=1),
        "k": _leaf(2, k_len, kv_heads, dim, dtype=dtype, seed=2),
        "v": _leaf(2, k_len, kv_heads, v_dim, dtype=dtype, seed=3),
    }
    check_against_reference(
        lambda q, k, v: flash_attn.flash_attn_func(q, k, v, return_attn_probs=True, **opts)[:2],
        lambda q, k, v: _batched_reference(q, k, v, **opts),
        inputs,
        dtype,
    )


def test_packed_variants_equal_the_unpacked_call():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 11, 3, 2, 8, generator=g)
    q, k, v = qkv.unbind(2)
    expected = flash_attn.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(flash_attn.flash_attn_qkvpacked_func(qkv, causal=True), expected, rtol=0, atol=0)
    kv = torch.stack((k, v), 2)
    torch.testing.assert_close(flash_attn.flash_attn_kvpacked_func(q, kv, causal=True), expected, rtol=0, atol=0)


def test_flash_attn_func_compiles_fullgraph():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 13, 2, 8, generator=g) for _ in range(3))
    fn = torch.compile(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), flash_attn.flash_attn_func(q, k, v, causal=True))


# Sequence lengths with an empty and a length-1 sequence; keys differ from queries in the second set.
VARLEN = {
    "self": ([5, 0, 17, 1, 30], None),
    "cross": ([3, 1, 0, 12], [9, 4, 6, 1]),
}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("lengths", VARLEN)
def test_varlen_matches_reference(dtype, feature, lengths):
    q_lens, k_lens = VARLEN[lengths]
    k_lens = k_lens or q_lens
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    heads, kv_heads, dim = 4, 2, 16
    opts = _options(feature, heads, rows=len(q_lens))
    inputs = {
        "q": _leaf(int(cu_q[-1]), heads, dim, dtype=dtype, seed=4),
        "k": _leaf(int(cu_k[-1]), kv_heads, dim, dtype=dtype, seed=5),
        "v": _leaf(int(cu_k[-1]), kv_heads, 12, dtype=dtype, seed=6),
    }
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def reference(q, k, v):
        out, lse = ref.varlen_attention(q, k, v, cu_q, cu_k, **opts)
        return out, lse.to(lse_dtype)

    check_against_reference(
        lambda q, k, v: flash_attn.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), return_attn_probs=True, **opts
        )[:2],
        reference,
        inputs,
        dtype,
    )


@pytest.mark.parametrize("feature", ["causal", "window", "softcap", "alibi"])
def test_varlen_triton_kernel_matches_reference(feature):
    """The Triton kernels' packed-sequence path (interpreter, float32): forward and gradients."""
    pytest.importorskip("triton")
    q_lens, k_lens = [3, 0, 9, 1], [5, 2, 9, 1]
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    opts = _options(feature, 2, rows=len(q_lens))
    inputs = {
        "q": _leaf(int(cu_q[-1]), 2, 8, dtype=torch.float32, seed=4),
        "k": _leaf(int(cu_k[-1]), 1, 8, dtype=torch.float32, seed=5),
        "v": _leaf(int(cu_k[-1]), 1, 8, dtype=torch.float32, seed=6),
    }

    def reference(q, k, v):
        out, lse = ref.varlen_attention(q, k, v, cu_q, cu_k, **opts)
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)

    check_against_reference(
        lambda q, k, v: flash_attn.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 9, 9, return_attn_probs=True, backend="triton", **opts
        )[:2],
        reference,
        inputs,
        torch.float32,
    )


def test_varlen_dropout_is_the_packed_problem_with_a_block_diagonal_mask():
    """Dropout in varlen draws the Philox mask of the packed (1, H, total_q, total_k) grid: the same
    result as bmkernels.attention on the packed tensors, each sequence masked to itself."""
    import bmkernels

    lengths = [6, 1, 9]
    cu = _cu(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(16, 2, 8, generator=g) for _ in range(3))
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    local = torch.arange(16) - cu[:-1].long()[seq]
    same = seq[:, None] == seq[None, :]
    keep = same & (local[None, :] <= local[:, None])  # causal within each sequence (Lq = Lk: aligned)
    torch.manual_seed(7)
    got = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, dropout_p=0.3, causal=True)
    torch.manual_seed(7)
    expected = bmkernels.attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), mask=keep, dropout_p=0.3)
    torch.testing.assert_close(got, expected.transpose(1, 2).squeeze(0), rtol=1e-6, atol=1e-6)


def test_varlen_compiles_fullgraph_and_passes_opcheck():
    cu = _cu([4, 7])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    segments = torch.stack((cu, cu), 1).long()
    args = (
        *(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)),
        None,
        None,
        None,
        None,
        0.35,
        0.0,
        -1,
        0,
        0,
        0.0,
        None,
        segments,
    )
    torch.library.opcheck(torch.ops.bmkernels.attention_fwd, args)
    fn = torch.compile(lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True))
    torch.testing.assert_close(fn(q, k, v), flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True))


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        (torch.tensor([0, 5, 3, 11], dtype=torch.int32), "without decreasing"),
        (torch.tensor([0, 5, 11], dtype=torch.int64), "int32"),
        (torch.tensor([0, 5, 10], dtype=torch.int32), "number of packed rows 11"),
        (torch.tensor([1, 5, 11], dtype=torch.int32), "from 0"),
    ],
)
def test_varlen_rejects_bad_cu_seqlens(cu, message):
    q = torch.randn(11, 2, 8)
    with pytest.raises(ValueError, match=message):
        flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([[0, 0], [5, 3], [4, 11], [11, 11]], "non-decreasing"),
        ([[1, 0], [11, 11]], "start at"),
        ([[0, 0], [11, 10]], "end at"),
    ],
)
def test_raw_operator_checks_segments(segments, message):
    q = torch.randn(1, 2, 11, 8)
    args = (q, q, q, None, None, None, None, 0.3, 0.0, -1, -1, 0, 0.0, None, torch.tensor(segments))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bmkernels.attention_fwd(*args)
    with pytest.raises(RuntimeError, match="batch 1"):
        q2 = torch.randn(2, 2, 11, 8)
        torch.ops.bmkernels.attention_fwd(q2, q2, q2, *args[3:])
    with pytest.raises(RuntimeError, match="do not combine"):
        torch.ops.bmkernels.attention_fwd(*args[:3], torch.zeros(11, 11), *args[4:])


def _cache(rows, length, heads, dim, *, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, heads, dim, generator=g).to(dtype)


def _paged(dense, block_size, seed):
    """The dense cache (B, L, H, D) as shuffled pages of block_size rows, and its block table."""
    batch, length = dense.shape[:2]
    per_seq = -(-length // block_size)
    padded = torch.zeros(batch, per_seq * block_size, *dense.shape[2:], dtype=dense.dtype)
    padded[:, :length] = dense
    order = torch.randperm(batch * per_seq, generator=torch.Generator().manual_seed(seed))
    pages = torch.empty(batch * per_seq, block_size, *dense.shape[2:], dtype=dense.dtype)
    pages[order] = padded.reshape(batch * per_seq, block_size, *dense.shape[2:])
    return pages, order.view(batch, per_seq).to(torch.int32)


KVCACHE = {
    "decode": {"q_len": 1},
    "decode_causal": {"q_len": 1, "causal": True},
    "chunk_causal": {"q_len": 5, "causal": True},
    "window": {"q_len": 3, "window_size": (9, 0)},
    "softcap_alibi": {"q_len": 2, "causal": True, "softcap": 3.0, "alibi": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KVCACHE)
@pytest.mark.parametrize("layout", ["dense", "paged", "batch_idx"])
def test_kvcache_matches_reference(dtype, case, layout):
    opts = dict(KVCACHE[case])
    q_len = opts.pop("q_len")
    heads, kv_heads, dim, v_dim, batch, length = 8, 2, 32, 16, 3, 700
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.linspace(0.02, 0.2, heads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    k_dense = _cache(batch + 1, length, kv_heads, dim, dtype=dtype, seed=1)
    v_dense = _cache(batch + 1, length, kv_heads, v_dim, dtype=dtype, seed=2)
    seqlens = torch.tensor([700, 1, 333], dtype=torch.int32)  # a full cache, one key, a page boundary
    kwargs = {}
    if layout == "paged":
        k_cache, table = _paged(k_dense[:batch], 7, seed=3)
        v_cache, _ = _paged(v_dense[:batch], 7, seed=3)
        kwargs["block_table"] = table
    elif layout == "batch_idx":
        k_cache, v_cache = k_dense, v_dense
        kwargs["cache_batch_idx"] = torch.tensor([3, 0, 1], dtype=torch.int32)
    else:
        k_cache, v_cache = k_dense[:batch], v_dense[:batch]
    out, lse = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, return_softmax_lse=True, **kwargs, **opts
    )
    truth, truth_lse, _ = ref.kvcache_attention(
        q.double(), k_cache.double(), v_cache.double(), seqlens, **kwargs, **opts
    )
    same, _, _ = ref.kvcache_attention(q, k_cache, v_cache, seqlens, **kwargs, **opts)
    from bmkernels.testing import assert_within_rule

    assert out.shape == (batch, q_len, heads, v_dim) and out.dtype == dtype
    assert_within_rule("out", out, truth, same, dtype)
    assert_within_rule("lse", lse, truth_lse, truth_lse.to(lse.dtype).double(), dtype)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rotary_interleaved", [True, False])
def test_kvcache_appends_in_place_across_pages_with_rotary(paged, rotary_interleaved):
    batch, kv_heads, heads, dim, length, new = 2, 2, 4, 16, 40, 6
    k_dense = _cache(batch, length, kv_heads, dim, dtype=torch.float32, seed=1)
    v_dense = _cache(batch, length, kv_heads, dim, dtype=torch.float32, seed=2)
    seqlens = torch.tensor([3, 34], dtype=torch.int32)  # block size 5: the appends cross page boundaries
    g = torch.Generator().manual_seed(4)
    q = torch.randn(batch, new, heads, dim, generator=g)
    k_new, v_new = (
        torch.randn(batch, new, kv_heads, dim, generator=g),
        torch.randn(batch, new, kv_heads, dim, generator=g),
    )
    angles = torch.rand(64, 4, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    kwargs = {"rotary_cos": cos, "rotary_sin": sin, "rotary_interleaved": rotary_interleaved, "causal": True}
    if paged:
        k_cache, table = _paged(k_dense, 5, seed=6)
        v_cache, _ = _paged(v_dense, 5, seed=6)
        kwargs["block_table"] = table
    else:
        k_cache, v_cache = k_dense.clone(), v_dense.clone()
    before_k, before_v = k_cache.clone(), v_cache.clone()
    truth, _, seen = ref.kvcache_attention(
        q.double(), before_k.double(), before_v.double(), seqlens, k=k_new.double(), v=v_new.double(), **kwargs
    )
    out = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens, **kwargs)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    # the cache now holds the rotated new keys (and the new values) right after each batch's old keys
    after, _, seen_after = ref.kvcache_attention(
        q, k_cache, v_cache, seqlens + new, **{k: v for k, v in kwargs.items() if k == "block_table"}
    )
    for b in range(batch):
        keys, values = seen_after[b]
        torch.testing.assert_close(keys.double(), seen[b][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values.double(), seen[b][1], rtol=0, atol=0)
    changed = (k_cache != before_k).any(-1).any(-1).sum().item()
    assert changed == batch * new  # nothing outside the appended rows was touched


def test_kvcache_refuses_overflow_and_bad_pages_without_writing():
    k_cache = torch.zeros(2, 8, 1, 4)
    v_cache = torch.zeros(2, 8, 1, 4)
    q = torch.randn(2, 1, 1, 4)
    new = torch.ones(2, 3, 1, 4)
    with pytest.raises(ValueError, match="overflows the cache's 8 positions; nothing was written"):
        flash_attn.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=new, v=new, cache_seqlens=torch.tensor([2, 6], dtype=torch.int32)
        )
    assert not k_cache.any() and not v_cache.any()
    pages = torch.zeros(4, 4, 1, 4)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block outside"):
        flash_attn.flash_attn_with_kvcache(
            q,
            pages,
            pages.clone(),
            k=new,
            v=new,
            cache_seqlens=torch.tensor([0, 3], dtype=torch.int32),
            block_table=table,
        )
    assert not pages.any()
    with pytest.raises(ValueError, match="int32"):
        flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([2, 6]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_seqlens": torch.tensor([9, 1])}, "outside \\[0, 8\\]"),
        ({"cache_seqlens": torch.tensor([-1, 1])}, "outside"),
        ({"cache_seqlens": torch.tensor([1])}, "shape \\(B,\\)"),
        (
            {"block_table": torch.tensor([[0, 5], [1, 0]], dtype=torch.int32), "cache_seqlens": torch.tensor([9, 1])},
            "block_table\\[0, 1\\] = 5",
        ),
        ({"cache_batch_idx": torch.tensor([0, 2], dtype=torch.int32)}, "cache_batch_idx\\[1\\] = 2"),
    ],
)
def test_raw_kvcache_operator_checks_every_index(kwargs, message):
    cache = torch.zeros(2, 8, 1, 4)
    args = {"cache_seqlens": torch.tensor([3, 1]), "block_table": None, "cache_batch_idx": None} | kwargs
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bmkernels.attention_kvcache_fwd(
            torch.randn(2, 1, 1, 4),
            cache,
            cache,
            args["cache_seqlens"],
            args["block_table"],
            args["cache_batch_idx"],
            None,
            0.5,
            0.0,
            -1,
            -1,
        )


def test_kvcache_operator_passes_opcheck_and_compiles():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 8, generator=g)
    cache = torch.randn(2, 30, 2, 8, generator=g)
    lens = torch.tensor([30, 11], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.bmkernels.attention_kvcache_fwd, (q, cache, cache, lens, None, None, None, 0.35, 0.0, -1, 0)
    )
    fn = torch.compile(
        lambda q: flash_attn.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, causal=True), fullgraph=True
    )
    torch.testing.assert_close(
        fn(q), flash_attn.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, causal=True)
    )
