"""GRU benchmark cases: bmkernels.gru vs torch.nn.GRU, and one bmkernels.gru_cell step vs torch.nn.GRUCell."""

import torch

from bmkernels.bench import BMK, Case, fwd_bwd

FOOTNOTE = (
    "GFLOP/s: GRU 2*T*B*3H*(I+H) per layer and direction (the two matmuls), x3 for fwd+bwd; "
    "a cell step is T = 1. torch.nn: nn.GRU for the layer cases, nn.GRUCell for the cell cases (same weights)."
)

# (T, B, I, H, num_layers, bidirectional)
LAYER_CASES = (
    (128, 32, 256, 256, 1, False),
    (64, 64, 512, 512, 1, False),
    (256, 8, 128, 128, 1, False),
    (64, 32, 256, 256, 2, True),
)
QUICK_LAYER_CASES = ((16, 4, 32, 32, 1, False), (8, 4, 32, 32, 2, True))
CELL_CASES = ((1, 256, 256), (32, 256, 256))  # (B, I, H)
QUICK_CELL_CASES = ((1, 32, 32),)


def gru_flops(steps, batch, input_size, hidden, num_layers=1, bidirectional=False, backward=False):
    """2*T*B*3H*(I_l+H) summed over layers and directions; fwd+bwd is 3x forward."""
    directions = 2 if bidirectional else 1
    total = 0.0
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else directions * hidden
        total += directions * 2.0 * steps * batch * 3 * hidden * (layer_input + hidden)
    return total * (3 if backward else 1)


def _layer_case(shape, backward, seed=0):
    from bmkernels.ops.gru import gru as bmk_gru

    steps, batch, input_size, hidden, layers, bi = shape

    def make_inputs():
        torch.manual_seed(seed)
        module = torch.nn.GRU(input_size, hidden, num_layers=layers, bidirectional=bi)
        x = torch.randn(steps, batch, input_size)
        h0 = torch.randn(layers * (2 if bi else 1), batch, hidden)
        inp = {"module": module, "x": x, "h0": h0}
        if backward:
            x.requires_grad_(True)
            inp["grad_inputs"] = [x] + list(module.parameters())
            inp["grad_out"] = torch.randn(steps, batch, (2 if bi else 1) * hidden)
        return inp

    forward = {
        BMK: lambda i: bmk_gru(
            i["x"],
            i["h0"],
            i["module"]._flat_weights,
            num_layers=layers,
            bidirectional=bi,
            batch_first=False,
            dropout=0.0,
            training=True,
        )[0],
        "torch.nn": lambda i: i["module"](i["x"], i["h0"])[0],
    }
    pass_name = "fwd+bwd" if backward else "fwd"
    name = f"{pass_name} layer {'x'.join(map(str, shape[:4]))}" + (f" L{layers}{' bi' if bi else ''}")
    return Case(
        op="gru",
        name=name,
        make_inputs=make_inputs,
        contenders={n: (fwd_bwd(f) if backward else f) for n, f in forward.items()},
        forward=forward if backward else {},
        flops=gru_flops(steps, batch, input_size, hidden, layers, bi, backward),
        backward=backward,
        params={
            "T": steps,
            "B": batch,
            "I": input_size,
            "H": hidden,
            "layers": layers,
            "bidirectional": bi,
            "pass": pass_name,
        },
    )


def _cell_case(shape, backward, seed=0):
    from bmkernels.ops.gru import gru_cell as bmk_gru_cell

    batch, input_size, hidden = shape

    def make_inputs():
        torch.manual_seed(seed)
        cell = torch.nn.GRUCell(input_size, hidden)
        x, h = torch.randn(batch, input_size), torch.randn(batch, hidden)
        inp = {"cell": cell, "x": x, "h": h, "params": tuple(cell.parameters())}
        if backward:
            x.requires_grad_(True)
            inp["grad_inputs"] = [x] + list(cell.parameters())
            inp["grad_out"] = torch.randn(batch, hidden)
        return inp

    forward = {
        BMK: lambda i: bmk_gru_cell(i["x"], i["h"], *i["params"]),
        "torch.nn": lambda i: i["cell"](i["x"], i["h"]),
    }
    pass_name = "fwd+bwd" if backward else "fwd"
    return Case(
        op="gru",
        name=f"{pass_name} cell {'x'.join(map(str, shape))}",
        make_inputs=make_inputs,
        contenders={n: (fwd_bwd(f) if backward else f) for n, f in forward.items()},
        forward=forward if backward else {},
        flops=gru_flops(1, batch, input_size, hidden, backward=backward),
        backward=backward,
        params={"B": batch, "I": input_size, "H": hidden, "pass": pass_name},
    )


def cases(preset="default"):
    """GRU cases of a preset.

    quick:   tiny layers (16,4,32,32) and a 2-layer bidirectional (8,4,32,32); a cell step at (1,32,32).
    small:   the default preset without the (64,64,512,512) layer.
    default: layers (T,B,I,H) (128,32,256,256), (64,64,512,512), (256,8,128,128) and a 2-layer
             bidirectional (64,32,256,256), forward and forward+backward; a cell step (B,I,H) at (1,256,256)
             and (32,256,256), forward.
    full:    the default preset plus the cell steps forward+backward.
    """
    if preset == "quick":
        layers, cells, cell_passes = QUICK_LAYER_CASES, QUICK_CELL_CASES, (False, True)
    elif preset in ("small", "default", "full"):
        layers = [s for s in LAYER_CASES if preset != "small" or s[3] < 512]
        cells, cell_passes = CELL_CASES, (False, True) if preset == "full" else (False,)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    out = [_layer_case(s, backward) for backward in (False, True) for s in layers]
    return out + [_cell_case(s, backward) for backward in cell_passes for s in cells]
