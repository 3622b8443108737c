"""FlashAttention's Python API on bmkernels kernels, so code written for FlashAttention runs unchanged on a
CPU (and wherever bmkernels has a backend): `from bmkernels.flash_attn import flash_attn_func`.

Signatures, layouts and semantics follow flash_attn 2.x (flash_attn_interface.py):
- q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D): "rows of heads", the projection layout; GQA when Hkv divides Hq.
- causal, window_size and ALiBi distances are aligned bottom-right: query i sits at key i + Lk - Lq
  (per sequence for the varlen and KV-cache functions). window_size=(left, right), -1 = unbounded; causal
  sets right = 0.
- softcap: s -> softcap * tanh(s / softcap), after the scale; 0 = off. alibi_slopes: (Hq,) or (B, Hq), the
  score gets -slope * |i + Lk - Lq - j|.
- softmax_lse is (B, Hq, Lq) float32 (varlen: (Hq, total_q)). A query that sees no key gives zeros and
  lse = -inf (FlashAttention's CUDA kernel writes +inf there).

Differences, all stated: `deterministic` is accepted and has no effect (every bmkernels kernel is
deterministic); `return_attn_probs=True` returns (out, softmax_lse, None): the dropout-masked probability
matrix, which FlashAttention returns for its tests only, is never materialised; `num_splits` is a hint
FlashAttention uses on the GPU and is ignored (the CPU kernel picks its own split); `max_seqlen_q/k` are
not needed (the kernel reads the lengths from cu_seqlens) and only checked to be ints. Not supported yet,
with a clear error: a paged `block_table` in flash_attn_varlen_func, `cache_leftpad`, and
flash_attn_with_kvcache on non-CPU tensors. flash_attn_varlen_func runs the CPU kernel on CPU tensors and
the Triton kernel on CUDA tensors (`backend=` as in bmkernels.attention; the Triton path is tested under
the interpreter here, not on a GPU).
"""

import math
from typing import Any

import torch

