"""GRULM: a GRU language model (embedding -> GRU -> linear head). kernels="bmkernels" runs the GRU in
bmkernels.nn.GRU, kernels="torch" in torch.nn.GRU: the same parameters, names and initialisation
(for one seed)."""

from torch import nn

from bmkernels.nn import GRU

GRU_CLASSES = {"bmkernels": GRU, "torch": nn.GRU}


class GRULM(nn.Module):
    """idx (B, L) int64 -> logits (B, L, vocab_size); forward(idx, h0=None, return_state=False) also
    returns the final state (num_layers, B, hidden) when asked (for generation step by step)."""

    def __init__(self, vocab_size=256, d_embed=64, hidden_size=256, num_layers=2, dropout=0.0, kernels="bmkernels"):
        super().__init__()
        if kernels not in GRU_CLASSES:
            raise ValueError(f"kernels must be one of {', '.join(GRU_CLASSES)}; got {kernels!r}")
        self.kernels = kernels
        self.embed = nn.Embedding(vocab_size, d_embed)
        self.gru = GRU_CLASSES[kernels](d_embed, hidden_size, num_layers, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, idx, h0=None, return_state=False):
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, length) token ids; got shape {tuple(idx.shape)}")
        out, h_n = self.gru(self.embed(idx), h0)
        logits = self.head(self.drop(out))
        return (logits, h_n) if return_state else logits
