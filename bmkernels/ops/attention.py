"""bmkernels.attention and bmkernels.scaled_dot_product_attention: argument checks, backend choice,
and the fake kernels of the torch.ops.bmkernels.attention_* operators. Autograd of attention_fwd is
registered in C++ (csrc/autograd/attention.cpp; its backward is the op attention_bwd): the Python
register_autograd path cost more per call than the whole kernel at small shapes.

Memory: the forward saves q, k, v, out and the logsumexp (B, H, Lq) — O(L), never an Lq x Lk
buffer; the backward recomputes probabilities per tile. The one exception is a bias that requires
grad: its gradient is as large as the (broadcast) bias itself, and is reduced to the bias's shape.
"""

import math

import torch

from bmkernels import _backend, _extension
from bmkernels.ops._common import (
    acc_dtype,
    bind,
    call_args,
    check_tensor,
    forward_op,
    same_device_or_fail,
    table,
    tensor_names,
)
from bmkernels.reference import attention as reference

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ALIGNMENTS = ("top_left", "bottom_right")
# Positions, offsets and window bounds stay below this, so the kernels' int64 sums cannot overflow.
_MAX_POSITION = 2**61


def _check_broadcast(name, t, grid):
    """t must broadcast to the (B, Hq, Lq, Lk) score grid."""
    try:
        ok = t.dim() <= 4 and torch.broadcast_shapes(tuple(t.shape), grid) == grid
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attention: {name} of shape {tuple(t.shape)} cannot broadcast to the score grid (B, Hq, Lq, Lk) = {grid}"
        )


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor("attention", name, t)
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D); got shape {tuple(t.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"attention: q must be float32, float64, bfloat16 or float16; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    (batch, q_heads, _, head_dim), (kb, kv_heads, k_len, kd), (vb, vh, vl, _) = q.shape, k.shape, v.shape
    if kb != batch or vb != batch:
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if vh != kv_heads or vl != k_len:
        raise ValueError(
            f"attention: k and v must have the same heads and length; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if kd != head_dim:
        raise ValueError(f"attention: q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if head_dim < 1:
        raise ValueError(f"attention: head dim must be >= 1; got q {tuple(q.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"attention: q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")


def _window_bounds(window, causal):
    """(left, right) with -1 = unbounded; causal caps right at 0."""
    left, right = -1, -1
    if window is not None:
        if not (
            isinstance(window, (tuple, list))
            and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
        ):
            raise TypeError(f"attention: window must be a pair of ints (left, right); got {window!r}")
        left, right = window
        if left < -1 or right < -1:
            raise ValueError(f"attention: window bounds must be >= -1 (-1 = unbounded); got {tuple(window)}")
        # a bound past any position is unbounded in effect; capped so that position sums fit in int64
        left, right = min(left, _MAX_POSITION), min(right, _MAX_POSITION)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def key_range_of(keep: torch.Tensor) -> torch.Tensor | None:
    """The (B, 2) int64 key ranges [begin, end) of a bool keep-mask (B, Lk) (True = a real token)
    whose kept keys form one run per row (right or left padding, or none), else None. A row with no
    kept key gets [0, 0). Reads the mask's values (a host sync on an accelerator)."""
    batch, k_len = keep.shape
    if k_len == 0:
        return keep.new_zeros((batch, 2), dtype=torch.int64)
    kept = keep.to(torch.int32)
    count = kept.sum(1)
    begin = kept.argmax(1)
    end = k_len - kept.flip(1).argmax(1)
    begin, end = torch.where(count > 0, begin, 0), torch.where(count > 0, end, 0)
    if not bool((end - begin == count).all()):
        return None
    return torch.stack((begin, end), 1).to(torch.int64)


def _check_key_range(key_range, batch, k_len, device):
    check_tensor("attention", "key_range", key_range)
    if key_range.dtype != torch.int64 or tuple(key_range.shape) != (batch, 2):
        raise ValueError(
            f"attention: key_range must be int64 of shape (B, 2) = {(batch, 2)}; got {key_range.dtype} "
            f"{tuple(key_range.shape)}"
        )
    if key_range.device != device:
        raise ValueError(f"attention: key_range must be on q's device {device}; got {key_range.device}")
    if torch.compiler.is_compiling():
        return  # the values are checked by the CPU kernel; a traced graph cannot branch on them
    begin, end = key_range[:, 0], key_range[:, 1]
    bad = ((begin < 0) | (begin > end) | (end > k_len)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"attention: key_range rows must be [begin, end) with 0 <= begin <= end <= Lk = {k_len}; row {row} is "
            f"{key_range[row].tolist()}"
        )


def _keep_mask(mask, key_padding_mask, grid):
    """mask (True = keep) and key_padding_mask (True = padding) as (keep-mask, key ranges): padding
    that leaves one run of keys per batch row becomes key ranges (whole key blocks skipped, no mask
    read), any other padding joins the keep-mask."""
    batch, _, _, k_len = grid
    if mask is not None:
        check_tensor("attention", "mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(
                f"attention: mask must be bool (True = keep); got {mask.dtype} (an additive float mask goes in bias=)"
            )
        _check_broadcast("mask", mask, grid)
    if key_padding_mask is None:
        return mask, None
    check_tensor("attention", "key_padding_mask", key_padding_mask)
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"attention: key_padding_mask must be bool (True = padding); got {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (batch, k_len):
        raise ValueError(
            f"attention: key_padding_mask must have shape (B, Lk) = {(batch, k_len)}; "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if not torch.compiler.is_compiling():  # a traced graph cannot branch on the mask's values
        key_range = key_range_of(~key_padding_mask)
        if key_range is not None:
            return mask, key_range
    keep = ~key_padding_mask.view(batch, 1, 1, k_len)
    return (keep if mask is None else keep & mask), None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    causal_alignment: str = "top_left",
    causal_offset: int | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_range: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of q (B, Hq, Lq, D) over k (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv).

    GQA/MQA when Hq is a multiple of Hkv. Semantics and order of operations are those of
    bmkernels.reference.attention.attention; in short: s = scale * q k^T -> softcap -> + bias ->
    - ALiBi -> masked (mask, key_padding_mask, window, causal) -> softmax -> dropout -> @ v.

    causal_alignment: "top_left" (query i sees keys j <= i, as SDPA) or "bottom_right" (the
    diagonal ends at the last key: query i sees j <= i + Lk - Lq, for decoding with a KV cache).
    The alignment also places the window and ALiBi distances. causal_offset (int): query i is
    aligned to key i + causal_offset instead (e.g. a static KV cache: the number of cached tokens);
    it overrides causal_alignment.
    bias: float, q's dtype, broadcastable to (B, Hq, Lq, Lk); gets a gradient if it requires one.
    mask: bool, True = keep. key_padding_mask: bool (B, Lk), True = padding; right or left padding
    (one run of real keys per row) runs as key ranges, any other pattern as a mask.
    key_range: int64 (B, 2), rows [begin, end): batch b attends only to keys begin <= j < end
    (padding as ranges: whole key blocks outside are skipped, nothing is read per score).
    window: (left, right), keys i' - left <= j <= i' + right; -1 = unbounded.
    softcap: s -> softcap * tanh(s / softcap). alibi_slopes: (Hq,) or (B, Hq), no gradient.
    dropout_p: on the probabilities, Philox mask seeded from torch's default generator.
    sinks: floating (Hq,), attention sinks (gpt-oss's s_aux): one logit per query head that joins
    every row's softmax denominator and adds no value (not masked, not scaled, no softcap); gets a
    gradient in its own dtype if it requires one. CPU kernel and reference only.
    A query row with no visible key gives zeros (and lse = -inf, or its sink's logit), never NaN.
    Returns out (B, Hq, Lq, Dv) in q's dtype, or (out, lse) with lse (B, Hq, Lq) in float32
    (float64 for float64 inputs).
    """
    _check_qkv(q, k, v)
    batch, q_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    grid = (batch, q_heads, q_len, k_len)
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"attention: causal_alignment must be one of {_ALIGNMENTS}; got {causal_alignment!r}")
    left, right = _window_bounds(window, causal)
    if causal_offset is not None:
        if not isinstance(causal_offset, int) or isinstance(causal_offset, bool):
            raise TypeError(f"attention: causal_offset must be an int; got {causal_offset!r}")
        if causal_alignment != "top_left":
            raise ValueError("attention: give causal_offset or causal_alignment, not both")
        if abs(causal_offset) > _MAX_POSITION:
            raise ValueError(f"attention: causal_offset must be within +-2**61; got {causal_offset}")
    if bias is not None:
        check_tensor("attention", "bias", bias)
        if bias.dtype != q.dtype:
            raise TypeError(f"attention: bias must have q's dtype {q.dtype}; got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"attention: bias must be on q's device {q.device}; got {bias.device}")
        _check_broadcast("bias", bias, grid)
    keep, padding_range = _keep_mask(mask, key_padding_mask, grid)
    if key_range is not None:
        _check_key_range(key_range, batch, k_len, q.device)
        if padding_range is not None:  # both: the intersection of the two ranges
            lo = torch.maximum(key_range[:, 0], padding_range[:, 0])
            key_range = torch.stack((lo, torch.maximum(lo, torch.minimum(key_range[:, 1], padding_range[:, 1]))), 1)
    else:
        key_range = padding_range
    if keep is not None and keep.device != q.device:
        raise ValueError(f"attention: mask must be on q's device {q.device}; got {keep.device}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"attention: softcap must be a finite number >= 0 (0 or None = off); got {softcap!r}")
    if alibi_slopes is not None:
        check_tensor("attention", "alibi_slopes", alibi_slopes)
        if not alibi_slopes.is_floating_point() or tuple(alibi_slopes.shape) not in ((q_heads,), (batch, q_heads)):
            raise ValueError(
                f"attention: alibi_slopes must be floating, shape (Hq,) = {(q_heads,)} or (B, Hq) = "
                f"{(batch, q_heads)}; got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device != q.device:
            raise ValueError(f"attention: alibi_slopes must be on q's device {q.device}; got {alibi_slopes.device}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "attention: alibi_slopes gets no gradient; pass slopes that do not require grad "
                "(e.g. alibi_slopes.detach())"
            )
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"attention: dropout_p must be in [0, 1); got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number; got {scale!r}")
    if sinks is not None:
        _check_sinks(sinks, q)
    offset = reference.diag_offset(q_len, k_len, causal_alignment) if causal_offset is None else causal_offset

    name = _backend.choose("attention", q.device, backend)
    if name == "reference":
        keep_drawn = torch.rand(grid, device=q.device) >= dropout_p if dropout_p > 0 else None
        out, lse = reference.attention(
            q,
            k,
            v,
            causal=causal,
            causal_offset=offset,
            bias=bias,
            mask=keep,
            key_range=key_range,
            window=(left, right),
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            dropout_p=dropout_p,
            dropout_mask=keep_drawn,
            scale=scale,
            return_lse=True,
        )
        if sinks is not None:
            out, lse = _fold_sinks(out, lse, sinks)
        return (out, lse) if return_lse else out
    # the CUDA kernel reads its seed from device memory (no host sync, capturable by CUDA graphs)
    rng_seed = _draw_seed(q.device if name == "cuda" else None) if dropout_p > 0 else None
    out, lse = forward_op("attention_fwd", name)(
        q,
        k,
        v,
        bias,
        keep,
        alibi_slopes,
        rng_seed,
        float(scale),
        float(softcap or 0.0),
        left,
        right,
        offset,
        float(dropout_p),
        key_range,
        sinks=sinks,
    )
    return (out, lse) if return_lse else out


def _check_sinks(sinks, q):
    check_tensor("attention", "sinks", sinks)
    q_heads = q.shape[1]
    if not sinks.is_floating_point() or tuple(sinks.shape) != (q_heads,):
        raise ValueError(
            f"attention: sinks must be floating of shape (Hq,) = {(q_heads,)}; got {sinks.dtype} {tuple(sinks.shape)}"
        )
    if sinks.device != q.device:
        raise ValueError(f"attention: sinks must be on q's device {q.device}; got {sinks.device}")


def _fold_sinks(out, lse, sinks):
    """The sinks joined to a finished softmax (the CPU kernel's rule, csrc/cpu/attention.cpp apply_sinks):
    lse' = logaddexp(lse, sink), out' = out exp(lse - lse'); a row with neither keys nor sink stays as it was."""
    total = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    factor = torch.where(torch.isneginf(total), torch.ones_like(total), torch.exp(lse - total))
    return (out.to(lse.dtype) * factor.unsqueeze(-1)).to(out.dtype), total


def _draw_seed(device=None):
    """A Philox seed from torch's default generator (of `device`): reproducible under torch.manual_seed."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(
    rng_seed: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int, dropout_p: float
) -> torch.Tensor:
    """The bool keep-mask (B, H, Lq, Lk) that the kernels' dropout draws for rng_seed."""
    _extension.require("dropout_keep_mask")
    return torch.ops.bmkernels.attention_dropout_mask(rng_seed, batch, heads, q_len, k_len, float(dropout_p))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention: query (..., Hq, L, E),
    key (..., Hkv, S, E), value (..., Hkv, S, Ev), their leading dims broadcasting together as torch's
    do (a 3-D query against 4-D key/value, batch or head dims of 1); attn_mask bool (True = take
    part) or float (added), broadcastable to (..., Hq, L, S); is_causal is top-left aligned; GQA with
    enable_gqa (Hq a multiple of Hkv). Returns (..., Hq, L, Ev) over the broadcast leading dims.
    A query whose keys are all masked gets zeros (and zero gradients)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor("attention", name, t)
        if t.dim() < 2:
            raise ValueError(
                f"scaled_dot_product_attention: {name} must have at least 2 dims (L, E); got shape {tuple(t.shape)}"
            )
    given_dims = max(query.dim(), key.dim(), value.dim())
    query, key, value = _broadcast_qkv(query, key, value, enable_gqa)
    q, k, v = (_as_4d(t) for t in (query, key, value))
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: attn_mask must not be set when is_causal=True")
    bias = mask = None
    if attn_mask is not None:
        check_tensor("attention", "attn_mask", attn_mask)
        if attn_mask.dtype == torch.bool:
            mask = _mask_as_4d(attn_mask, query)
        elif attn_mask.dtype == query.dtype:
            bias = _mask_as_4d(attn_mask, query)
        else:
            raise TypeError(
                f"scaled_dot_product_attention: attn_mask must be bool or query's dtype {query.dtype}; "
                f"got {attn_mask.dtype}"
            )
    out = attention(q, k, v, causal=is_causal, bias=bias, mask=mask, dropout_p=dropout_p, scale=scale, backend=backend)
    return out.reshape(*query.shape[query.dim() - given_dims : -1], value.shape[-1])


def _broadcast_qkv(query, key, value, enable_gqa):
    """query, key, value with their dims before (L, E) broadcast together, as torch's SDPA does; with
    enable_gqa the head dim (-3) of key/value may instead divide query's (grouped-query attention).
    Views (expand), no copies."""
    ndim = max(query.dim(), key.dim(), value.dim(), 3)
    q, k, v = (t.view((1,) * (ndim - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        kv_heads = torch.broadcast_shapes(k.shape[-3:-2], v.shape[-3:-2])[0]
        if enable_gqa and q.shape[-3] != kv_heads and kv_heads > 0 and q.shape[-3] % kv_heads == 0:
            q_heads = q.shape[-3]
        else:
            q_heads = kv_heads = torch.broadcast_shapes(q.shape[-3:-2], (kv_heads,))[0]
    except RuntimeError:
        gqa = "" if enable_gqa else "; for grouped-query attention (fewer key/value heads) set enable_gqa=True"
        raise ValueError(
            f"scaled_dot_product_attention: the leading dims of query {tuple(query.shape)}, key "
            f"{tuple(key.shape)} and value {tuple(value.shape)} do not broadcast{gqa}"
        ) from None
    return (
        q.expand(*batch, q_heads, *q.shape[-2:]),
        k.expand(*batch, kv_heads, *k.shape[-2:]),
        v.expand(*batch, kv_heads, *v.shape[-2:]),
    )


def _as_4d(t):
    """(..., H, L, E) -> (B, H, L, E), flattening the batch dims (H = 1 for 2-D inputs)."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])


def _mask_as_4d(m, query):
    """A mask broadcastable to query's (..., Hq, Lq, Lk) grid, as one broadcastable to (B, Hq, Lq, Lk)."""
    if query.dim() == 4 or m.dim() <= 2:
        return m if m.dim() <= 4 else m.reshape(-1, *m.shape[-3:])
    grid = (*query.shape[:-1], m.shape[-1])
    try:
        m = m.expand(grid)
    except RuntimeError:
        raise ValueError(
            f"scaled_dot_product_attention: attn_mask of shape {tuple(m.shape)} cannot broadcast to {grid}"
        ) from None
    return _as_4d(m)


def _empty_output(q, v_head_dim):
    """out laid out as q is (the C++ kernel's rule, csrc/cpu/attention.cpp empty_output): rows of heads
    (B, Lq, Hq, Dv) when q's head stride is below its row stride, else contiguous."""
    batch, heads, q_len, _ = q.shape
    if q.stride(1) < q.stride(2):
        return q.new_empty(batch, q_len, heads, v_head_dim).transpose(1, 2)
    return q.new_empty(batch, heads, q_len, v_head_dim)


# the schemas of attention_fwd / attention_bwd (csrc/registration.cpp), in order
ATTENTION_FWD = table(
    "q:Tensor k:Tensor v:Tensor bias:Tensor? mask:Tensor? alibi_slopes:Tensor? rng_seed:Tensor? scale:float "
    "softcap:float window_left:int window_right:int diag_offset:int dropout_p:float key_range:Tensor?=None "
    "segments:Tensor?=None sinks:Tensor?=None"
)
ATTENTION_BWD = table(
    "grad_out:Tensor q:Tensor k:Tensor v:Tensor out:Tensor lse:Tensor grad_lse:Tensor? bias:Tensor? mask:Tensor? "
    "alibi_slopes:Tensor? rng_seed:Tensor? scale:float softcap:float window_left:int window_right:int "
    "diag_offset:int dropout_p:float bias_grad:bool key_range:Tensor?=None segments:Tensor?=None"
)
_FWD_TENSORS = tensor_names(ATTENTION_FWD)


def _fake_fwd(*args, **kwargs):
    a = bind(ATTENTION_FWD, args, kwargs)
    same_device_or_fail("attention", *(a[n] for n in _FWD_TENSORS))
    q, v = a["q"], a["v"]
    batch, heads, q_len, _ = q.shape
    out = _empty_output(q, v.shape[-1])
    lse = q.new_empty(batch, heads, q_len, dtype=acc_dtype(q.dtype))
    return out, lse


def _fake_bwd(*args, **kwargs):
    a = bind(ATTENTION_BWD, args, kwargs)
    same_device_or_fail("attention", *(a[n] for n in tensor_names(ATTENTION_BWD)))
    q, k = a["q"], a["k"]
    dbias_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if a["bias_grad"] else (0,)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(a["v"], memory_format=torch.contiguous_format),
        q.new_empty(dbias_shape, dtype=acc_dtype(q.dtype)),
    )


def _setup_context(ctx, inputs, output):
    """Saves every tensor argument of the forward and its outputs; keeps the scalars by name."""
    a = bind(ATTENTION_FWD, inputs)
    out, lse = output
    ctx.save_for_backward(*(a[n] for n in _FWD_TENSORS), out, lse)
    ctx.scalars = {n: value for n, value in a.items() if n not in _FWD_TENSORS}


def backward_with(bwd_op):
    """The autograd backward of an attention_fwd-shaped operator whose gradients come from bwd_op
    (attention_bwd's signature): the Triton operators' (the C++ operator's is in csrc/autograd/). The
    backward's arguments are the forward's, by name (ATTENTION_BWD), plus the gradients and outputs."""

    def backward(ctx, grad_out, grad_lse):
        values = dict(zip((*_FWD_TENSORS, "out", "lse"), ctx.saved_tensors, strict=True)) | ctx.scalars
        bias = values["bias"]
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        values.update(grad_out=grad_out, grad_lse=grad_lse, bias_grad=bias_grad)
        dq, dk, dv, dbias = bwd_op(*call_args(ATTENTION_BWD, values))
        dbias = dbias.sum_to_size(bias.shape).to(bias.dtype) if bias_grad else None
        return dq, dk, dv, dbias, *([None] * (len(ATTENTION_FWD) - 4))

    return backward


if _extension.loaded():
    for fwd, bwd in (("attention_fwd", "attention_bwd"), ("attention_emulated_fwd", "attention_emulated_bwd")):
        torch.library.register_fake(f"bmkernels::{fwd}")(_fake_fwd)
        torch.library.register_fake(f"bmkernels::{bwd}")(_fake_bwd)
    torch.library.register_fake("bmkernels::attention_kvcache_fwd")(
        lambda q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, *scalars: (
            same_device_or_fail(
                "attention", q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes
            ),
            q.new_empty(*q.shape[:3], v_cache.shape[-1]),
            q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=acc_dtype(q.dtype)),
        )[1:]
    )
    torch.library.register_fake("bmkernels::attention_dropout_mask")(
        lambda rng_seed, batch, heads, q_len, k_len, dropout_p: rng_seed.new_empty(
            (batch, heads, q_len, k_len), dtype=torch.bool
        )
    )
