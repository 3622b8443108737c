"""bmkernels.nn.MultiheadAttention: torch.nn.MultiheadAttention with the fused bmkernels attention.

A subclass of torch.nn.MultiheadAttention: same constructor, forward, return values, defaults,
parameters and state_dict, so `load_state_dict` works both ways and `isinstance(m,
nn.MultiheadAttention)` stays true. Projections are the same F.linear calls as torch's; the
softmax(q k^T) v core runs in bmkernels.attention (memory O(L), no L x S buffer) with the masks
passed as a keep-mask, key padding and an additive bias.

Where torch's behaviour and the fused core differ:
- need_weights=True (torch's default): the weights are computed explicitly (softmax of the scaled
  scores, the only O(L x S) buffer) and returned with their gradient; the output still comes from
  the fused kernel. In training with dropout the returned weights must be the dropped-out ones that
  made the output, so that one case runs torch's math path (scores -> softmax -> dropout -> @ v).
- A query whose keys are all masked gets a zero output, as torch's SDPA path gives (torch's
  need_weights path gives NaN there); its returned weights are NaN, as torch's.
- Dropout (training, need_weights=False) draws the kernel's own Philox mask: reproducible under
  torch.manual_seed, but not the mask torch's dropout would draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmkernels import _backend
from bmkernels.nn._convert import rebuild
from bmkernels.ops.attention import attention


def _no_op_pre_hook(module, args):
    """Registered on every bmkernels MultiheadAttention: torch.nn.TransformerEncoderLayer takes its
    fused inference fast path (torch's own attention, bypassing this module) only when no module
    inside it has hooks, so this keeps a swapped layer running bmkernels in eval/no_grad too."""
    return None


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention running its attention in bmkernels (see the module docstring).

    Extra keyword-only argument: backend (None = auto, or "cpu", "cuda", "triton", "reference"),
    passed to bmkernels.attention."""

    family = "attention"
    torch_class = torch.nn.MultiheadAttention

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        _backend.requested(backend)
        self.backend = backend
        self.register_forward_pre_hook(_no_op_pre_hook)

    def _ctor_kwargs(self):
        return dict(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
        )

    @classmethod
    def swap_blocker(cls, module: torch.nn.Module) -> str | None:
        """Why `module` (a torch.nn.MultiheadAttention) cannot be swapped, or None."""
        if type(module) is not torch.nn.MultiheadAttention:
            return (
                f"{type(module).__name__} subclasses nn.MultiheadAttention; its forward may differ from "
                "torch's, so it is kept"
            )
        try:
            _backend.choose("attention", module.out_proj.weight.device)
        except RuntimeError as e:
            return str(e)
        return None

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, backend: str | None = None) -> MultiheadAttention:
        """A bmkernels MultiheadAttention sharing `module`'s parameters (the same Parameter objects,
        so optimizers keep working), device, dtype, train/eval mode and hooks."""
        return rebuild(module, cls, cls._ctor_kwargs(module), backend=backend)

    def to_torch(self) -> torch.nn.Module:
        """The torch.nn.MultiheadAttention twin, sharing this module's parameters."""
        return rebuild(self, torch.nn.MultiheadAttention, self._ctor_kwargs(), drop_hook=_no_op_pre_hook)

    def backend_in_use(self) -> str:
        """The backend bmkernels.attention picks for this module's parameters' device."""
        try:
            return _backend.choose("attention", self.out_proj.weight.device, self.backend)
        except RuntimeError as e:
            return f"unavailable ({e})"

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.in_proj_bias is None:
            s += ", bias=False"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.batch_first:
            s += ", batch_first=True"
        return s + f", backend={self.backend_in_use()}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(
                "bmkernels MultiheadAttention: nested tensors are not supported; pass padded tensors "
                "and a key_padding_mask"
            )
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        q, k, v = self._project(query, key, value, is_batched)
        batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
        if not is_batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        # as torch: the causal hint replaces attn_mask only when nothing else needs the explicit mask
        causal = is_causal and key_padding_mask is None and not need_weights
        keep, bias = _attn_mask_parts(None if causal else attn_mask, batch, self.num_heads, q_len, k_len, q.dtype)
        padding, padding_bias = _padding_mask_parts(key_padding_mask, batch, k_len, q.dtype)
        bias = padding_bias if bias is None else (bias if padding_bias is None else bias + padding_bias)

        if self.bias_k is not None:
            k = torch.cat(
                [k, self.bias_k.view(1, 1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)],
                dim=2,
            )
            v = torch.cat(
                [v, self.bias_v.view(1, 1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)],
                dim=2,
            )
            keep, bias, padding = _pad_key_column(keep, bias, padding)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, self.num_heads, 1, self.head_dim)], dim=2)
            keep, bias, padding = _pad_key_column(keep, bias, padding)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = _attention_weights(q, k, keep, bias, padding)
        if need_weights and dropout_p > 0:
            # torch's math path, so that the returned weights carry the dropout mask the output used
            weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
        else:
            out = attention(
                q,
                k,
                v,
                causal=causal,
                bias=bias,
                mask=keep,
                key_padding_mask=padding,
                dropout_p=dropout_p,
                backend=self.backend,
            )
        out = F.linear(
            out.transpose(1, 2).reshape(batch, q_len, self.embed_dim), self.out_proj.weight, self.out_proj.bias
        )
        if not is_batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        return out, weights

    def _project(self, query, key, value, is_batched):
        """The in-projections as (B, H, L, head_dim) views (no copy) of (B, L, E) results."""
        same_qkv, same_kv = query is key and key is value, key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"bmkernels MultiheadAttention: key's batch and sequence dims {tuple(key.shape)} do "
                f"not match value's {tuple(value.shape)}"
            )
        embed = self.embed_dim
        for name, t, features in (("query", query, embed), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != features:
                raise ValueError(
                    f"bmkernels MultiheadAttention: {name} must have {features} features (the last "
                    f"dim); got shape {tuple(t.shape)}"
                )
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim and same_qkv:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        elif self._qkv_same_embed_dim:
            w_q, w_kv = self.in_proj_weight.split([embed, 2 * embed])
            q = F.linear(query, w_q, bias_q)
            if same_kv:
                b_kv = None if self.in_proj_bias is None else self.in_proj_bias[embed:]
                k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
            else:
                w_k, w_v = w_kv.chunk(2)
                k, v = F.linear(key, w_k, bias_k), F.linear(value, w_v, bias_v)
        else:
            q = F.linear(query, self.q_proj_weight, bias_q)
            k = F.linear(key, self.k_proj_weight, bias_k)
            v = F.linear(value, self.v_proj_weight, bias_v)
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))