from bmkernels import _backend
from bmkernels.ops import attention as ops_attention
from bmkernels.ops._common import forward_op
from bmkernels.reference import flash_attn as reference

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _bounds(causal, window_size):
    """(left, right) window bounds for the kernels: -1 unbounded; causal clips the right bound to 0."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"flash_attn: window_size must be a pair (left, right); got {window_size!r}")
    left, right = window_size
    for name, bound in (("window_size[0]", left), ("window_size[1]", right)):
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < -1:
            raise ValueError(f"flash_attn: {name} must be an int >= -1 (-1 = unbounded); got {bound!r}")
    if causal:
        right = 0
    return left, right


def _scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"flash_attn: softmax_scale must be a finite number; got {softmax_scale!r}")
    return float(softmax_scale)


def _softcap(softcap):
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"flash_attn: softcap must be a finite number >= 0 (0 = off); got {softcap!r}")
    return float(softcap)


def _check_rows_of_heads(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_attn: {name} must be a tensor; got {type(t).__name__}")
    if t.dim() != dims:
        shape = "(B, L, H, D)" if dims == 4 else "(total, H, D)"
        raise ValueError(f"flash_attn: {name} must be {dims}-D {shape}; got shape {tuple(t.shape)}")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention of q (B, Lq, Hq, D) over k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv); returns out (B, Lq, Hq, Dv)
    (with return_attn_probs: (out, softmax_lse (B, Hq, Lq), None)). Differentiable in q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rows_of_heads(name, t, 4)
    left, right = _bounds(causal, window_size)
    q_len, k_len = q.shape[1], k.shape[1]
    out = ops_attention.attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        window=(left, right),
        causal_offset=k_len - q_len,
        softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes,
        dropout_p=dropout_p,
        scale=_scale(softmax_scale, q.shape[-1]),
        return_lse=return_attn_probs,
        backend=backend,
    )
    if return_attn_probs:
        out, lse = out
        return out.transpose(1, 2), lse, None
    return out.transpose(1, 2)


def flash_attn_kvpacked_func(
    q: torch.Tensor, kv: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_func with kv (B, Lk, 2, Hkv, D) packed."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn: kv must be (B, Lk, 2, Hkv, D); got {getattr(kv, 'shape', kv)!r}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], *args, **kwargs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_func with qkv (B, L, 3, H, D) packed."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn: qkv must be (B, L, 3, H, D); got {getattr(qkv, 'shape', qkv)!r}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kwargs)


def _check_cu_seqlens(name, cu, total, count):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        raise ValueError(
            f"flash_attn: {name} must be a 1-D int32 tensor (cumulative sequence lengths); got "
            f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}"
        )
    if count is not None and cu.shape[0] != count:
        raise ValueError(
            f"flash_attn: cu_seqlens_q and cu_seqlens_k must have the same length; got {count} and {cu.shape[0]}"
        )
    if cu.shape[0] < 1:
        raise ValueError(f"flash_attn: {name} must hold at least one entry (0)")
    c = cu.cpu()
    if c[0] != 0 or c[-1] != total or bool((c[1:] < c[:-1]).any()):
        raise ValueError(
            f"flash_attn: {name} must rise from 0 to the number of packed rows {total} without decreasing; got "
            f"{c.tolist() if c.numel() <= 16 else c[:8].tolist() + ['...'] + c[-8:].tolist()}"
        )


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
    sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and cu_seqlens_k[s]:cu_seqlens_k[s+1] of k/v
    (int32, (S + 1,)). Each attends to its own keys only, aligned bottom-right; alibi_slopes (Hq,) or
    (S, Hq). One kernel call over all sequences, no padding. Returns out (total_q, Hq, Dv) (with
    return_attn_probs: (out, softmax_lse (Hq, total_q), None)). Differentiable in q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rows_of_heads(name, t, 3)
    if block_table is not None:
        raise NotImplementedError("flash_attn_varlen_func: a paged KV cache (block_table) is not supported yet")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"flash_attn: {name} must be an int >= 0; got {n!r}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.shape[0])
    ops_attention._check_qkv(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)))
    left, right = _bounds(causal, window_size)
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"flash_attn: dropout_p must be in [0, 1); got {dropout_p!r}")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("flash_attn: alibi_slopes gets no gradient; pass alibi_slopes.detach()")
    name = _backend.choose("attention", q.device, backend)
    scale, softcap = _scale(softmax_scale, q.shape[-1]), _softcap(softcap)
    if name == "reference":
        if dropout_p > 0:
            raise ValueError("flash_attn_varlen_func: backend='reference' has no dropout; use 'cpu' or 'triton'")
        out, lse = reference.varlen_attention(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            alibi_slopes=alibi_slopes,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            softmax_scale=scale,
        )
        return (out, lse, None) if return_attn_probs else out
    segments = torch.stack((cu_seqlens_q, cu_seqlens_k), 1).to(device=q.device, dtype=torch.int64)
    rng_seed = ops_attention._draw_seed() if dropout_p > 0 else None
    out, lse = forward_op("attention_fwd", name)(
        q.unsqueeze(0).transpose(1, 2),
        k.unsqueeze(0).transpose(1, 2),
        v.unsqueeze(0).transpose(1, 2),
        None,
        None,
        alibi_slopes,
        rng_seed,
        scale,
        softcap,
        left,
        right,
        0,
        float(dropout_p),
        None,
        segments,
    )
    out = out.transpose(1, 2).squeeze(0)
    return (out, lse.squeeze(0), None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_varlen_func with kv (total_k, 2, Hkv, D) packed."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"flash_attn: kv must be (total_k, 2, Hkv, D); got {getattr(kv, 'shape', kv)!r}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, *args, **kwargs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *args: Any, **kwargs: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """flash_attn_varlen_func with qkv (total, 3, H, D) packed (the same sequences for q and k)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"flash_attn: qkv must be (total, 3, H, D); got {getattr(qkv, 'shape', qkv)!r}")
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, *args, **kwargs
    )


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (B, L, H, D) at positions (B, L): the first 2 * cos.shape[1] dims rotated,
    as flash_attn.layers.rotary.apply_rotary_emb (GPT-J pairs when interleaved, else GPT-NeoX halves)."""
    rot = 2 * cos.shape[1]
    c = cos[positions].unsqueeze(2).to(torch.float32)  # (B, L, 1, rot / 2)
    s = sin[positions].unsqueeze(2).to(torch.float32)
    head, tail = x[..., :rot].to(torch.float32), x[..., rot:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, -1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((rotated.to(x.dtype), tail), -1)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Lq, Hq, D) over a KV cache, for decoding (no gradient, as in FlashAttention).

    k_cache/v_cache: (B_cache, L_max, Hkv, D) dense, or (num_blocks, block_size, Hkv, D) pages addressed
    through block_table (B, max_blocks) int32 (any block size). cache_seqlens: int or (B,) int32, the keys
    already cached per batch (None: the whole cache). k, v (B, L_new, Hkv, D), when given, are written into
    the cache in place at positions cache_seqlens .. cache_seqlens + L_new (crossing pages as needed) and
    attended to. rotary_cos/sin (L_ro, R / 2): q and the new k rotated at their positions first (q at
    cache_seqlens + i when causal or windowed, else at cache_seqlens). cache_batch_idx (B,) int32: the cache
    row of each batch (dense caches). Returns out (B, Lq, Hq, Dv), or (out, softmax_lse (B, Hq, Lq)).

    An append that would overflow the cache or follow a block_table entry out of range raises before
    anything is written.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_rows_of_heads(name, t, 4)
    if q.device.type != "cpu":
        raise NotImplementedError(f"flash_attn_with_kvcache runs on CPU tensors so far; got {q.device}")
    if cache_leftpad is not None:
        raise NotImplementedError("flash_attn_with_kvcache: cache_leftpad is not supported yet")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: give both k and v (the new tokens) or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: give both rotary_cos and rotary_sin or neither")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"flash_attn_with_kvcache: num_splits must be an int >= 0; got {num_splits!r}")
    batch, q_len = q.shape[0], q.shape[1]
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("flash_attn_with_kvcache: cache_batch_idx does not apply to a paged cache (block_table)")
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(
                f"flash_attn_with_kvcache: block_table must be int32 (B, max_blocks) with B = {batch}; got "
                f"{block_table.dtype} {tuple(block_table.shape)}"
            )
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), 0 if k is not None else capacity, dtype=torch.int32)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    elif not (isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dtype == torch.int32):
        raise ValueError(
            f"flash_attn_with_kvcache: cache_seqlens must be an int or an int32 (B,) tensor; got {cache_seqlens!r}"
        )
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(
            f"flash_attn_with_kvcache: cache_seqlens must have shape (B,) = ({batch},); got "
            f"{tuple(cache_seqlens.shape)}"
        )
    if cache_batch_idx is not None and (
        cache_batch_idx.dtype != torch.int32 or tuple(cache_batch_idx.shape) != (batch,)
    ):
        raise ValueError(
            f"flash_attn_with_kvcache: cache_batch_idx must be int32 of shape ({batch},); got "
            f"{cache_batch_idx.dtype} {tuple(cache_batch_idx.shape)}"
        )
    starts = cache_seqlens.to(torch.int64)
    left, right = _bounds(causal, window_size)
    new_len = 0 if k is None else k.shape[1]
    if k is not None:
        _append(
            k_cache,
            v_cache,
            k,
            v,
            starts,
            block_table,
            cache_batch_idx,
            capacity,
            rotary_cos,
            rotary_sin,
            rotary_interleaved,
        )
    if rotary_cos is not None:
        # q rotated at cache_seqlens + i when causal/local, else every query at cache_seqlens
        steps = torch.arange(q_len) if (causal or left >= 0 or right >= 0) else torch.zeros(q_len, dtype=torch.int64)
        q = _rotate(q, rotary_cos, rotary_sin, starts[:, None] + steps, rotary_interleaved)
    out, lse = torch.ops.bmkernels.attention_kvcache_fwd(
        q,
        k_cache,
        v_cache,
        starts + new_len,
        block_table,
        cache_batch_idx,
        alibi_slopes,
        _scale(softmax_scale, q.shape[-1]),
        _softcap(softcap),
        left,
        right,
    )
    return (out, lse) if return_softmax_lse else out


def _append(
    k_cache, v_cache, k, v, starts, block_table, cache_batch_idx, capacity, rotary_cos, rotary_sin, interleaved
):
    """Writes the new k, v (B, L_new, Hkv, D) into the caches at rows starts[b] + t, after checking every
    destination (nothing is written when one is out of range)."""
    batch, new_len = k.shape[0], k.shape[1]
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[0] != starts.shape[0]:
        raise ValueError(
            f"flash_attn_with_kvcache: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, L_new, Hkv, D) "
            f"with B = {starts.shape[0]}"
        )
    if k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:]:
        raise ValueError(
            f"flash_attn_with_kvcache: new k {tuple(k.shape)} / v {tuple(v.shape)} must match the caches' heads and "
            f"head dims {tuple(k_cache.shape[2:])} / {tuple(v_cache.shape[2:])}"
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(
            f"flash_attn_with_kvcache: new k/v must have the caches' dtype {k_cache.dtype}; got {k.dtype}, {v.dtype}"
        )
    positions = starts[:, None] + torch.arange(new_len)  # (B, L_new)
    end = starts + new_len
    if bool((starts < 0).any()) or bool((end > capacity).any()):
        b = int(torch.nonzero((starts < 0) | (end > capacity))[0, 0])
        raise ValueError(
            f"flash_attn_with_kvcache: appending {new_len} tokens at cache_seqlens[{b}] = {int(starts[b])} overflows "
            f"the cache's {capacity} positions; nothing was written"
        )
    if rotary_cos is not None:
        k = _rotate(k, rotary_cos, rotary_sin, positions, interleaved)
    if block_table is not None:
        block_size = k_cache.shape[1]
        pages = block_table.to(torch.int64).gather(1, positions // block_size)
        if bool(((pages < 0) | (pages >= k_cache.shape[0])).any()):
            raise ValueError(
                f"flash_attn_with_kvcache: block_table names a block outside [0, {k_cache.shape[0]}) for the appended "
                "tokens; nothing was written"
            )
        index = (pages, positions % block_size)
    else:
        rows = torch.arange(batch) if cache_batch_idx is None else cache_batch_idx.to(torch.int64)
        if bool(((rows < 0) | (rows >= k_cache.shape[0])).any()):
            raise ValueError(
                f"flash_attn_with_kvcache: cache_batch_idx names a cache row outside [0, {k_cache.shape[0]})"
            )
        index = (rows[:, None].expand(batch, new_len), positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)
