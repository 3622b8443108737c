"""Plain-PyTorch FlashAttention semantics (flash_attn 2.x, as documented in its flash_attn_interface.py):
the specification of bmkernels.flash_attn and its ground truth in tests. Readable, not fast: one sequence
at a time, the score matrix materialised. Imports nothing of bmkernels.

Layout: rows of heads, q (Lq, Hq, D) per sequence. Query i sits at key position i + Lk - Lq (bottom-right);
causal keeps keys j <= that position, window_size (left, right) keeps [pos - left, pos + right] (-1 =
unbounded); s = scale * q k^T -> softcap * tanh(s / softcap) -> - slope * |pos - j| (ALiBi) -> masked
-> softmax (a row without keys gives zeros, lse = -inf) -> @ v. GQA: q head h reads kv head h // (Hq / Hkv).
"""

import math

import torch


def sequence_attention(
    q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None
):
    """One sequence: q (Lq, Hq, D), k (Lk, Hkv, D), v (Lk, Hkv, Dv); alibi_slopes (Hq,) or None.
    Returns out (Lq, Hq, Dv) and lse (Hq, Lq) in q's dtype."""
    q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[0], k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    group = heads // kv_heads
    keys = k.repeat_interleave(group, 1).transpose(0, 1)  # (Hq, Lk, D)
    values = v.repeat_interleave(group, 1).transpose(0, 1)
    s = scale * q.transpose(0, 1) @ keys.transpose(1, 2)  # (Hq, Lq, Lk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(q_len).unsqueeze(1) + k_len - q_len
    j = torch.arange(k_len).unsqueeze(0)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(s.dtype).view(heads, 1, 1) * (pos - j).abs().to(s.dtype)
    left, right = window_size
    if causal:
        right = 0
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if left >= 0:
        keep &= j >= pos - left
    if right >= 0:
        keep &= j <= pos + right
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows without keys: exp(-inf - -inf) = nan -> 0
    return (p @ values).transpose(0, 1), lse


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, **options):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence s is rows
    cu_seqlens_q[s]:cu_seqlens_q[s+1] (and of k/v by cu_seqlens_k). alibi_slopes (Hq,) or (S, Hq).
    Returns out (total_q, Hq, Dv) and lse (Hq, total_q)."""
    outs, lses = [], []
    for s in range(len(cu_seqlens_q) - 1):
        qa, qb = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        ka, kb = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[s]
        out, lse = sequence_attention(q[qa:qb], k[ka:kb], v[ka:kb], alibi_slopes=slopes, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rotary(x, cos, sin, positions, interleaved):
    """x (L, H, D) rotated at positions (L,): the first 2 * cos.shape[1] dims, in pairs (x[2t], x[2t+1])
    when interleaved (GPT-J), else (x[t], x[t + R/2]) (GPT-NeoX); the rest unchanged."""
    half = cos.shape[1]
    out = x.clone()
    for t in range(half):
        a, b = (2 * t, 2 * t + 1) if interleaved else (t, t + half)
        c = cos[positions, t].view(-1, 1).to(x.dtype)
        s = sin[positions, t].view(-1, 1).to(x.dtype)
        out[:, :, a] = x[:, :, a] * c - x[:, :, b] * s
        out[:, :, b] = x[:, :, a] * s + x[:, :, b] * c
    return out


def kvcache_attention(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    k=None,
    v=None,
    block_table=None,
    cache_batch_idx=None,
    rotary_cos=None,
    rotary_sin=None,
    rotary_interleaved=True,
    alibi_slopes=None,
    **options,
):
    """Attention of q (B, Lq, Hq, D) over each batch's cached keys plus the new k/v (B, L_new, Hkv, D),
    without touching the caches. Dense caches (rows, L_max, Hkv, D) read row cache_batch_idx[b] (else b);
    paged caches (blocks, block_size, Hkv, D) key t of batch b at block_table[b, t // block_size].
    Returns out (B, Lq, Hq, Dv), lse (B, Hq, Lq) and the per-batch (keys, values) attended to."""
    outs, lses, seen = [], [], []
    local = options.get("causal") or options.get("window_size", (-1, -1)) != (-1, -1)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        if block_table is not None:
            block = k_cache.shape[1]
            t = torch.arange(n)
            pages = block_table[b].long()[t // block]
            keys, values = k_cache[pages, t % block], v_cache[pages, t % block]
        else:
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            keys, values = k_cache[row, :n], v_cache[row, :n]
        qb = q[b]
        if k is not None:
            new = k[b]
            if rotary_cos is not None:
                new = rotary(new, rotary_cos, rotary_sin, torch.arange(n, n + new.shape[0]), rotary_interleaved)
            keys, values = torch.cat((keys, new), 0), torch.cat((values, v[b]), 0)
        if rotary_cos is not None:
            steps = torch.arange(qb.shape[0]) if local else torch.zeros(qb.shape[0], dtype=torch.long)
            qb = rotary(qb, rotary_cos, rotary_sin, n + steps, rotary_interleaved)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse = sequence_attention(qb, keys, values, alibi_slopes=slopes, **options)
        outs.append(out)
        lses.append(lse)
        seen.append((keys, values))
    return torch.stack(outs), torch.stack(lses), seen
