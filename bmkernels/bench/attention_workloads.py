"""Attention as real workloads use it: decoding over a long KV cache (flash_attn_with_kvcache), packed
variable-length batches (flash_attn_varlen_func) against the same batch padded, and the score features
(softcap, masks, padding, bias, ALiBi, windows) at L = 2048 against the plain call and flex_attention.

- decode: GQA 32 query / 8 kv heads, D = 128, one new query per sequence, B 1 and 4, caches of 4k-16k
  keys, fp32 and bf16; vs SDPA on the cache viewed as (B, H, L, D). GB/s counts the K and V bytes read
  (the floor any kernel must read), and % ceiling its share of the DRAM read rate measured at the start.
- varlen: 8 sequences of 64..1024 tokens (H 8, D 64, fp32), forward and forward+backward, vs bmkernels
  and SDPA on the batch padded to the longest sequence (what a user without varlen runs).
- features: B1 H8 L2048 D64 fp32 forward, each feature vs the plain call of the same shape, SDPA where it
  has the feature, and torch.compile(flex_attention) for the window, causal softcap and document mask.
"""

import torch
import torch.nn.functional as F

from bmkernels.bench import BMK, Case, fwd_bwd

FOOTNOTE = (
    "GB/s (decode): K + V bytes of the cache / time; % ceiling: that over the DRAM read rate measured at the "
    "start of the run. GFLOP/s (varlen, features): 4*L*L*D per head for the real (unpadded) tokens, halved "
    "for causal."
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _decode_case(batch, length, dtype_name):
    from bmkernels.flash_attn import flash_attn_with_kvcache

    q_heads, kv_heads, dim = 32, 8, 128
    dtype = DTYPES[dtype_name]

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        k = torch.randn(batch, length, kv_heads, dim, generator=g).to(dtype)
        v = torch.randn(batch, length, kv_heads, dim, generator=g).to(dtype)
        q = torch.randn(batch, 1, q_heads, dim, generator=g).to(dtype)
        return {"q": q, "k": k, "v": v, "lens": torch.full((batch,), length, dtype=torch.int32)}

    contenders = {
        BMK: lambda i: flash_attn_with_kvcache(i["q"], i["k"], i["v"], cache_seqlens=i["lens"], causal=True),
        "sdpa": lambda i: F.scaled_dot_product_attention(
            i["q"].transpose(1, 2), i["k"].transpose(1, 2), i["v"].transpose(1, 2), enable_gqa=True
        ),
    }
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(
        op="attention_workloads",
        name=f"decode {dtype_name} B{batch} Lk{length // 1024}k GQA32/8 D128",
        make_inputs=make_inputs,
        contenders=contenders,
        flops=4.0 * batch * q_heads * length * dim,
        bytes=2.0 * batch * length * kv_heads * dim * itemsize,
        params={"kind": "decode", "B": batch, "Lk": length, "dtype": dtype_name, "Hq": q_heads, "Hkv": kv_heads},
    )


VARLEN_LENGTHS = (1024, 64, 512, 200, 777, 96, 1000, 300)


def _varlen_case(backward, lengths=VARLEN_LENGTHS, heads=8, dim=64):
    from bmkernels.flash_attn import flash_attn_varlen_func
    from bmkernels.ops.attention import attention as bmk_attention

    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        packed = [torch.randn(total, heads, dim, generator=g) for _ in range(3)]
        padded = [torch.zeros(len(lengths), longest, heads, dim) for _ in range(3)]
        for s, n in enumerate(lengths):
            for p, x in zip(padded, packed, strict=True):
                p[s, :n] = x[cu[s] : cu[s] + n]
        ranges = torch.tensor([[0, n] for n in lengths], dtype=torch.int64)
        pad_mask = torch.arange(longest)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
        if backward:  # before the views below, so that they are part of the graph
            for t in packed + padded:
                t.requires_grad_(True)
        inp = {"packed": packed, "padded": [p.transpose(1, 2) for p in padded], "ranges": ranges}
        inp["sdpa_mask"] = ~pad_mask[:, None, None, :]
        if backward:
            inp["grad_inputs"] = packed
            inp["grad_out"] = torch.randn(total, heads, dim, generator=g)
        return inp

    def grad_padded(forward):  # the padded contenders differentiate their own (padded) inputs
        def run(inp):
            out = forward(inp)
            torch.autograd.grad(out, inp["padded"], torch.ones_like(out))

        return run

    forward = {
        BMK: lambda i: flash_attn_varlen_func(*i["packed"], cu, cu, longest, longest, causal=True),
        "bmk padded": lambda i: bmk_attention(*i["padded"], causal=True, key_range=i["ranges"]),
        "sdpa padded": lambda i: F.scaled_dot_product_attention(
            *i["padded"], attn_mask=i["sdpa_mask"] & torch.ones(longest, longest, dtype=torch.bool).tril()
        ),
    }
    contenders = dict(forward)
    if backward:
        contenders = {BMK: fwd_bwd(forward[BMK])} | {n: grad_padded(f) for n, f in forward.items() if n != BMK}
    pass_name = "fwd+bwd" if backward else "fwd"
    flops = sum(4.0 * heads * n * n * dim / 2 for n in lengths) * (3.5 if backward else 1)
    return Case(
        op="attention_workloads",
        name=f"varlen {pass_name} fp32 causal {len(lengths)} seqs {total} tokens (longest {longest}) H{heads} D{dim}",
        make_inputs=make_inputs,
        contenders=contenders,
        flops=flops,
        backward=backward,
        params={"kind": "varlen", "pass": pass_name, "lengths": list(lengths)},
    )


def _feature_case(feature, length=2048, heads=8, dim=64):
    from bmkernels.ops.attention import attention as bmk_attention

    shape = (1, heads, length, dim)
    docs = torch.arange(length) * 4 // length  # 4 documents of L / 4 tokens

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        inp = {"q": q, "k": k, "v": v}
        inp["bias"] = torch.randn(1, heads, length, length, generator=g) * 0.1
        inp["head_bias"] = inp["bias"][:, :1].clone()  # one (L, L) bias shared by every head
        inp["keep"] = torch.ones(length, length, dtype=torch.bool)
        inp["padding"] = torch.zeros(1, length, dtype=torch.bool)
        inp["padding"][:, length - length // 4 :] = True
        inp["docs"] = docs[:, None] == docs[None, :]
        inp["slopes"] = torch.linspace(0.01, 0.1, heads)
        return inp

    plain = lambda i: bmk_attention(i["q"], i["k"], i["v"])  # noqa: E731
    bmk = {
        "softcap": lambda i: bmk_attention(i["q"], i["k"], i["v"], softcap=30.0),
        "bool mask (all kept)": lambda i: bmk_attention(i["q"], i["k"], i["v"], mask=i["keep"]),
        "key padding": lambda i: bmk_attention(i["q"], i["k"], i["v"], key_padding_mask=i["padding"]),
        "float bias": lambda i: bmk_attention(i["q"], i["k"], i["v"], bias=i["bias"]),
        "float bias (1, 1, L, L)": lambda i: bmk_attention(i["q"], i["k"], i["v"], bias=i["head_bias"]),
        "alibi": lambda i: bmk_attention(i["q"], i["k"], i["v"], alibi_slopes=i["slopes"]),
        "sliding window 256": lambda i: bmk_attention(i["q"], i["k"], i["v"], causal=True, window=(256, 0)),
        "causal softcap 30": lambda i: bmk_attention(i["q"], i["k"], i["v"], causal=True, softcap=30.0),
        "4-document mask": lambda i: bmk_attention(i["q"], i["k"], i["v"], mask=i["docs"]),
    }[feature]
    contenders = {BMK: bmk, "bmk plain": plain}
    sdpa_mask = {
        "bool mask (all kept)": "keep",
        "float bias": "bias",
        "float bias (1, 1, L, L)": "head_bias",
        "4-document mask": "docs",
    }
    if feature in sdpa_mask:
        contenders["sdpa"] = lambda i: F.scaled_dot_product_attention(
            i["q"], i["k"], i["v"], attn_mask=i[sdpa_mask[feature]]
        )
    skipped = {}
    flex = _flex_contender(feature, length, docs)
    if flex is not None:
        contenders["flex compiled"] = flex
    flops = 4.0 * heads * length * length * dim / (2 if "causal" in feature or "window" in feature else 1)
    return Case(
        op="attention_workloads",
        name=f"feature {feature} fwd fp32 1x{heads}x{length}x{dim}",
        make_inputs=make_inputs,
        contenders=contenders,
        flops=flops,
        skipped=skipped,
        params={"kind": "feature", "feature": feature, "L": length},
    )


def _flex_contender(feature, length, docs):
    """torch.compile(flex_attention) with the feature as score_mod / block mask, or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    if feature == "sliding window 256":
        mask_mod = lambda b, h, q, kv: (q >= kv) & (q - kv <= 256)  # noqa: E731
        score_mod = None
    elif feature == "causal softcap 30":
        mask_mod = lambda b, h, q, kv: q >= kv  # noqa: E731
        score_mod = lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0)  # noqa: E731
    elif feature == "4-document mask":
        mask_mod = lambda b, h, q, kv: docs[q] == docs[kv]  # noqa: E731
        score_mod = None
    else:
        return None
    state = {}

    def run(i):
        if "mask" not in state:
            state["mask"] = create_block_mask(mask_mod, 1, 1, length, length, device="cpu")
        return compiled(i["q"], i["k"], i["v"], score_mod=score_mod, block_mask=state["mask"])

    return run


FEATURES = (
    "softcap",
    "bool mask (all kept)",
    "key padding",
    "float bias",
    "float bias (1, 1, L, L)",
    "alibi",
    "sliding window 256",
    "causal softcap 30",
    "4-document mask",
)


def cases(preset="default"):
    """quick: one small decode and varlen case. default: decode fp32/bf16 at B1 Lk 8k and the varlen
    forward. full: decode B 1/4 x Lk 4k/8k/16k x fp32/bf16, varlen fwd and fwd+bwd, every feature."""
    if preset == "quick":
        return [_decode_case(1, 1024, "fp32"), _varlen_case(False, lengths=(64, 1, 100, 30), heads=2, dim=16)]
    if preset in ("default", "small"):
        return [_decode_case(1, 8192, "fp32"), _decode_case(1, 8192, "bf16"), _varlen_case(False)]
    out = [_decode_case(b, n, d) for d in DTYPES for b in (1, 4) for n in (4096, 8192, 16384)]
    out += [_varlen_case(False), _varlen_case(True)]
    out += [_feature_case(f) for f in FEATURES]
    return out
