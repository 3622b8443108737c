"""timm: the drop-in for timm.layers.Attention (ViT, DeiT, BEiT-free ViT variants, ...).

swap_modules swaps a module whose class is exactly timm.layers.Attention: its class becomes
bmkernels' subclass, so the module keeps its parameters (qkv, q_norm, k_norm, norm, gate, proj),
state_dict keys, hooks and train/eval mode, and only the attention core changes -- timm's own
forward with F.scaled_dot_product_attention replaced by bmkernels.scaled_dot_product_attention,
whichever path (fused_attn or not) timm would have taken. Subclasses of timm's Attention (their
forward may differ) and timm's other attention classes are left and reported.
"""

from __future__ import annotations

import timm.layers
import torch

from bmkernels import _backend
from bmkernels.ops.attention import scaled_dot_product_attention

# What the forward below uses of timm's Attention; a timm version without one of them is left alone.
__all__ = ["Attention", "is_attention"]

_ATTRIBUTES = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim", "attn_dim")


class Attention(timm.layers.Attention):
    """timm.layers.Attention with its attention core in bmkernels (see the module docstring)."""

    family = "attention"
    torch_class = timm.layers.Attention

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def swap_blocker(cls, module: torch.nn.Module) -> str | None:
        """Why `module` (a timm.layers.Attention) cannot be swapped, or None."""
        if type(module) is not timm.layers.Attention:
            return (
                f"{type(module).__name__} subclasses timm.layers.Attention; its forward may differ, so it is kept "
                "(run it inside bmkernels.sdpa_mode() if it calls F.scaled_dot_product_attention)"
            )
        missing = [name for name in _ATTRIBUTES if not hasattr(module, name)]
        if missing:
            return f"this timm version's Attention lacks {', '.join(missing)}; use bmkernels.sdpa_mode() instead"
        try:
            _backend.choose("attention", module.qkv.weight.device)
        except RuntimeError as e:
            return str(e)
        return None

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> Attention:
        """The same module, its class switched to this drop-in (parameters and state_dict untouched)."""
        module.__class__ = cls
        return module

    def to_torch(self) -> torch.nn.Module:
        """The same module, back to timm.layers.Attention."""
        self.__class__ = timm.layers.Attention
        return self


def is_attention(module: torch.nn.Module) -> bool:
    """A timm attention module of any class (for the swap report)."""
    return (
        isinstance(module, torch.nn.Module)
        and type(module).__module__.startswith("timm.")
        and ("Attention" in type(module).__name__)
    )
