"""Conv benchmark cases: bmkernels.conv2d (conv + bias + ReLU, one pass) vs eager F.conv2d (oneDNN,
bias fused) followed by F.relu, in the same memory format."""

import torch
import torch.nn.functional as F

from bmkernels.bench import BMK, Case, fwd_bwd

FOOTNOTE = (
    "GFLOP/s: conv 2*N*Cout*Hout*Wout*(Cin/groups)*kH*kW forward, x3 for fwd+bwd (input and weight "
    "gradients). Layout: both contenders get the same NCHW or channels_last input."
)

# (label, C_in, C_out, H (= W), kernel, stride, padding, groups): ResNet-18's distinct conv layers and
# a MobileNetV2 depthwise 3x3.
RESNET18_LAYERS = (
    ("stem 7x7 3>64 224 s2", 3, 64, 224, 7, 2, 3, 1),
    ("3x3 64 56", 64, 64, 56, 3, 1, 1, 1),
    ("3x3 64>128 56 s2", 64, 128, 56, 3, 2, 1, 1),
    ("1x1 64>128 56 s2", 64, 128, 56, 1, 2, 0, 1),
    ("3x3 128 28", 128, 128, 28, 3, 1, 1, 1),
    ("3x3 128>256 28 s2", 128, 256, 28, 3, 2, 1, 1),
    ("1x1 128>256 28 s2", 128, 256, 28, 1, 2, 0, 1),
    ("3x3 256 14", 256, 256, 14, 3, 1, 1, 1),
    ("3x3 256>512 14 s2", 256, 512, 14, 3, 2, 1, 1),
    ("1x1 256>512 14 s2", 256, 512, 14, 1, 2, 0, 1),
    ("3x3 512 7", 512, 512, 7, 3, 1, 1, 1),
)
DEPTHWISE_LAYERS = (("dw3x3 144 56", 144, 144, 56, 3, 1, 1, 144),)
QUICK_LAYERS = (
    ("3x3 16 12", 16, 16, 12, 3, 1, 1, 1),
    ("1x1 16>32 12 s2", 16, 32, 12, 1, 2, 0, 1),
    ("dw3x3 16 12", 16, 16, 12, 3, 1, 1, 16),
)
BATCH, QUICK_BATCH = 16, 2
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def conv_flops(batch, c_in, c_out, out_hw, kernel, groups, backward=False):
    """2*N*Cout*Hout*Wout*(Cin/groups)*kH*kW; backward adds the input and weight gradients (x3 total)."""
    fwd = 2.0 * batch * c_out * out_hw * out_hw * (c_in // groups) * kernel * kernel
    return fwd * 3 if backward else fwd


def _conv_case(layer, batch, layout, backward, seed=0):
    from bmkernels.ops.conv import conv2d as bmk_conv2d

    label, c_in, c_out, size, kernel, stride, padding, groups = layer
    fmt = LAYOUTS[layout]
    out_hw = (size + 2 * padding - kernel) // stride + 1

    def make_inputs():
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, c_in, size, size, generator=g).contiguous(memory_format=fmt)
        w = (torch.randn(c_out, c_in // groups, kernel, kernel, generator=g) * 0.05).contiguous(memory_format=fmt)
        b = torch.randn(c_out, generator=g)
        inp = {"x": x, "w": w, "b": b}
        if backward:
            for t in (x, w, b):
                t.requires_grad_(True)
            inp["grad_inputs"] = (x, w, b)
            inp["grad_out"] = torch.randn(batch, c_out, out_hw, out_hw, generator=g).contiguous(memory_format=fmt)
        return inp

    forward = {
        BMK: lambda i: bmk_conv2d(i["x"], i["w"], i["b"], stride, padding, 1, groups, activation="relu"),
        "eager": lambda i: F.relu(F.conv2d(i["x"], i["w"], i["b"], stride, padding, 1, groups)),
    }
    pass_name = "fwd+bwd" if backward else "fwd"
    return Case(
        op="conv",
        name=f"{pass_name} {layout} {label}",
        make_inputs=make_inputs,
        contenders={n: (fwd_bwd(f) if backward else f) for n, f in forward.items()},
        forward=forward if backward else {},
        flops=conv_flops(batch, c_in, c_out, out_hw, kernel, groups, backward),
        backward=backward,
        params={
            "N": batch,
            "Cin": c_in,
            "Cout": c_out,
            "H": size,
            "k": kernel,
            "stride": stride,
            "groups": groups,
            "layout": layout,
            "pass": pass_name,
        },
    )


def cases(preset="default"):
    """Conv cases of a preset (conv + bias + ReLU, float32).

    quick:   batch 2, a 3x3, a strided 1x1 and a depthwise 3x3 at 12x12; fwd and fwd+bwd, both layouts.
    small:   the deep ResNet-18 layers (256 and 512 channels) at batch 16, forward, both layouts.
    default: every ResNet-18 layer shape and the MobileNet depthwise 3x3 at batch 16, both layouts,
             forward and forward+backward.
    full:    the default preset (conv has no longer cases).
    """
    if preset == "quick":
        layers, batch = QUICK_LAYERS, QUICK_BATCH
    else:
        layers, batch = RESNET18_LAYERS + DEPTHWISE_LAYERS, BATCH
    passes = (False,) if preset == "small" else (False, True)
    if preset == "small":
        layers = tuple(layer for layer in layers if layer[1] >= 256)
    return [_conv_case(layer, batch, layout, backward) for backward in passes for layer in layers for layout in LAYOUTS]
