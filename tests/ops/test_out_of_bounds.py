"""Out-of-bounds reads and writes without a sanitizer: every op and every gradient with its inputs (and the
gradients flowing into its outputs) as views into larger storage filled with NaN, before and after the view
and in the gaps of strided views (as_strided on a poisoned buffer). Nothing outside a view may reach a result:
outputs and gradients are finite and equal to the run on contiguous copies, and storage around a view that an
op updates in place (a KV cache, BatchNorm's running statistics) is still poison afterwards.

The cases are functions of the backend; tests/triton/test_out_of_bounds_triton.py (Triton interpreter) and
tests/cuda/test_out_of_bounds_emulator.py (backend "cuda_emulated") run them on tiny shapes."""

import pytest
import torch

import bmkernels
from bmkernels import flash_attn

# How a view sits in its storage: the dims' storage order (innermost last), the innermost stride and the gap
# (elements of poison) after each outer row. Every storage also has poison before and after the view.
KINDS = {
    "offset": (None, 1, 0),  # contiguous, at an offset
    "gaps": (None, 1, 3),  # rows with poison between them (the kernels' strided-row path)
    "strided": (None, 2, 1),  # every other element too
    "permuted": ("reversed", 1, 2),  # dims stored in reverse order, with gaps
    "channels_last": ((0, 2, 3, 1), 1, 0),  # 4-D: NHWC storage at an offset (the channels_last kernels)
}
PAD = 7  # poison elements before and after every view
BIG = 2**30  # the poison of integer storage: an index far out of range if it is ever read


def poison_of(dtype):
    if dtype.is_floating_point:
        return float("nan")
    return True if dtype == torch.bool else BIG


def poisoned(t, kind):
    """t's values in a view of layout `kind` into poisoned storage; also returns the storage."""
    order, inner, gap = KINDS[kind]
    n = t.dim()
    order = tuple(reversed(range(n))) if order == "reversed" else (order or tuple(range(n)))
    if len(order) != n:  # channels_last on a tensor that is not 4-D: gaps instead
        order = tuple(range(n))
    strides, step = [0] * n, inner
    for dim in reversed(order):
        strides[dim] = step
        step = step * max(t.shape[dim], 1) + gap
    size = PAD + (1 + sum((s - 1) * st for s, st in zip(t.shape, strides, strict=True)) if t.numel() else 0) + PAD
    storage = torch.full((size,), poison_of(t.dtype), dtype=t.dtype)
    if t.dtype == torch.bool:  # random bits: a read of them changes which keys count
        storage = torch.rand(size, generator=torch.Generator().manual_seed(size)) < 0.5
    storage = storage.to(t.device)
    view = storage.as_strided(t.shape, strides, PAD)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad), storage


def outside_view(storage, view):
    """The storage's elements that `view` does not cover."""
    covered = torch.zeros(storage.numel(), dtype=torch.bool, device=storage.device)
    covered.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
    return storage[~covered]


def run(fn, tensors, place):
    """fn(**tensors placed) -> tensors of the outputs and of the gradient of every input that requires one, with
    the gradients flowing in (fixed random values) placed the same way."""
    placed = {n: t if not isinstance(t, torch.Tensor) else place(t) for n, t in tensors.items()}
    out = fn(**placed)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    wrt = [t for t in placed.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    if not wrt or not diff:
        return outs
    gen = torch.Generator().manual_seed(0)
    seeds = [place(torch.randn(o.shape, generator=gen).to(o.device, o.dtype)) for o in diff]
    grads = torch.autograd.grad(diff, wrt, seeds, allow_unused=True)
    return outs + [g for g in grads if g is not None]


def dense(kind):
    """The contiguous copy a view of `kind` is compared with (channels_last: a channels_last one)."""
    if kind == "channels_last":
        return lambda t: (
            t.detach()
            .contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.contiguous_format)
            .requires_grad_(t.requires_grad)
        )
    return lambda t: t.detach().clone().requires_grad_(t.requires_grad)


