"""FlashAttention-2 style Triton kernels for bmkernels.attention (forward and backward).

Semantics are those of bmkernels/reference/attention.py (the CPU op's contract); the operators
torch.ops.bmkernels.attention_triton_fwd / attention_triton_bwd take exactly the arguments of the
C++ attention_fwd / attention_bwd, so bmkernels/ops/attention.py checks arguments once for both.

- forward: one program per (query block, batch x query head); online softmax over key blocks,
  saves the logsumexp (B, Hq, Lq) in float32.
- backward: delta = rowsum(dO * O) - dlse (torch, memory-bound), then two kernels that recompute
  P from the saved logsumexp: dK/dV (and dbias) per key block, looping over every query head of
  its GQA group and the query blocks that can see the key block; dQ per query block in a separate
  pass. No atomics: every output element is written by exactly one program, so the result is
  deterministic.
- causal / window / alignment: the key (query) loop only visits blocks inside the diagonal band.
- head dims up to 256, any size: loads are masked to the power-of-two block BLOCK_D / BLOCK_DV.
- dropout: keep = tl.rand(seed, ((b * Hq + h) * Lq + i) * Lk + j) >= p, the stream of the CPU
  kernel (csrc/common/philox.h), regenerated in the backward.
- float16, bfloat16, float32 (GEMMs in the input dtype with float32 accumulation; float32 GEMMs
  in IEEE precision, not TF32). float64 has no Triton path: use the CPU kernel or the reference.

Import this module only with triton importable; under TRITON_INTERPRET=1 it must also be imported
after the variable is set (triton decides at decoration time), and uses one small fixed config.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bmkernels.ops import attention as ops_attention

MAX_HEAD_DIM = 256
MASK_GRANULE = tl.constexpr(16)  # rows and columns per entry of a mask's tile table (the smallest block)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def tuned(blocks, untuned=None):
    """Autotune candidates: all of `blocks`, or with BMK_TRITON_AUTOTUNE=0 only `untuned` (default: the
    first), so that nothing is tuned -- for test suites that compile many kernel variants."""
    if os.environ.get("BMK_TRITON_AUTOTUNE", "1") == "0":
        return [untuned or blocks[0]]
    return blocks


def _configs(blocks, interpreted_block, untuned):
    """Autotune configs (block_m, block_n, warps, stages) for A100/H100; one small fixed config
    under the interpreter, which runs programs one after another. `untuned`: the config used without
    tuning, one that fits shared memory at every head dim (<= 256) in float32."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": interpreted_block, "BLOCK_N": interpreted_block}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tuned(blocks, untuned)
    ]


