"""Reference CNNs from bmkernels fused conv blocks (bmkernels.nn.ConvBNAct): a small ResNet-style
classifier and a convolutional autoencoder. kernels="bmkernels" runs the convolutions in
bmkernels.conv2d (BatchNorm folded and bias, residual and activation fused in eval mode),
kernels="torch" in torch.nn.Conv2d + BatchNorm2d + activation: the same parameters, names and
initialisation (for one seed), so state_dicts move between the two and A/B runs start identical."""

import torch
import torch.nn.functional as F
from torch import nn

from bmkernels.nn import Conv2d, ConvBNAct

KERNELS = ("bmkernels", "torch")


def _check_kernels(kernels):
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {kernels!r}")


class ResidualBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN when the
    shape changes. The residual add and the last ReLU run inside the second fused block."""

    def __init__(self, in_channels, out_channels, stride=1, kernels="bmkernels"):
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3, stride, kernels=kernels)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, 1, kernels=kernels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBNAct(in_channels, out_channels, 1, stride, activation=None, kernels=kernels)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x), residual=identity)


def _init_weights(model):
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class CNN(nn.Module):
    """ResNet-style classifier: x (B, in_channels, H, W) -> logits (B, n_classes). A 3x3 stem, then
    one stage of `blocks` residual blocks per entry of `widths` (each stage after the first halves
    the resolution), global average pooling and a linear head."""

    def __init__(self, n_classes=10, in_channels=1, widths=(16, 32, 64), blocks=1, kernels="bmkernels"):
        super().__init__()
        _check_kernels(kernels)
        self.kernels = kernels
        self.stem = ConvBNAct(in_channels, widths[0], 3, kernels=kernels)
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stages.append(ResidualBlock(channels, width, 2 if i > 0 and j == 0 else 1, kernels))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, n_classes)
        _init_weights(self)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, channels, height, width); got shape {tuple(x.shape)}")
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class ConvAutoencoder(nn.Module):
    """x (B, in_channels, H, W) in [0, 1] -> reconstruction of the same shape (H, W divisible by
    2 ** len(widths)). Encoder: a stride-2 fused conv block per width; decoder: nearest 2x
    upsampling + a fused conv block per width, then a 3x3 conv and a sigmoid. encode(x) gives the
    code (B, widths[-1], H / 2**n, W / 2**n)."""

    def __init__(self, in_channels=1, widths=(16, 32), kernels="bmkernels"):
        super().__init__()
        _check_kernels(kernels)
        self.kernels = kernels
        self.scale = 2 ** len(widths)
        channels = [in_channels, *widths]
        self.encoder = nn.Sequential(
            *(ConvBNAct(a, b, 3, 2, kernels=kernels) for a, b in zip(channels[:-1], channels[1:], strict=True))
        )
        back = list(reversed(widths))
        self.decoder = nn.ModuleList(
            ConvBNAct(a, b, 3, kernels=kernels) for a, b in zip(back, back[1:] + [widths[0]], strict=True)
        )
        self.out = (Conv2d if kernels == "bmkernels" else nn.Conv2d)(widths[0], in_channels, 3, padding=1)
        _init_weights(self)

    def encode(self, x):
        if x.dim() != 4 or x.shape[-1] % self.scale or x.shape[-2] % self.scale:
            raise ValueError(
                f"x must be (batch, channels, height, width) with height and width divisible by "
                f"{self.scale}; got shape {tuple(x.shape)}"
            )
        return self.encoder(x)

    def forward(self, x):
        h = self.encode(x)
        for block in self.decoder:
            h = block(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return torch.sigmoid(self.out(h))