def check_out_of_bounds(fn, tensors, kind):
    """fn on views of `kind` into poisoned storage equals fn on contiguous copies, outputs and gradients."""
    assert_same(run(fn, tensors, lambda t: poisoned(t, kind)[0]), run(fn, tensors, dense(kind)), kind)


def assert_same(got, expected, kind):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert not e.isnan().any(), f"result {i}: NaN on contiguous inputs"
        assert not g.isnan().any(), f"result {i}: poison (NaN) from outside the views reached it ({kind})"
        # a layout may change the order of a reduction (torch's own ops too): a few units of rounding apart
        eps = 16 * torch.finfo(e.dtype).eps if e.dtype.is_floating_point else 0
        scale = e.abs().max().item() if e.dtype.is_floating_point and e.numel() else 1.0
        torch.testing.assert_close(
            g, e, rtol=eps, atol=eps * max(scale, 1.0), msg=lambda m, i=i: f"result {i} ({kind}): {m}"
        )


def rand(*shape, dtype=torch.float32, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------
# The cases: (function of the placed tensors, tensors) for a backend.


def attention_cases(backend, q_len=5, k_len=7, head_dim=8):
    """GQA (4 query heads over 2), with a bias that gets a gradient, a bool mask, key padding as key ranges and
    as a mask, ALiBi, a window, softcap and lse."""
    q, k, v = rand(2, 4, q_len, head_dim, seed=1), rand(2, 2, k_len, head_dim, seed=2), rand(2, 2, k_len, 6, seed=3)
    gen = torch.Generator().manual_seed(4)
    right_padded = torch.arange(k_len)[None, :] >= torch.tensor([k_len, 3])[:, None]
    cases = {
        "bias_mask_causal": (
            dict(causal=True),
            dict(bias=rand(1, 4, q_len, k_len, seed=5), mask=torch.rand(2, 1, q_len, k_len, generator=gen) < 0.8),
        ),
        "padding_ranges_alibi_window": (
            dict(window=(3, 1), causal_alignment="bottom_right"),
            dict(key_padding_mask=right_padded, alibi_slopes=torch.rand(2, 4, generator=gen)),
        ),
        "padding_mask_softcap_lse": (
            dict(softcap=5.0, return_lse=True),
            dict(key_padding_mask=torch.rand(2, k_len, generator=gen) < 0.3, bias=rand(2, 1, 1, k_len, seed=6)),
        ),
    }
    return {
        name: (_bind(bmkernels.attention, options, backend), dict(q=q, k=k, v=v, **extra))
        for name, (options, extra) in cases.items()
    }


def _bind(fn, options, backend):
    return lambda **t: fn(**t, **options, backend=backend)


def flash_attn_cases(backend):
    """flash_attn_func (causal, ALiBi, a window) and flash_attn_varlen_func (3 packed sequences, one empty; the
    int32 cu_seqlens placed in poisoned storage too)."""
    q, k, v = rand(2, 5, 4, 8, seed=1), rand(2, 6, 2, 8, seed=2), rand(2, 6, 2, 8, seed=3)
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(4))
    cu_q, cu_k = torch.tensor([0, 3, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 6, 11], dtype=torch.int32)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return flash_attn.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, 5, 5, causal=True, backend=backend
        )

    return {
        "func": (
            _bind(flash_attn.flash_attn_func, dict(causal=True, alibi_slopes=slopes, window_size=(3, 0)), backend),
            dict(q=q, k=k, v=v),
        ),
        "varlen": (
            varlen,
            dict(
                q=rand(8, 4, 8, seed=5),
                k=rand(11, 2, 8, seed=6),
                v=rand(11, 2, 8, seed=7),
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
            ),
        ),
    }


