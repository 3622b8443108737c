"""Hugging Face transformers: the "bmkernels" attention implementation.

Importing this module registers it (register() is idempotent), with both of transformers' hooks:
AttentionInterface (the attention function) and AttentionMaskInterface (the mask function; without
one transformers builds no mask and padding would be ignored). Then

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="bmkernels")
    model.set_attn_implementation("bmkernels")      # or bmkernels.swap_modules(model)

How the masks reach the kernel. The mask function sees the mask pattern and the 2-D padding mask;
where the pattern is provably simple -- causal, bidirectional or causal sliding window, queries
ending at the last key (no cache, or a dynamic cache), and the padding leaving one run of real
tokens per row (right or left padding, or none) -- it returns no dense mask but the per-batch key
ranges (B, 2) int64 (or None without padding), and the attention function runs causal (bottom-right
aligned, as transformers' flash path), the window (sliding_window W as window=(W - 1, 0)), softcap,
scaling, GQA, dropout, position_bias as bias and gpt-oss's attention sinks (s_aux) directly in the
kernel. Anything else (packed sequences, overlays such as image tokens or chunked attention,
static-cache offsets, padding with holes) gets transformers' own dense boolean mask (B, 1, Lq, Lk) and stays exact.
"""

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import masking_utils

from bmkernels.ops import attention as ops_attention

NAME = "bmkernels"
__all__ = ["attention_forward", "is_model", "mask_function", "register"]


def _is_sliding_window_causal(mask_function):
    """True for transformers' sliding_window_causal_mask_function(W) (and_masks(overlay(W), causal))."""
    cells = getattr(mask_function, "__closure__", None) or ()
    if getattr(mask_function, "__name__", "") != "and_mask" or len(cells) != 1:
        return False
    parts = cells[0].cell_contents
    return (
        isinstance(parts, tuple)
        and len(parts) == 2
        and getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"
        and parts[1] is masking_utils.causal_mask_function
    )


def _is_simple(mask_function):
    return (
        mask_function is masking_utils.causal_mask_function
        or mask_function is masking_utils.bidirectional_mask_function
        or _is_sliding_window_causal(mask_function)
    )


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' AttentionMaskInterface entry: None (no padding), key ranges (B, 2) int64, a
    2-D keep-mask (B, Lk) for padding with holes, or the dense (B, 1, Lq, Lk) keep-mask."""
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if _is_simple(mask_function) and aligned:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2 and attention_mask.shape[1] >= kv_offset + kv_length:
            keep = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
            if torch.compiler.is_compiling():
                return keep  # a traced graph cannot branch on the values; the kernel reads it as padding
            if bool(keep.all()):
                return None
            key_range = ops_attention.key_range_of(keep)
            return keep if key_range is None else key_range
    for skip in ("allow_is_causal_skip", "allow_is_bidirectional_skip", "allow_torch_fix"):
        kwargs.pop(skip, None)
    return masking_utils.sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' AttentionInterface entry: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D/Dv),
    attention_mask from mask_function above; s_aux (gpt-oss's attention sinks, (Hq,)) as sinks, joining
    every row's softmax denominator whatever the mask, as transformers' eager gpt-oss attention does.
    Returns (output (B, Lq, Hq, Dv), None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    args = {"key_range": None, "key_padding_mask": None, "mask": None, "bias": None, "window": None}
    dense = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
    if dense:  # the pattern (causal, window, overlays) is inside the mask
        causal = False
        args["mask" if attention_mask.dtype == torch.bool else "bias"] = attention_mask.to(
            torch.bool if attention_mask.dtype == torch.bool else query.dtype
        )
    elif attention_mask is not None:
        if attention_mask.dtype == torch.int64:
            args["key_range"] = attention_mask
        else:
            args["key_padding_mask"] = ~attention_mask.to(torch.bool)
    if sliding_window is not None and causal and not dense:
        args["window"] = (int(sliding_window) - 1, 0)
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        args["bias"] = bias if args["bias"] is None else args["bias"] + bias
    out = ops_attention.attention(
        query,
        key,
        value,
        causal=bool(causal),
        causal_alignment="bottom_right",
        softcap=softcap or None,
        dropout_p=float(dropout or 0.0),
        scale=scaling,
        sinks=kwargs.get("s_aux"),
        **args,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers "bmkernels" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    transformers.AttentionInterface.register(NAME, attention_forward)
    transformers.AttentionMaskInterface.register(NAME, mask_function)


def is_model(model: object) -> bool:
    """Whether `model` is a transformers PreTrainedModel (swap_modules switches its attention implementation)."""
    return isinstance(model, transformers.PreTrainedModel)


register()
