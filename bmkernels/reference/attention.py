"""Plain-PyTorch attention: the specification of bmkernels.attention and its ground truth in tests.

Readable rather than fast: it materialises the (B, H, Lq, Lk) score matrix. Imports nothing of
bmkernels. Order of operations (as FlashAttention does it):

    s = scale * q @ k^T -> softcap -> + bias -> - slope * |i' - j| (ALiBi)
      -> masked entries (mask, key padding, window, causal) become -inf
      -> p = softmax(s) (a row with no key left gives p = 0) -> dropout on p -> out = p @ v

Query position i is aligned to key position i' = i + diag_offset (0 for top-left alignment,
Lk - Lq for bottom-right). Causal keeps keys j <= i'; a window (left, right) keeps
i' - left <= j <= i' + right, with -1 meaning unbounded on that side.
"""

import math

import torch


def diag_offset(q_len, k_len, causal_alignment):
    """Key position that query 0 is aligned to: 0 (top_left) or k_len - q_len (bottom_right)."""
    return k_len - q_len if causal_alignment == "bottom_right" else 0


def visible_keys(q_len, k_len, *, causal=False, window=None, offset=0, device=None):
    """Boolean (Lq, Lk): True where key j is inside query i's causal/window range."""
    i = torch.arange(q_len, device=device).unsqueeze(1) + offset
    j = torch.arange(k_len, device=device).unsqueeze(0)
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    left, right = window if window is not None else (-1, -1)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    causal_alignment="top_left",
    causal_offset=None,
    bias=None,
    mask=None,
    key_padding_mask=None,
    key_range=None,
    window=None,
    softcap=None,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_mask=None,
    scale=None,
    return_lse=False,
):
    """Attention of q (B, Hq, Lq, D) over k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); Hq % Hkv == 0.

    bias: additive, broadcastable to (B, Hq, Lq, Lk). mask: bool, True = keep, broadcastable.
    key_padding_mask: bool (B, Lk), True = padding. key_range: int (B, 2), batch b sees only keys
    key_range[b, 0] <= j < key_range[b, 1]. causal_offset: query i is aligned to key i + causal_offset
    (overrides causal_alignment). alibi_slopes: (Hq,) or (B, Hq).
    dropout_mask: bool keep-mask broadcastable to (B, Hq, Lq, Lk), used when dropout_p > 0 (the
    reference draws nothing itself, so tests hand it the mask the kernel drew).
    Returns out (B, Hq, Lq, Dv), and lse (B, Hq, Lq) if return_lse (-inf for rows with no key).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if q_heads != kv_heads:
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    offset = diag_offset(q_len, k_len, causal_alignment) if causal_offset is None else causal_offset
    if alibi_slopes is not None:
        i = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
        j = torch.arange(k_len, device=q.device).unsqueeze(0)
        distance = (i - j).abs().to(s.dtype)
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes.view(1, q_heads, 1, 1) if slopes.dim() == 1 else slopes.view(batch, q_heads, 1, 1)
        s = s - slopes * distance
    keep = visible_keys(q_len, k_len, causal=causal, window=window, offset=offset, device=q.device)
    keep = keep.expand(batch, q_heads, q_len, k_len)
    if mask is not None:
        keep = keep & mask
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask.view(batch, 1, 1, k_len)
    if key_range is not None:
        j = torch.arange(k_len, device=q.device)
        in_range = (j >= key_range[:, :1]) & (j < key_range[:, 1:])
        keep = keep & in_range.view(batch, 1, 1, k_len)
    s = s.masked_fill(~keep, float("-inf"))
    # a row with no key left (masked, or a -inf bias) gets p = 0 and lse = -inf; its scores are
    # zeroed first so that neither the forward nor the backward meets exp(-inf + inf) = nan
    empty_row = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty_row, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(empty_row, 0.0)
    lse = lse.masked_fill(empty_row.squeeze(-1), float("-inf"))
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("reference attention: dropout_p > 0 needs the dropout_mask to apply")
        p = p * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, dropout_mask=None
):
    """The semantics of torch.nn.functional.scaled_dot_product_attention on (..., H, L, D) inputs;
    a row whose keys are all masked gives zeros."""
    lead = query.shape[:-3] if query.dim() >= 4 else ()
    q, k, v = (t.reshape(-1, *t.shape[-3:]) if t.dim() >= 4 else t.unsqueeze(0) for t in (query, key, value))
    bias = mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        else:
            bias = attn_mask
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError("reference sdpa: query and key heads differ and enable_gqa is False")
    out = attention(
        q,
        k,
        v,
        causal=is_causal,
        bias=_batch_flat(bias, query),
        mask=_batch_flat(mask, query),
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        scale=scale,
    )
    return out.reshape(*lead, *out.shape[-3:]) if query.dim() >= 4 else out.squeeze(0)


def _batch_flat(t, query):
    """A mask broadcastable to query's (..., H, Lq, Lk) grid, as one broadcastable to (B, H, Lq, Lk)."""
    if t is None:
        return None
    grid = (*query.shape[:-1], t.shape[-1])
    t = t.expand(grid)
    return t.reshape(-1, *t.shape[-3:]) if t.dim() >= 4 else t.unsqueeze(0)
