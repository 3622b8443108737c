"""Reference Transformers from one pre-LayerNorm block: a GPT-style language model (causal) and an
encoder classifier (bidirectional, mean-pooled). kernels="bmkernels" runs attention in
bmkernels.nn.MultiheadAttention, kernels="torch" in torch.nn.MultiheadAttention: the same
parameters, names and initialisation (for one seed), so state_dicts move between the two and A/B
runs start from identical weights."""

import math

import torch
from torch import nn

from bmkernels.nn import MultiheadAttention

ATTENTION_CLASSES = {"bmkernels": MultiheadAttention, "torch": nn.MultiheadAttention}
POSITIONS = ("sinusoidal", "learned")
INIT_STD = 0.02


def _attention_class(kernels):
    if kernels not in ATTENTION_CLASSES:
        raise ValueError(f"kernels must be one of {', '.join(ATTENTION_CLASSES)}; got {kernels!r}")
    return ATTENTION_CLASSES[kernels]


def sinusoidal_positions(length, d_model):
    """The (length, d_model) sin/cos position table of "Attention Is All You Need"."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table.float()


class Block(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)) (pre-LayerNorm, GELU MLP)."""

    def __init__(self, d_model, n_heads, mlp_ratio=4, dropout=0.0, kernels="bmkernels"):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _attention_class(kernels)(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, is_causal=False, key_padding_mask=None):
        h = self.ln1(x)
        h = self.attn(
            h, h, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.ln2(x)))


class _Backbone(nn.Module):
    """Token embedding + positions -> blocks -> final LayerNorm; the part the LM and the
    classifier share (same parameter names, so an LM checkpoint initialises a classifier)."""

    def __init__(self, vocab_size, max_len, d_model, n_heads, n_layers, mlp_ratio, dropout, positions, kernels):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.max_len, self.kernels, self.positions = max_len, kernels, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        if positions == "learned":
            self.pos = nn.Embedding(max_len, d_model)
        else:
            # at the token embeddings' scale: with amplitude 1 the positions drown the tokens, and
            # learning stalls near the unigram loss for a long while
            self.register_buffer("pos_table", INIT_STD * sinusoidal_positions(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout, kernels) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def init_weights(self):
        """GPT-2 style: N(0, INIT_STD) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=INIT_STD)
                nn.init.zeros_(module.in_proj_bias)

    def forward(self, idx, causal, key_padding_mask=None):
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, length) token ids; got shape {tuple(idx.shape)}")
        length = idx.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        pos = self.pos.weight[:length] if self.positions == "learned" else self.pos_table[:length]
        x = self.drop(self.embed(idx) + pos.to(self.embed.weight.dtype))
        # torch's MultiheadAttention needs the explicit mask next to its is_causal hint
        mask = torch.ones(length, length, dtype=torch.bool, device=idx.device).triu(1) if causal else None
        for block in self.blocks:
            x = block(x, attn_mask=mask, is_causal=causal, key_padding_mask=key_padding_mask)
        return self.ln_f(x)


class TransformerLM(nn.Module):
    """GPT-style decoder: idx (B, L) int64 -> logits (B, L, vocab_size); causal attention,
    pre-LayerNorm, sinusoidal or learned positions, output head tied to the token embedding."""

    def __init__(
        self,
        vocab_size=256,
        max_len=256,
        d_model=128,
        n_heads=4,
        n_layers=4,
        mlp_ratio=4,
        dropout=0.0,
        positions="sinusoidal",
        kernels="bmkernels",
    ):
        super().__init__()
        self.backbone = _Backbone(
            vocab_size, max_len, d_model, n_heads, n_layers, mlp_ratio, dropout, positions, kernels
        )
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.backbone.init_weights()
        self.head.weight = self.backbone.embed.weight

    def forward(self, idx):
        return self.head(self.backbone(idx, causal=True))


class TransformerClassifier(nn.Module):
    """Encoder classifier from the same blocks: idx (B, L) -> logits (B, n_classes); bidirectional
    attention, mean over the non-padding positions (key_padding_mask (B, L), True = padding)."""

    def __init__(
        self,
        n_classes,
        vocab_size=256,
        max_len=256,
        d_model=128,
        n_heads=4,
        n_layers=4,
        mlp_ratio=4,
        dropout=0.0,
        positions="sinusoidal",
        kernels="bmkernels",
    ):
        super().__init__()
        self.backbone = _Backbone(
            vocab_size, max_len, d_model, n_heads, n_layers, mlp_ratio, dropout, positions, kernels
        )
        self.head = nn.Linear(d_model, n_classes)
        self.backbone.init_weights()
        nn.init.normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, key_padding_mask=None):
        x = self.backbone(idx, causal=False, key_padding_mask=key_padding_mask)
        if key_padding_mask is None:
            return self.head(x.mean(dim=1))
        keep = (~key_padding_mask).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0))
