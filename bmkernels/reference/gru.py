"""Plain-PyTorch GRU: the specification of bmkernels.gru_cell and bmkernels.gru.

Equations and weight layout are torch.nn.GRU's (gate order r, z, n; b_hn inside the reset product):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))   h' = (1 - z) * n + z * h
"""

import torch
import torch.nn.functional as F


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step: x (B, I), h (B, H), w_ih (3H, I), w_hh (3H, H), b_* (3H,) -> h' (B, H)."""
    i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def layer_dropout(x, dropout):
    """The inter-layer dropout: the keep-mask drawn in float32 from torch's default generator, so every
    dtype (and the kernels' wrapper, which calls this too) sees the same mask under torch.manual_seed.
    dropout = 1 drops everything, as torch does: x * 0 (no 0 / 0), nothing drawn."""
    if dropout == 1:
        return x * 0
    return x * (torch.rand(x.shape, device=x.device) >= dropout) / (1 - dropout)


def gru_direction(x, h, w_ih, w_hh, b_ih, b_hh, reverse, lengths=None):
    """One direction of one layer: x (T, B, I), h (B, H) -> outputs (T, B, H), h_n (B, H). Steps
    t >= lengths[b] leave sequence b's state unchanged and output 0 (a packed sequence's padding)."""
    outputs = [None] * x.shape[0]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h_new = gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
        if lengths is None:
            h = outputs[t] = h_new
        else:
            valid = (t < lengths).unsqueeze(1)
            h = torch.where(valid, h_new, h)
            outputs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h


def gru(x, h0, weights, *, num_layers, bidirectional, batch_first, dropout, training, lengths=None):
    """Multi-layer GRU as torch.nn.GRU: x (T, B, I) ((B, T, I) if batch_first; (T, I) unbatched),
    h0 (L*D, B, H) or None (zeros; (L*D, H) unbatched), weights in torch.nn.GRU._flat_weights order.
    dropout (when training) on every layer's output but the last, as layer_dropout draws it.
    lengths (B,): per-sequence lengths for padded sequences. Returns (output, h_n)."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1)
        h0 = None if h0 is None else h0.unsqueeze(1)
    elif batch_first:
        x = x.transpose(0, 1)
    directions = 2 if bidirectional else 1
    per_direction = len(weights) // (num_layers * directions)
    hidden = weights[1].shape[1]
    if h0 is None:
        h0 = x.new_zeros(num_layers * directions, x.shape[1], hidden)
    layer_input, h_n = x, []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            k = (layer * directions + d) * per_direction
            w_ih, w_hh, b_ih, b_hh = (list(weights[k : k + per_direction]) + [None, None])[:4]
            out, h = gru_direction(
                layer_input, h0[layer * directions + d], w_ih, w_hh, b_ih, b_hh, reverse=d == 1, lengths=lengths
            )
            outs.append(out)
            h_n.append(h)
        layer_input = torch.cat(outs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = layer_dropout(layer_input, dropout)
    output, h_n = layer_input, torch.stack(h_n)
    if unbatched:
        return output.squeeze(1), h_n.squeeze(1)
    return (output.transpose(0, 1) if batch_first else output), h_n
