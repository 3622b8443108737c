"""Attention benchmark cases: bmkernels.attention vs SDPA and eager math attention."""

import math

import torch
import torch.nn.functional as F

from bmkernels.bench import BMK, Case, fwd_bwd

FOOTNOTE = (
    "GFLOP/s: attention 4*B*H*L*L*D forward, halved for causal, x3.5 for fwd+bwd. saved MiB includes "
    "q, k, v for every contender."
)

# Eager math attention is skipped where its L x L buffers would exceed this (estimated peak).
EAGER_MEMORY_LIMIT_BYTES = 3 * 2**30

ATTENTION_SHAPES = ((4, 8, 512, 64), (1, 8, 2048, 64), (1, 16, 4096, 128))
QUICK_ATTENTION_SHAPES = ((2, 4, 128, 32), (1, 2, 256, 64))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention_flops(batch, heads, q_len, k_len, head_dim, causal=False, backward=False):
    """4*B*H*Lq*Lk*D forward, halved for causal; backward is 2.5x forward (fwd+bwd = 3.5x)."""
    fwd = 4.0 * batch * heads * q_len * k_len * head_dim / (2 if causal else 1)
    return fwd * 3.5 if backward else fwd


def eager_attention(q, k, v, causal_mask=None, scale=None):
    """Eager math attention, as a user would write it: q k^T * scale -> mask -> softmax -> @ v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal_mask is not None:
        s = s.masked_fill(causal_mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def eager_attention_peak_bytes(batch, heads, length, itemsize, backward):
    """Rough peak of eager attention's L x L buffers: scores and probabilities in forward; the saved
    probabilities, their gradient and the softmax gradient on top in backward."""
    buf = batch * heads * length * length * itemsize
    return buf * (4 if backward else 2)


def _attention_case(shape, dtype_name, causal, backward, seed=0):
    from bmkernels.ops.attention import attention as bmk_attention

    batch, heads, length, head_dim = shape
    dtype = DTYPES[dtype_name]

    def make_inputs():
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        inp = {"q": q, "k": k, "v": v, "mask": torch.ones(length, length, dtype=torch.bool).triu(1) if causal else None}
        if backward:
            for t in (q, k, v):
                t.requires_grad_(True)
            inp["grad_inputs"] = (q, k, v)
            inp["grad_out"] = torch.randn(shape, generator=g).to(dtype)
        return inp

    forward = {
        BMK: lambda i: bmk_attention(i["q"], i["k"], i["v"], causal=causal),
        "sdpa": lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=causal),
        "eager": lambda i: eager_attention(i["q"], i["k"], i["v"], i["mask"]),
    }
    skipped = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    peak = eager_attention_peak_bytes(batch, heads, length, itemsize, backward)
    if peak > EAGER_MEMORY_LIMIT_BYTES:
        skipped["eager"] = (
            f"eager math skipped: its L x L buffers need ~{peak / 2**30:.0f} GiB "
            f"(limit {EAGER_MEMORY_LIMIT_BYTES / 2**30:.0f} GiB)"
        )
    pass_name = "fwd+bwd" if backward else "fwd"
    name = f"{pass_name} {dtype_name} {'causal' if causal else 'full'} {'x'.join(map(str, shape))}"
    return Case(
        op="attention",
        name=name,
        make_inputs=make_inputs,
        contenders={n: (fwd_bwd(f) if backward else f) for n, f in forward.items()},
        forward=forward if backward else {},
        flops=attention_flops(batch, heads, length, length, head_dim, causal, backward),
        backward=backward,
        skipped=skipped,
        params={
            "B": batch,
            "H": heads,
            "L": length,
            "D": head_dim,
            "dtype": dtype_name,
            "causal": causal,
            "pass": pass_name,
        },
    )


def _in_preset(preset, shape, dtype_name, backward):
    length = shape[2]
    if preset == "full":
        return True
    if preset in ("default", "small"):
        if preset == "small" and length > 512:
            return False
        if dtype_name == "fp32":
            return not backward or length <= 2048
        return not backward and length <= 512
    raise ValueError(f"unknown preset {preset!r}")


def cases(preset="default"):
    """Attention cases of a preset.

    quick:   tiny shapes (2,4,128,32) and (1,2,256,64); a smoke run of a few seconds.
    small:   the default preset at L=512 only (the default of the pytest-benchmark suite).
    default: fp32 forward at all three shapes, causal and not; fp32 forward+backward at
             (4,8,512,64) and (1,8,2048,64), causal and not; bf16 forward at (4,8,512,64).
    full:    every shape x {fp32, bf16} x {full, causal} x {fwd, fwd+bwd}.
    """
    out = []
    if preset == "quick":
        small, other = QUICK_ATTENTION_SHAPES
        for backward in (False, True):
            for causal in (False, True):
                out.append(_attention_case(small, "fp32", causal, backward))
        out.append(_attention_case(small, "bf16", False, False))
        out.append(_attention_case(other, "fp32", True, False))
        return out
    for backward in (False, True):
        for dtype_name in DTYPES:
            for shape in ATTENTION_SHAPES:
                if not _in_preset(preset, shape, dtype_name, backward):
                    continue
                for causal in (False, True):
                    out.append(_attention_case(shape, dtype_name, causal, backward))
    return out