_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)],
    32,
    untuned=(64, 32, 4, 2),
)
_BWD_CONFIGS = _configs(
    [(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1)],
    32,
    untuned=(16, 32, 4, 1),
)
_TUNE_KEY = ["Lq", "Lk", "BLOCK_D", "BLOCK_DV", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT"]


@triton.jit
def _tanh(x):
    # tanh from exp (libdevice is not available under the interpreter); saturates cleanly to +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(
    qk,
    rows,
    cols,
    bias_ptr,
    sbm,
    sbn,
    mask_ptr,
    smm,
    smn,
    mask_mixed,
    slope,
    Lq,
    kbeg,
    kend,
    scale,
    softcap,
    left,
    right,
    offset,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """The score tile s (masked entries -inf) from the raw q k^T tile, and tanh(scale qk / softcap)
    (the softcap derivative needs it; s itself when softcap is off). bias_ptr / mask_ptr already
    point at this (batch, head)."""
    s = qk * scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    inside = (rows[:, None] < Lq) & (cols[None, :] >= kbeg) & (cols[None, :] < kend)  # kend <= Lk
    if HAS_BIAS:
        s += tl.load(bias_ptr + rows[:, None] * sbm + cols[None, :] * sbn, mask=inside, other=0.0).to(tl.float32)
    pos = rows[:, None] + offset  # the key position each query is aligned to
    if HAS_ALIBI:
        s -= slope * tl.abs(pos - cols[None, :]).to(tl.float32)
    keep = inside & ((left < 0) | (cols[None, :] >= pos - left)) & ((right < 0) | (cols[None, :] <= pos + right))
    if HAS_MASK:
        if mask_mixed:  # a tile whose mask entries are all kept skips the load (_mask_tile)
            keep &= tl.load(mask_ptr + rows[:, None] * smm + cols[None, :] * smn, mask=inside, other=0) != 0
    return tl.where(keep, s, float("-inf")), t


@triton.jit
def _dropout_keep(seed_ptr, bh, rows, cols, Lq, Lk, dropout_p):
    """The CPU kernel's Philox draw: element (bh, i, j) of the (B*Hq, Lq, Lk) grid is its counter."""
    counter = (bh * Lq + rows[:, None].to(tl.int64)) * Lk + cols[None, :]
    return tl.rand(tl.load(seed_ptr), counter) >= dropout_p


@triton.jit
def _key_range(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Lk, left, right, offset):
    """Key blocks [lo, hi) that queries m0 .. m0 + BLOCK_M - 1 can see through the window/causal band."""
    lo = tl.where(left >= 0, tl.maximum(m0 + offset - left, 0), 0)
    hi = tl.where(right >= 0, tl.minimum(m0 + BLOCK_M + offset + right, Lk), Lk)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _keys_of(KeyRange, b, Lk, HAS_KEY_RANGE: tl.constexpr):
    """Batch b's keys [kbeg, kend): its key_range row, or every key."""
    kbeg = 0
    kend = Lk
    if HAS_KEY_RANGE:
        kbeg = tl.load(KeyRange + 2 * b).to(tl.int32)
        kend = tl.load(KeyRange + 2 * b + 1).to(tl.int32)
    return kbeg, kend


@triton.jit
def _segment(Segments, b, Lq, Lk, offset, HAS_SEGMENTS: tl.constexpr):
    """Program row b's problem: (tensor batch, first query row, first key row, Lq, Lk, diagonal offset).
    With packed sequences (segments), b is sequence b of batch 0, aligned bottom-right; else batch b."""
    if HAS_SEGMENTS:
        q0 = tl.load(Segments + 2 * b)
        k0 = tl.load(Segments + 2 * b + 1)
        q_len = tl.load(Segments + 2 * b + 2) - q0
        k_len = tl.load(Segments + 2 * b + 3) - k0
        return b * 0, q0, k0, q_len.to(tl.int32), k_len.to(tl.int32), offset + (k_len - q_len).to(tl.int32)
    return b, b * 0, b * 0, Lq, Lk, offset


@triton.jit
def _mask_tile(
    MaskTiles, stq, stk, m0, n0, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr
):
    """(visit, mixed) for the score tile at (m0, n0), from the mask's table of 16 x 16 granules (0: nothing
    kept, 1: mixed, 2: all kept): a tile with nothing kept is skipped, one with everything kept needs no
    mask loads. Without a mask: (True, False)."""
    if HAS_MASK:
        gq = m0 // MASK_GRANULE + tl.arange(0, (BLOCK_M + MASK_GRANULE - 1) // MASK_GRANULE)
        gk = n0 // MASK_GRANULE + tl.arange(0, (BLOCK_N + MASK_GRANULE - 1) // MASK_GRANULE)
        inside = (gq[:, None] * MASK_GRANULE < Lq) & (gk[None, :] * MASK_GRANULE < Lk)
        codes = tl.load(MaskTiles + gq[:, None] * stq + gk[None, :] * stk, mask=inside, other=0)
        most = tl.max(tl.max(codes, 1), 0)
        least = tl.min(tl.min(tl.where(inside, codes, 2), 1), 0)
        return most > 0, least < 2
    return True, False


@triton.jit
def _count_tile(Tiles, which, COUNT_TILES: tl.constexpr):
    """Tests count the tiles each kernel visits (counting_tiles()): block skipping is checked that way."""
    if COUNT_TILES:
        tl.atomic_add(Tiles + which, 1)


@triton.jit
def _query_range(n0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Lq, left, right, offset):
    """Query blocks [lo, hi) that can see keys n0 .. n0 + BLOCK_N - 1."""
    lo = tl.where(right >= 0, tl.maximum(n0 - right - offset, 0), 0)
    hi = tl.where(left >= 0, tl.minimum(n0 + BLOCK_N + left - offset, Lq), Lq)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Bias,
    Mask,
    MaskTiles,
    Slopes,
    Seed,
    KeyRange,
    Segments,
    Tiles,
    Out,
    Lse,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sbb,
    sbh,
    sbm,
    sbn,
    smb,
    smh,
    smm,
    smn,
    stb,
    sth,
    stq,
    stk,
    ssb,
    ssh,
    sob,
    soh,
    som,
    sod,
    Hq,
    Lq,
    Lk,
    D,
    DV,
    GROUP,
    scale,
    softcap,
    left,
    right,
    offset,
    dropout_p,
    dropout_scale,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1).to(tl.int64) // Hq
    h = tl.program_id(1).to(tl.int64) % Hq
    hk = h // GROUP
    total_q, total_k = Lq, Lk
    b, q0, k0, Lq, Lk, offset = _segment(Segments, seq, Lq, Lk, offset, HAS_SEGMENTS)
    if m0 >= Lq:  # a block past this sequence's queries (grids span the longest one)
        return
    bh = b * Hq + h
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + (q0 + rows[:, None]) * sqm + d[None, :] * sqd,
        mask=(rows[:, None] < Lq) & (d[None, :] < D),
        other=0.0,
    )
    K += b * skb + hk * skh + k0 * skn
    V += b * svb + hk * svh + k0 * svn
    Bias += b * sbb + h * sbh
    Mask += b * smb + h * smh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + seq * ssb + h * ssh)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kbeg, kend = _keys_of(KeyRange, b, Lk, HAS_KEY_RANGE)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, Lk, left, right, offset)
    lo, hi = tl.maximum(lo, (kbeg // BLOCK_N) * BLOCK_N), tl.minimum(hi, kend)  # padding: whole blocks skipped
    for n0 in range(lo, hi, BLOCK_N):
        visit, mask_mixed = _mask_tile(
            MaskTiles + b * stb + h * sth, stq, stk, m0, n0, Lq, Lk, BLOCK_M, BLOCK_N, HAS_MASK
        )
        if visit:  # a tile the mask keeps nothing of is skipped
            _count_tile(Tiles, 0, COUNT_TILES)
            cols = n0 + tl.arange(0, BLOCK_N)
            kt = tl.load(
                K + cols[None, :] * skn + d[:, None] * skd, mask=(cols[None, :] < Lk) & (d[:, None] < D), other=0.0
            )
            qk = tl.dot(q, kt, input_precision="ieee")
            s, _ = _scores(
                qk,
                rows,
                cols,
                Bias,
                sbm,
                sbn,
                Mask,
                smm,
                smn,
                mask_mixed,
                slope,
                Lq,
                kbeg,
                kend,
                scale,
                softcap,
                left,
                right,
                offset,
                HAS_BIAS,
                HAS_MASK,
                HAS_ALIBI,
                HAS_SOFTCAP,
            )
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no -inf - -inf
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(Seed, bh, q0 + rows, k0 + cols, total_q, total_k, dropout_p)
                p = tl.where(keep, p * dropout_scale, 0.0)
            v = tl.load(
                V + cols[:, None] * svn + dv[None, :] * svd, mask=(cols[:, None] < Lk) & (dv[None, :] < DV), other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

    empty = l_i == 0.0  # no visible key: zeros and lse = -inf, never NaN
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        Out + b * sob + h * soh + (q0 + rows[:, None]) * som + dv[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=(rows[:, None] < Lq) & (dv[None, :] < DV),
    )
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Lse + bh * total_q + q0 + rows, lse, mask=rows < Lq)


@triton.jit
def _probabilities(
    q,
    kt,
    rows,
    cols,
    lse,
    Bias,
    sbm,
    sbn,
    Mask,
    smm,
    smn,
    mask_mixed,
    slope,
    Lq,
    kbeg,
    kend,
    scale,
    softcap,
    left,
    right,
    offset,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """P tile recomputed from the saved logsumexp (0 where masked or the row is empty), and the
    softcap tanh."""
    qk = tl.dot(q, kt, input_precision="ieee")
    s, t = _scores(
        qk,
        rows,
        cols,
        Bias,
        sbm,
        sbn,
        Mask,
        smm,
        smn,
        mask_mixed,
        slope,
        Lq,
        kbeg,
        kend,
        scale,
        softcap,
        left,
        right,
        offset,
        HAS_BIAS,
        HAS_MASK,
        HAS_ALIBI,
        HAS_SOFTCAP,
    )
    return tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), t


@triton.jit
def _score_grad(p, dp, delta, t, HAS_SOFTCAP: tl.constexpr):
    """dS (gradient of the final score, = dbias) and the gradient of scale * q k^T."""
    ds = p * (dp - delta[:, None])
    dqk = ds
    if HAS_SOFTCAP:
        dqk = ds * (1.0 - t * t)
    return ds, dqk


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    dO,
    Lse,
    Delta,
    Bias,
    Mask,
    MaskTiles,
    Slopes,
    Seed,
    KeyRange,
    Segments,
    Tiles,
    dK,
    dV,
    dBias,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    sbb,
    sbh,
    sbm,
    sbn,
    smb,
    smh,
    smm,
    smn,
    stb,
    sth,
    stq,
    stk,
    ssb,
    ssh,
    Hq,
    Hkv,
    Lq,
    Lk,
    D,
    DV,
    GROUP,
    scale,
    softcap,
    left,
    right,
    offset,
    dropout_p,
    dropout_scale,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1).to(tl.int64) // Hkv
    hk = tl.program_id(1).to(tl.int64) % Hkv
    total_q, total_k = Lq, Lk
    b, q0, k0, Lq, Lk, offset = _segment(Segments, seq, Lq, Lk, offset, HAS_SEGMENTS)
    if n0 >= Lk:  # a block past this sequence's keys (grids span the longest one)
        return
    bhk = b * Hkv + hk
    cols = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(
        K + b * skb + hk * skh + (k0 + cols[None, :]) * skn + d[:, None] * skd,
        mask=(cols[None, :] < Lk) & (d[:, None] < D),
        other=0.0,
    )
    vt = tl.load(
        V + b * svb + hk * svh + (k0 + cols[None, :]) * svn + dv[:, None] * svd,
        mask=(cols[None, :] < Lk) & (dv[:, None] < DV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    kbeg, kend = _keys_of(KeyRange, b, Lk, HAS_KEY_RANGE)
    lo, hi = _query_range(n0, BLOCK_M, BLOCK_N, Lq, left, right, offset)
    hi = tl.where((n0 + BLOCK_N > kbeg) & (n0 < kend), hi, lo)  # a block of padding keys: dK = dV = 0
    for g in range(GROUP):  # every query head of this key head's group, in order: deterministic sums
        h = hk * GROUP + g
        bh = b * Hq + h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + seq * ssb + h * ssh)
        for m0 in range(lo, hi, BLOCK_M):
            visit, mask_mixed = _mask_tile(
                MaskTiles + b * stb + h * sth, stq, stk, m0, n0, Lq, Lk, BLOCK_M, BLOCK_N, HAS_MASK
            )
            if visit:  # a tile the mask keeps nothing of is skipped
                _count_tile(Tiles, 1, COUNT_TILES)
                rows = m0 + tl.arange(0, BLOCK_M)
                in_rows = rows < Lq
                q = tl.load(
                    Q + b * sqb + h * sqh + (q0 + rows[:, None]) * sqm + d[None, :] * sqd,
                    mask=in_rows[:, None] & (d[None, :] < D),
                    other=0.0,
                )
                do = tl.load(
                    dO + b * sdob + h * sdoh + (q0 + rows[:, None]) * sdom + dv[None, :] * sdod,
                    mask=in_rows[:, None] & (dv[None, :] < DV),
                    other=0.0,
                )
                lse = tl.load(Lse + bh * total_q + q0 + rows, mask=in_rows, other=0.0)
                delta = tl.load(Delta + bh * total_q + q0 + rows, mask=in_rows, other=0.0)
                p, t = _probabilities(
                    q,
                    kt,
                    rows,
                    cols,
                    lse,
                    Bias + b * sbb + h * sbh,
                    sbm,
                    sbn,
                    Mask + b * smb + h * smh,
                    smm,
                    smn,
                    mask_mixed,
                    slope,
                    Lq,
                    kbeg,
                    kend,
                    scale,
                    softcap,
                    left,
                    right,
                    offset,
                    HAS_BIAS,
                    HAS_MASK,
                    HAS_ALIBI,
                    HAS_SOFTCAP,
                )
                dp = tl.dot(do, vt, input_precision="ieee")
                p_dropped = p
                if HAS_DROPOUT:
                    keep = _dropout_keep(Seed, bh, q0 + rows, k0 + cols, total_q, total_k, dropout_p)
                    p_dropped = tl.where(keep, p * dropout_scale, 0.0)
                    dp = tl.where(keep, dp * dropout_scale, 0.0)
                dvacc += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision="ieee")
                ds, dqk = _score_grad(p, dp, delta, t, HAS_SOFTCAP)
                if BIAS_GRAD:
                    tl.store(
                        dBias + bh * total_q * total_k + rows[:, None].to(tl.int64) * total_k + cols[None, :],
                        ds,
                        mask=in_rows[:, None] & (cols[None, :] < Lk),
                    )
                dk += tl.dot(tl.trans(dqk.to(q.dtype)), q, input_precision="ieee")
    # dK and dV are contiguous (B, Hkv, Lk, D / DV)
    in_cols = cols[:, None] < Lk
    tl.store(
        dK + (bhk * total_k + k0 + cols[:, None]) * D + d[None, :],
        (dk * scale).to(dK.dtype.element_ty),
        mask=in_cols & (d[None, :] < D),
    )
    tl.store(
        dV + (bhk * total_k + k0 + cols[:, None]) * DV + dv[None, :],
        dvacc.to(dV.dtype.element_ty),
        mask=in_cols & (dv[None, :] < DV),
    )


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    dO,
    Lse,
    Delta,
    Bias,
    Mask,
    MaskTiles,
    Slopes,
    Seed,
    KeyRange,
    Segments,
    Tiles,
    dQ,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    sbb,
    sbh,
    sbm,
    sbn,
    smb,
    smh,
    smm,
    smn,
    stb,
    sth,
    stq,
    stk,
    ssb,
    ssh,
    Hq,
    Lq,
    Lk,
    D,
    DV,
    GROUP,
    scale,
    softcap,
    left,
    right,
    offset,
    dropout_p,
    dropout_scale,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_KEY_RANGE: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1).to(tl.int64) // Hq
    h = tl.program_id(1).to(tl.int64) % Hq
    hk = h // GROUP
    total_q, total_k = Lq, Lk
    b, q0, k0, Lq, Lk, offset = _segment(Segments, seq, Lq, Lk, offset, HAS_SEGMENTS)
    if m0 >= Lq:  # a block past this sequence's queries (grids span the longest one)
        return
    bh = b * Hq + h
    rows = m0 + tl.arange(0, BLOCK_M)
    in_rows = rows < Lq
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + (q0 + rows[:, None]) * sqm + d[None, :] * sqd,
        mask=in_rows[:, None] & (d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        dO + b * sdob + h * sdoh + (q0 + rows[:, None]) * sdom + dv[None, :] * sdod,
        mask=in_rows[:, None] & (dv[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(Lse + bh * total_q + q0 + rows, mask=in_rows, other=0.0)
    delta = tl.load(Delta + bh * total_q + q0 + rows, mask=in_rows, other=0.0)
    K += b * skb + hk * skh + k0 * skn
    V += b * svb + hk * svh + k0 * svn
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + seq * ssb + h * ssh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kbeg, kend = _keys_of(KeyRange, b, Lk, HAS_KEY_RANGE)
    lo, hi = _key_range(m0, BLOCK_M, BLOCK_N, Lk, left, right, offset)
    lo, hi = tl.maximum(lo, (kbeg // BLOCK_N) * BLOCK_N), tl.minimum(hi, kend)
    for n0 in range(lo, hi, BLOCK_N):
        visit, mask_mixed = _mask_tile(
            MaskTiles + b * stb + h * sth, stq, stk, m0, n0, Lq, Lk, BLOCK_M, BLOCK_N, HAS_MASK
        )
        if visit:  # a tile the mask keeps nothing of is skipped
            _count_tile(Tiles, 2, COUNT_TILES)
            cols = n0 + tl.arange(0, BLOCK_N)
            in_cols = cols < Lk
            kt = tl.load(
                K + cols[None, :] * skn + d[:, None] * skd, mask=in_cols[None, :] & (d[:, None] < D), other=0.0
            )
            vt = tl.load(
                V + cols[None, :] * svn + dv[:, None] * svd, mask=in_cols[None, :] & (dv[:, None] < DV), other=0.0
            )
            p, t = _probabilities(
                q,
                kt,
                rows,
                cols,
                lse,
                Bias + b * sbb + h * sbh,
                sbm,
                sbn,
                Mask + b * smb + h * smh,
                smm,
                smn,
                mask_mixed,
                slope,
                Lq,
                kbeg,
                kend,
                scale,
                softcap,
                left,
                right,
                offset,
                HAS_BIAS,
                HAS_MASK,
                HAS_ALIBI,
                HAS_SOFTCAP,
            )
            dp = tl.dot(do, vt, input_precision="ieee")
            if HAS_DROPOUT:
                keep = _dropout_keep(Seed, bh, q0 + rows, k0 + cols, total_q, total_k, dropout_p)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            _, dqk = _score_grad(p, dp, delta, t, HAS_SOFTCAP)
            dq += tl.dot(dqk.to(kt.dtype), tl.trans(kt), input_precision="ieee")
    tl.store(
        dQ + (bh * total_q + q0 + rows[:, None]) * D + d[None, :],
        (dq * scale).to(dQ.dtype.element_ty),
        mask=in_rows[:, None] & (d[None, :] < D),
    )


# ------------------------------------------------------------------------------------------------
# Operators


def _block(n):
    return max(16, triton.next_power_of_2(n))


def _value_block(dv, dtype):
    """Value head-dim block. fp16/bf16 use at least 64: at 32 the P @ V product lowers on sm_90 to a
    16x32x16 wgmma fed by a layout conversion from the 16x64x16 accumulator of q @ k^T, the one pattern
    in the H200 run that gave a wrong forward (D = 40, Dv = 24, 128 x 64 tiles); fp32 (FMA dots) and the
    interpreter are unaffected. tests/triton/test_triton_attention.py checks the lowering here and, on a GPU,
    every forward config at that shape."""
    return max(64 if dtype in (torch.float16, torch.bfloat16) else 16, triton.next_power_of_2(dv))


def _grid_strides(t, grid, placeholder):
    """t (broadcastable to the (B, Hq, Lq, Lk) grid) and its 4 strides as a grid view (0 where
    broadcast); (placeholder, zeros) when t is None."""
    if t is None:
        return placeholder, (0, 0, 0, 0)
    t = t.expand(grid)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t, t.stride()


def _mask_tiles(mask, grid, placeholder):
    """The mask's tile table: per 16 x 16 granule of its own (unbroadcast) extent, 0 if nothing is kept, 1
    if mixed, 2 if everything is kept, as a uint8 view of the (B, Hq, Lq / 16, Lk / 16) grid and its
    strides (0 where the mask broadcasts: a mask shared by batches or heads is analysed once)."""
    if mask is None:
        return placeholder, (0, 0, 0, 0)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    g = int(MASK_GRANULE)
    pad = [0, (-m.shape[3]) % g if m.shape[3] > 1 else 0, 0, (-m.shape[2]) % g if m.shape[2] > 1 else 0]
    blocks = lambda t: t.view(  # noqa: E731
        t.shape[0], t.shape[1], max(t.shape[2] // g, 1), min(t.shape[2], g), max(t.shape[3] // g, 1), min(t.shape[3], g)
    )
    kept = m.to(torch.uint8)
    some = blocks(torch.nn.functional.pad(kept, pad, value=0)).amax((3, 5))
    every = blocks(torch.nn.functional.pad(kept, pad, value=1)).amin((3, 5))
    codes = (some + every).expand(grid[0], grid[1], -(-grid[2] // g), -(-grid[3] // g))
    return codes, codes.stride()


def _slopes(alibi_slopes, batch, q_heads, placeholder):
    """ALiBi slopes as a float32 (B, Hq) view and its strides."""
    if alibi_slopes is None:
        return placeholder, (0, 0)
    s = alibi_slopes.to(torch.float32)
    s = (s.view(1, q_heads) if s.dim() == 1 else s).expand(batch, q_heads)
    return s, s.stride()


def _check(q, k, v, what):
    if q.dtype not in DTYPES:
        raise TypeError(
            f"bmkernels attention backend 'triton': q must be float16, bfloat16 or float32; got "
            f"{q.dtype} (float64 runs on backend='cpu' or 'reference')"
        )
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        raise TypeError(
            "bmkernels attention backend 'triton': the Triton interpreter (CPU tensors) cannot compute in "
            "bfloat16 (it returns garbage); bfloat16 runs on CUDA tensors"
        )
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"bmkernels attention backend 'triton': head dims must be <= {MAX_HEAD_DIM}; got q/k "
            f"{q.shape[-1]}, v {v.shape[-1]} ({what})"
        )


def _check_segments(segments, q, k, bias, mask, key_range):
    """The C++ operator's checks of packed sequences (csrc/cpu/attention.cpp check_segments)."""
    if segments is None:
        return
    if segments.dtype != torch.int64 or segments.dim() != 2 or segments.shape[0] < 1 or segments.shape[1] != 2:
        raise ValueError(
            f"bmkernels attention: segments must be int64 of shape (S + 1, 2); got {segments.dtype} "
            f"{tuple(segments.shape)}"
        )
    if q.shape[0] != 1:
        raise ValueError(f"bmkernels attention: packed sequences (segments) need batch 1; got q of batch {q.shape[0]}")
    if bias is not None or mask is not None or key_range is not None:
        raise ValueError("bmkernels attention: segments do not combine with bias, mask or key_range")
    c = segments.cpu()
    if c[0].tolist() != [0, 0] or c[-1].tolist() != [q.shape[2], k.shape[2]] or bool((c[1:] < c[:-1]).any()):
        raise ValueError(
            f"bmkernels attention: segments must be non-decreasing from (0, 0) to (Lq, Lk) = "
            f"({q.shape[2]}, {k.shape[2]}); got {c.tolist()}"
        )


def _problems(batch, q_len, k_len, segments):
    """(independent problems, longest query run, longest key run): batches, or packed sequences (the
    grid spans the longest; programs past a shorter sequence's end return at once)."""
    if segments is None:
        return batch, q_len, k_len
    lengths = (segments[1:] - segments[:-1]).amax(0).tolist() if segments.shape[0] > 1 else [0, 0]
    return segments.shape[0] - 1, max(lengths[0], 1), max(lengths[1], 1)


_tile_counter = None


@contextlib.contextmanager
def counting_tiles(device="cpu"):
    """Within the block, the kernels count the tiles they visit into the yielded int32 tensor
    [forward, dK/dV, dQ] on `device` (q's device; for tests of block skipping)."""
    global _tile_counter
    saved, _tile_counter = _tile_counter, None
    counter = torch.zeros(3, dtype=torch.int32, device=device)
    try:
        _tile_counter = counter
        yield counter
    finally:
        _tile_counter = saved


def _common_args(
    q,
    k,
    v,
    bias,
    mask,
    alibi_slopes,
    rng_seed,
    scale,
    softcap,
    window_left,
    window_right,
    diag_offset,
    dropout_p,
    key_range,
    segments,
):
    """(tensor args, stride args, scalar args, constexpr flags) shared by the three kernels."""
    batch, q_heads, q_len, _ = q.shape
    grid = (batch, q_heads, q_len, k.shape[2])
    bias_t, bias_strides = _grid_strides(bias, grid, q)
    mask_t, mask_strides = _grid_strides(mask, grid, q)
    tiles_t, tiles_strides = _mask_tiles(mask, grid, q)
    problems = batch if segments is None else segments.shape[0] - 1  # ALiBi slopes per batch or sequence
    slopes_t, slopes_strides = _slopes(alibi_slopes, problems, q_heads, q)
    seed = rng_seed.to(q.device) if dropout_p > 0 else q
    key_range_t = key_range.contiguous() if key_range is not None else q
    segments_t = segments.contiguous() if segments is not None else q
    tiles = _tile_counter if _tile_counter is not None else q
    tensors = (bias_t, mask_t, tiles_t, slopes_t, seed, key_range_t, segments_t, tiles)
    strides = (*bias_strides, *mask_strides, *tiles_strides, *slopes_strides)
    scalars = (
        float(scale),
        float(softcap),
        int(window_left),
        int(window_right),
        int(diag_offset),
        float(dropout_p),
        1.0 / (1.0 - dropout_p),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_MASK": mask is not None,
        "HAS_ALIBI": alibi_slopes is not None,
        "HAS_SOFTCAP": softcap > 0,
        "HAS_DROPOUT": dropout_p > 0,
        "HAS_KEY_RANGE": key_range is not None,
        "HAS_SEGMENTS": segments is not None,
        "COUNT_TILES": _tile_counter is not None,
        "BLOCK_D": _block(q.shape[3]),
        "BLOCK_DV": _value_block(v.shape[3], v.dtype),
    }
    return tensors, strides, scalars, flags


@triton_op("bmkernels::attention_triton_fwd", mutates_args={})
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    rng_seed: torch.Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    key_range: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.attention_fwd: (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32)."""
    if sinks is not None:
        raise RuntimeError("bmkernels attention (Triton kernel): sinks are not supported on the Triton kernel")
    _check(q, k, v, "attention_fwd")
    _check_segments(segments, q, k, bias, mask, key_range)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    # contiguous: unlike the C++ op, a triton_op cannot carry the tag that keeps inductor from changing
    # input strides, so its output layout must not depend on them
    out = q.new_empty(batch, q_heads, q_len, v_dim)
    lse = q.new_empty(batch, q_heads, q_len, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    tensors, strides, scalars, flags = _common_args(
        q,
        k,
        v,
        bias,
        mask,
        alibi_slopes,
        rng_seed,
        scale,
        softcap,
        window_left,
        window_right,
        diag_offset,
        dropout_p,
        key_range,
        segments,
    )
    problems, longest_q, _ = _problems(batch, q_len, k_len, segments)
    grid = lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), problems * q_heads)
    wrap_triton(_fwd_kernel)[grid](
        q,
        k,
        v,
        *tensors,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *strides,
        *out.stride(),
        q_heads,
        q_len,
        k_len,
        head_dim,
        v_dim,
        q_heads // kv_heads,
        *scalars,
        **flags,
    )
    return out, lse


@triton_op("bmkernels::attention_triton_bwd", mutates_args={})
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    rng_seed: torch.Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    diag_offset: int,
    dropout_p: float,
    bias_grad: bool,
    key_range: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of torch.ops.bmkernels.attention_bwd: (dq, dk, dv, dbias); dbias is the float32
    (B, Hq, Lq, Lk) score gradient when bias_grad, else empty."""
    _check(q, k, v, "attention_bwd")
    _check_segments(segments, q, k, bias, mask, key_range)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    # every element of dq, dk, dv is written by the kernels; dbias is zero outside the causal/window band
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dbias = q.new_zeros((batch, q_heads, q_len, k_len) if bias_grad else (0,), dtype=torch.float32)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    # delta_i = sum_j P_ij dP_ij - dlse_i: the row term of dS = P (dP - delta)
    delta = (grad_out.to(torch.float32) * out.to(torch.float32)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(torch.float32)
    delta = delta.contiguous()
    tensors, strides, scalars, flags = _common_args(
        q,
        k,
        v,
        bias,
        mask,
        alibi_slopes,
        rng_seed,
        scale,
        softcap,
        window_left,
        window_right,
        diag_offset,
        dropout_p,
        key_range,
        segments,
    )
    group = q_heads // kv_heads
    lse = lse.contiguous()
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *strides)
    problems, longest_q, longest_k = _problems(batch, q_len, k_len, segments)
    grid_kv = lambda meta: (triton.cdiv(longest_k, meta["BLOCK_N"]), problems * kv_heads)
    wrap_triton(_bwd_dkdv_kernel)[grid_kv](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        *tensors,
        dk,
        dv,
        dbias,
        *common,
        q_heads,
        kv_heads,
        q_len,
        k_len,
        head_dim,
        v_dim,
        group,
        *scalars,
        BIAS_GRAD=bias_grad,
        **flags,
    )
    grid_q = lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), problems * q_heads)
    wrap_triton(_bwd_dq_kernel)[grid_q](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        *tensors,
        dq,
        *common,
        q_heads,
        q_len,
        k_len,
        head_dim,
        v_dim,
        group,
        *scalars,
        **flags,
    )
    return dq, dk, dv, dbias


torch.library.register_autograd(
    "bmkernels::attention_triton_fwd",
    ops_attention.backward_with(torch.ops.bmkernels.attention_triton_bwd),
    setup_context=ops_attention._setup_context,
)


def _fake_fwd_contiguous(*args, **kwargs):
    out, lse = ops_attention._fake_fwd(*args, **kwargs)
    return out.contiguous(), lse


if INTERPRETED:
    # Fake-tensor tracing of a triton_op runs its body, and the interpreter cannot run a kernel on fake
    # tensors: under the interpreter the ops get the C++ ops' fake kernels (same outputs), so that
    # torch.compile can trace them (tests/triton/test_triton_attention.py). Compiled triton needs none.
    attention_fwd.register_fake(_fake_fwd_contiguous)
    attention_bwd.register_fake(ops_attention._fake_bwd)