def conv_cases(backend, dtype=torch.float32):
    """conv2d with bias, residual and an activation: stride 2 with padding, groups, a 1x1."""
    cases = {
        "stride2_relu": ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1, activation="relu")),
        "groups_silu": ((2, 4, 5, 5), (6, 2, 3, 2), dict(groups=2, padding=(1, 0), dilation=(1, 2), activation="silu")),
        "pointwise_gelu": ((1, 5, 4, 3), (3, 5, 1, 1), dict(activation="gelu")),
    }
    out = {}
    for name, (x_shape, w_shape, options) in cases.items():
        probe = torch.nn.functional.conv2d(
            torch.zeros(x_shape), torch.zeros(w_shape), **{k: v for k, v in options.items() if k != "activation"}
        )
        tensors = dict(
            x=rand(*x_shape, dtype=dtype, seed=1),
            weight=rand(*w_shape, dtype=dtype, seed=2),
            bias=rand(w_shape[0], dtype=dtype, seed=3),
            residual=rand(*probe.shape, dtype=dtype, seed=4),
        )
        out[name] = (_bind(bmkernels.conv2d, options, backend), tensors)
    return out


def gru_cases(backend):
    """The cell (with and without bias) and a 2-layer bidirectional GRU with h0 and int64 lengths."""
    from tests.ops.test_gru import gru_weights

    cell = [w.requires_grad_() for w in gru_weights(5, 6)]
    layers = [w.requires_grad_() for w in gru_weights(5, 4, num_layers=2, bidirectional=True, seed=1)]

    options = dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.0, training=False)

    def gru(x, h0, lengths, **weights):
        w = [weights[f"w{i}"] for i in range(len(weights))]
        return bmkernels.gru(x, h0, w, lengths=lengths, backend=backend, **options)

    return {
        "cell": (
            _bind(bmkernels.gru_cell, {}, backend),
            dict(
                x=rand(3, 5, seed=2),
                h=rand(3, 6, seed=3),
                **dict(zip(("w_ih", "w_hh", "b_ih", "b_hh"), cell, strict=True)),
            ),
        ),
        "cell_no_bias": (
            _bind(bmkernels.gru_cell, {}, backend),
            dict(x=rand(2, 5, seed=2), h=rand(2, 6, seed=3), w_ih=cell[0], w_hh=cell[1]),
        ),
        "layers_lengths": (
            gru,
            dict(
                x=rand(3, 4, 5, seed=4),
                h0=rand(4, 3, 4, seed=5),
                lengths=torch.tensor([4, 1, 3]),
                **{f"w{i}": w for i, w in enumerate(layers)},
            ),
        ),
    }


def batch_norm_cases(backend):
    """batch_norm_act in training mode with weight, bias, a residual and running statistics (updated in place)."""
    tensors = dict(
        x=rand(3, 4, 3, 5, seed=1),
        weight=rand(4, seed=2),
        bias=rand(4, seed=3),
        residual=rand(3, 4, 3, 5, seed=4),
        running_mean=rand(4, grad=False, seed=5),
        running_var=rand(4, grad=False, seed=6).abs(),
    )
    return {"relu": (_bind(bmkernels.batch_norm_act, dict(training=True, activation="relu"), backend), tensors)}


def _ids(cases):
    return list(cases(None))


def check_case(cases, backend, name, kind, device="cpu", **sizes):
    """Case `name` of `cases` on `backend`, its tensors on `device`, in views of `kind`."""
    fn, tensors = cases(backend, **sizes)[name]
    tensors = {n: t.detach().to(device).requires_grad_(t.requires_grad) for n, t in tensors.items()}
    check_out_of_bounds(fn, tensors, kind)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", _ids(attention_cases))
def test_attention(name, kind):
    check_case(attention_cases, "cpu", name, kind)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", _ids(flash_attn_cases))