def _check_mask_dtype(name, mask):
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"bmkernels MultiheadAttention: only bool and floating types of {name} are supported; got {mask.dtype}"
        )


def _attn_mask_parts(attn_mask, batch, heads, q_len, k_len, dtype):
    """attn_mask (L, S) or (B * H, L, S); bool True = not allowed, float = added -> (keep, bias),
    each None or broadcastable to (B, H, L, S)."""
    if attn_mask is None:
        return None, None
    _check_mask_dtype("attn_mask", attn_mask)
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (q_len, k_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(q_len, k_len)}.")
    elif attn_mask.dim() == 3:
        if tuple(attn_mask.shape) != (batch * heads, q_len, k_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(batch * heads, q_len, k_len)}."
            )
        attn_mask = attn_mask.view(batch, heads, q_len, k_len)
    else:
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if attn_mask.dtype == torch.bool:
        return attn_mask.logical_not(), None
    return None, attn_mask.to(dtype)


def _padding_mask_parts(key_padding_mask, batch, k_len, dtype):
    """key_padding_mask (B, S); bool True = padding, float = added -> (padding (B, S), bias (B, 1, 1, S))."""
    if key_padding_mask is None:
        return None, None
    _check_mask_dtype("key_padding_mask", key_padding_mask)
    if tuple(key_padding_mask.shape) != (batch, k_len):
        raise RuntimeError(
            f"bmkernels MultiheadAttention: key_padding_mask must have shape (batch, source length) "
            f"= {(batch, k_len)}; got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask, None
    return None, key_padding_mask.to(dtype).view(batch, 1, 1, k_len)


def _pad_key_column(keep, bias, padding):
    """One more key (bias_k or the zero key): visible to every query, nothing added."""
    if keep is not None:
        keep = F.pad(keep, (0, 1), value=True)
    if bias is not None:
        bias = F.pad(bias, (0, 1))
    if padding is not None:
        padding = F.pad(padding, (0, 1), value=False)
    return keep, bias, padding


def _attention_weights(q, k, keep, bias, padding):
    """softmax(q k^T / sqrt(d) + bias) over visible keys, (B, H, L, S), differentiable."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    hidden = None if keep is None else keep.logical_not()
    if padding is not None:
        pad = padding[:, None, None, :]
        hidden = pad if hidden is None else hidden | pad
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(dim=-1)