def test_flash_attn(name, kind):
    check_case(flash_attn_cases, "cpu", name, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", _ids(conv_cases))
def test_conv2d(name, kind, dtype, monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")  # our kernels, not a faster engine conv2d might pick
    check_case(conv_cases, "cpu", name, kind, dtype=dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", _ids(gru_cases))
def test_gru(name, kind):
    check_case(gru_cases, "cpu", name, kind)


@pytest.mark.parametrize("kind", list(KINDS))
def test_batch_norm_act(kind):
    """Also: the in-place update of the running statistics writes only their views."""
    fn, tensors = batch_norm_cases("cpu")["relu"]
    stats = {}

    def tracked(**t):  # the running statistics' storages, to check the in-place update wrote only the views
        stats.update({n: t[n] for n in ("running_mean", "running_var")})
        return fn(**t)

    check_out_of_bounds(tracked, tensors, kind)
    for name, view in stats.items():
        assert torch.isfinite(view).all()
        storage = torch.tensor([], dtype=view.dtype).set_(view.untyped_storage())
        assert outside_view(storage, view).isnan().all(), f"{name}: written outside its view"


def kvcache_case(paged):
    """A cache with an unused row (dense, cache_batch_idx) or unused pages (paged, block size 4), 3 new tokens
    appended, rotary, ALiBi, causal; `used`: the cache rows (dense: (B_cache, L), paged: (blocks, block size))
    holding keys after the append. Everything else in the caches is poison in the poisoned run."""
    batch, kv_heads, dim, new = 2, 2, 8, 3
    seqlens = torch.tensor([2, 7], dtype=torch.int32)
    if paged:
        index = dict(block_table=torch.tensor([[5, 1, 3], [0, 6, 2]], dtype=torch.int32))
        blocks, rows = (7, 4), index["block_table"].long()
        used = torch.zeros(blocks, dtype=torch.bool)
        for b in range(batch):
            positions = torch.arange(int(seqlens[b]) + new)
            used[rows[b, positions // 4], positions % 4] = True
    else:
        index = dict(cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32))
        blocks = (3, 12)
        used = torch.zeros(blocks, dtype=torch.bool)
        for b, row in enumerate(index["cache_batch_idx"].tolist()):
            used[row, : int(seqlens[b]) + new] = True
    angles = torch.rand(16, dim // 2, generator=torch.Generator().manual_seed(9)) * 6
    tensors = dict(
        q=rand(batch, new, 4, dim, grad=False, seed=1),
        k_cache=rand(*blocks, kv_heads, dim, grad=False, seed=2),
        v_cache=rand(*blocks, kv_heads, dim, grad=False, seed=3),
        k=rand(batch, new, kv_heads, dim, grad=False, seed=4),
        v=rand(batch, new, kv_heads, dim, grad=False, seed=5),
        rotary_cos=angles.cos(),
        rotary_sin=angles.sin(),
        cache_seqlens=seqlens,
        alibi_slopes=torch.rand(4, generator=torch.Generator().manual_seed(6)),
        **index,
    )
    for name in ("k_cache", "v_cache"):  # nothing beyond the keys in use may be read
        tensors[name][~used] = float("nan")
    return tensors, used


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_flash_attn_with_kvcache(paged, kind):
    """The appended tokens land in the views, nothing else is written, and only the keys in use are read."""
    tensors, used = kvcache_case(paged)

    def call(t):
        out, lse = flash_attn.flash_attn_with_kvcache(**t, causal=True, return_softmax_lse=True)
        return [out, lse, t["k_cache"][used], t["v_cache"][used]]

    clean = {n: t.clone() for n, t in tensors.items()}
    for name in ("k_cache", "v_cache"):
        clean[name][~used] = 0.0
    placed = {n: poisoned(t, kind) for n, t in tensors.items()}
    assert_same(call({n: view for n, (view, _) in placed.items()}), call(clean), kind)
    for name in ("k_cache", "v_cache"):
        view, storage = placed[name]
        assert outside_view(storage, view).isnan().all(), f"{name}: written outside its view"
        assert view[~used].isnan().all(), f"{name}: written beyond the appended tokens"


def test_a_read_outside_the_view_is_caught():
    """The check itself: a kernel that takes its input's rows as contiguous (ignoring the row stride) fails it."""

    def assumes_dense_rows(x):
        return torch.as_strided(x, x.shape, (x.shape[1], 1), x.storage_offset()) * 2

    with pytest.raises(AssertionError, match="poison"):
        check_out_of_bounds(assumes_dense_rows, dict(x=rand(3, 4, grad=False)), "gaps")
