"""Fused conv blocks: convolution -> BatchNorm2d -> activation (+ a residual before the activation).

One rule for every fused block (`conv_bn_act`), equal to the unfused torch modules in every mode:
- BatchNorm in eval mode with running statistics: the BN is folded into the conv's weight and bias
  (in float64, rounded once, as bmkernels.fold_batchnorm does; without grad it *is*
  bmkernels.fold_batchnorm, cached until a parameter or statistic changes), and convolution, bias,
  residual and activation run as one bmkernels.conv2d.
- BatchNorm in training mode (or without running statistics): it normalizes with the batch's own
  statistics and updates its running statistics, so no fixed weight can fold it: the conv runs in
  bmkernels, then bmkernels.batch_norm_act normalizes, adds the residual and applies the activation
  in one kernel (an activation it lacks runs after it), with BatchNorm2d's own bookkeeping of the
  running statistics (`batch_norm_of`); a BatchNorm subclass other than timm's BatchNormAct2d runs
  as its own module, and so does the BatchNorm where that kernel is the slower (`batch_norm_act_wins`:
  SiLU / GELU, NCHW maps of fewer than 1024 values per channel), followed by the residual add and the activation.

What swap_modules(fuse=True) does with them (the module tree, state_dict keys, parameters and
`isinstance` checks all stay as they were; only the forward of the container changes):
- an nn.Sequential (or a subclass that keeps Sequential's forward, e.g. torchvision's
  Conv2dNormActivation) holding bmkernels Conv2d -> BatchNorm2d [-> activation] or Conv2d ->
  activation as consecutive children has its class set to a fused subclass of its own class, whose
  forward runs those children as one fused block and the other children as before;
- a torchvision ResNet BasicBlock / Bottleneck has its class set to a subclass whose forward runs
  conv1/bn1/relu (conv2/bn2/relu) as fused blocks and the last conv/bn + identity + relu as one
  fused block with the residual (the downsample Sequential is fused as above); a torchvision
  ResNet's own class gets a subclass whose _forward_impl runs the stem conv1/bn1/relu fused; a
  torchvision InvertedResidual with a skip connection runs its last conv/bn + the skip as one block.
A pattern whose children have hooks is not fused (the fused forward would skip them). unswap puts
the original classes back. The fused classes are made at run time, so pickling a whole fused model
(torch.save(model)) is not supported: save its state_dict (the same keys as the original's), or
unswap first.
"""

import torch
import torch.nn.functional as F

from bmkernels.nn.conv import Conv2d, _tensors
from bmkernels.ops.batch_norm import batch_norm_act

# activation modules the conv kernel applies itself -> the kernel's activation spec
_KERNEL_ACTIVATIONS = {
    torch.nn.ReLU: lambda m: "relu",
    torch.nn.SiLU: lambda m: "silu",
    torch.nn.GELU: lambda m: "gelu" if m.approximate == "none" else "gelu_tanh",
    torch.nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    torch.nn.ReLU6: lambda m: "relu6",
    torch.nn.Hardtanh: lambda m: "relu6" if (m.min_val, m.max_val) == (0.0, 6.0) else None,
    torch.nn.Hardswish: lambda m: "hardswish",
}
_FUNCTIONAL = {
    None: lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
}
_UNFUSED_CLASS = "_bmkernels_unfused_class"
_FUSED_CLASSES = {}  # (original class, fused forward) -> the fused subclass


def kernel_activation(module):
    """The conv kernel's spec for activation `module`, or None when the kernel has no such activation."""
    make = _KERNEL_ACTIVATIONS.get(type(module))
    return make(module) if make is not None else None


def _functional(activation):
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "leaky_relu":
        return lambda x: F.leaky_relu(x, activation[1])
    if not isinstance(activation, (str, type(None))) or activation not in _FUNCTIONAL:
        raise ValueError(f"activation must be one of {list(_FUNCTIONAL)} or ('leaky_relu', slope); got {activation!r}")
    return _FUNCTIONAL[activation]


def _bn_folds(bn):
    """Whether `bn` normalizes with fixed running statistics now (exactly torch's rule)."""
    return bn is not None and not bn.training and _tensors(bn, ("running_mean",))[0] is not None


def _folded_with_grad(conv, bn):
    """fold_batchnorm's math, differentiable in the conv's and the BN's parameters."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() if conv.bias is None else conv.bias.double() - bn.running_mean.double()
    bias = bias * scale + (bn.bias.double() if bn.bias is not None else 0.0)
    dtype = conv.weight.dtype
    return (conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype), bias.to(dtype)


# bmkernels.batch_norm_act's training kernel loses to torch's batch_norm (+ the activation's own op) where
# the activation needs an exp per element (SiLU, GELU: vectorized in the kernel, yet not clearly faster
# than torch on EfficientNet-B0's shapes; docs/conv.md) and on small NCHW maps (4x4 at batch 4: ~0.55x;
# channels_last there is ~0.9-1.0x and a whole MobileNetV2 step was faster fused); there torch's modules run.
_SLOW_BN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_MIN_NCHW_BN_VALUES = 1024  # values per channel (N * H * W) below which torch's NCHW batch_norm is faster


def batch_norm_act_wins(out, activation):
    """Whether the fused training BatchNorm kernel is used for conv output `out` and `activation`."""
    if activation in _SLOW_BN_ACTIVATIONS:
        return False
    return out.shape[0] * out.shape[2] * out.shape[3] >= _MIN_NCHW_BN_VALUES or not out.is_contiguous()


def batch_norm_of(bn, x, activation=None, residual=None):
    """act(bn(x) + residual) through bmkernels.batch_norm_act, with BatchNorm2d.forward's bookkeeping
    (num_batches_tracked, momentum None as a cumulative average, untracked statistics) for `bn`, a
    BatchNorm2d or a timm BatchNormAct2d (whose drop and activation the caller handles)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    tracked = not bn.training or bn.track_running_stats
    return batch_norm_act(
        x,
        bn.running_mean if tracked else None,
        bn.running_var if tracked else None,
        bn.weight,
        bn.bias,
        batch_stats,
        factor,
        bn.eps,
        activation=activation,
        residual=residual,
    )


def _torch_norm(conv, bn, out):
    """bn(out) by torch's module. In training its running statistics change inside torch's kernel without
    bumping their version counters, which the conv's cached eval fold is keyed on: the cache is dropped."""
    out = bn(out)
    if bn.training:
        conv.__dict__.pop("_bmkernels_eval_cache", None)
    return out


def conv_bn_act(
    conv: torch.nn.Conv2d,
    bn: torch.nn.BatchNorm2d | None,
    x: torch.Tensor,
    activation: str | tuple[str, float] | None = None,
    residual: torch.Tensor | None = None,
    act_module: torch.nn.Module | None = None,
) -> torch.Tensor:
    """act(bn(conv(x)) + residual) by the rule in the module docstring. conv: a bmkernels Conv2d
    (fused) or a torch.nn.Conv2d (torch's modules throughout); bn: a BatchNorm2d or None; activation:
    the kernel's spec; act_module: the activation module to call on the unfused path (default: the
    functional form of `activation`)."""
    if not isinstance(conv, Conv2d):
        fused = False
    elif bn is None:
        return conv.conv(x, *conv.weights_for(x), activation=activation, residual=residual)
    else:
        fused = _bn_folds(bn)
    if fused:
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None
        )
        compiling = torch.compiler.is_compiling()
        weight, bias = _folded_with_grad(conv, bn) if needs_grad or compiling else conv.eval_weights(x, bn)
        return conv.conv(x, weight, bias, activation=activation, residual=residual)
    if bn is not None and isinstance(conv, Conv2d) and not _has_hooks(conv):
        out = conv.conv(x, conv.weight, conv.bias, private=True)  # BatchNorm only reads it
        if type(bn) is torch.nn.BatchNorm2d and not _has_hooks(bn) and batch_norm_act_wins(out, activation):
            # batch statistics, residual and activation in one kernel; an activation it lacks after it
            if act_module is not None and activation is None:
                return act_module(batch_norm_of(bn, out, residual=residual))
            return batch_norm_of(bn, out, activation, residual)
        out = _torch_norm(conv, bn, out)
    else:
        out = conv(x)
        if bn is not None:
            out = _torch_norm(conv, bn, out)
    if residual is not None:
        # in place on BatchNorm's fresh output, as torchvision's `out += identity` (its backward does not read it)
        out = out.add_(residual) if type(bn) is torch.nn.BatchNorm2d else out + residual
    return act_module(out) if act_module is not None else _functional(activation)(out)


class ConvBNAct(torch.nn.Module):
    """conv (Conv2d, no bias) -> bn (BatchNorm2d) -> activation, with an optional residual added
    before the activation: `block(x, residual=None)`. kernels="bmkernels": a bmkernels Conv2d and
    the fused rule of conv_bn_act; kernels="torch": torch.nn.Conv2d and torch's modules. The same
    parameters and state_dict keys either way. padding=None: "same"-style k // 2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        activation: str | tuple[str, float] | None = "relu",
        *,
        kernels: str = "bmkernels",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernels not in ("bmkernels", "torch"):
            raise ValueError(f"kernels must be 'bmkernels' or 'torch'; got {kernels!r}")
        _functional(activation)
        conv_class = Conv2d if kernels == "bmkernels" else torch.nn.Conv2d
        padding = kernel_size // 2 if padding is None else padding
        self.conv = conv_class(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
            device=device,
            dtype=dtype,
        )
        self.bn = torch.nn.BatchNorm2d(out_channels, device=device, dtype=dtype)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, x, self.activation, residual)


# ------------------------------------------------------------------------------- swap fusions


def _has_hooks(module):
    return any(
        getattr(module, table, None)
        for table in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _fused_subclass(cls, mixin):
    if (cls, mixin) not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls, mixin] = type(
            f"Fused{cls.__name__}",
            (mixin, cls),
            {"__module__": __name__, _UNFUSED_CLASS: cls, "__doc__": mixin.__doc__},
        )
    return _FUSED_CLASSES[cls, mixin]


def _set_fused_class(module, mixin):
    module.__class__ = _fused_subclass(type(module), mixin)


def unfuse(module):
    """Put back the class a fusion replaced (no-op for any other module)."""
    while (original := getattr(type(module), _UNFUSED_CLASS, None)) is not None:  # fusions may stack
        module.__class__ = original
    for attribute in ("_bmkernels_groups", _LAYOUT_CHOICES, "_bmkernels_first_conv"):
        module.__dict__.pop(attribute, None)


def _sequence_groups(children):
    """[(start, count, activation spec)] of fusable conv [-> bn] [-> act] runs among `children`."""
    groups, i = [], 0
    while i < len(children):
        conv = children[i]
        if not (isinstance(conv, Conv2d) and conv.activation is None):
            i += 1
            continue
        n = 1
        if i + n < len(children) and type(children[i + n]) is torch.nn.BatchNorm2d:
            n += 1
        activation = kernel_activation(children[i + n]) if i + n < len(children) else None
        if activation is not None:
            n += 1
        if n > 1 and not any(_has_hooks(m) for m in children[i : i + n]):
            groups.append((i, n, activation))
        i += n
    return groups


class _FusedSequential:
    """A Sequential whose conv [-> BatchNorm2d] [-> activation] runs are fused (bmkernels.nn.fused)."""

    def forward(self, input):
        children = list(self._modules.values())
        starts = {start: (count, activation) for start, count, activation in self._bmkernels_groups}
        i = 0
        while i < len(children):
            if i not in starts:
                input = children[i](input)
                i += 1
                continue
            count, activation = starts[i]
            bn = children[i + 1] if count > 1 and isinstance(children[i + 1], torch.nn.BatchNorm2d) else None
            act = children[i + count - 1] if activation is not None else None
            input = conv_bn_act(children[i], bn, input, activation, act_module=act)
            i += count
        return input


def fuse_sequences(model, report):
    """FUSERS entry: conv [-> BatchNorm2d] [-> ReLU/SiLU/GELU/LeakyReLU] runs inside Sequentials
    (ReLU6/Hardtanh(0, 6)/Hardswish too)."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Sequential) or type(module).forward is not torch.nn.Sequential.forward:
            continue
        children = list(module._modules.values())
        groups = _sequence_groups(children)
        if not groups:
            continue
        names = list(module._modules)
        for start, count, activation in groups:
            parts = [".".join(filter(None, (name, n))) for n in names[start : start + count]]
            report.fused.append((parts, f"fused conv block (activation={activation!r}) in {type(module).__name__}"))
        _set_fused_class(module, _FusedSequential)
        module._bmkernels_groups = groups


class _FusedBasicBlock:
    """torchvision BasicBlock: conv1/bn1/relu and conv2/bn2 + identity + relu as fused blocks."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(self.conv1, self.bn1, x, "relu", act_module=self.relu)
        return conv_bn_act(self.conv2, self.bn2, out, "relu", residual=identity, act_module=self.relu)


class _FusedBottleneck:
    """torchvision Bottleneck: conv1/bn1/relu, conv2/bn2/relu and conv3/bn3 + identity + relu as fused blocks."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(self.conv1, self.bn1, x, "relu", act_module=self.relu)
        out = conv_bn_act(self.conv2, self.bn2, out, "relu", act_module=self.relu)
        return conv_bn_act(self.conv3, self.bn3, out, "relu", residual=identity, act_module=self.relu)


class _FusedResNet:
    """torchvision ResNet: the stem's conv1/bn1/relu as one fused block; the rest as torchvision's."""

    def _forward_impl(self, x):
        x = self.maxpool(conv_bn_act(self.conv1, self.bn1, x, "relu", act_module=self.relu))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fuse_resnet_blocks(model, report):
    """FUSERS entry: torchvision ResNet BasicBlock / Bottleneck and the ResNet stem (exactly those
    classes) whose convs were swapped, BNs are BatchNorm2d, relu is nn.ReLU and nothing inside has hooks."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:
        return
    layouts = {BasicBlock: (_FusedBasicBlock, 2), Bottleneck: (_FusedBottleneck, 3), ResNet: (_FusedResNet, 1)}
    for name, module in model.named_modules():
        layout = layouts.get(type(module))
        if layout is None:
            continue
        mixin, depth = layout
        convs = [getattr(module, f"conv{i}") for i in range(1, depth + 1)]
        bns = [getattr(module, f"bn{i}") for i in range(1, depth + 1)]
        if not (
            all(isinstance(c, Conv2d) and c.activation is None for c in convs)
            and all(type(b) is torch.nn.BatchNorm2d for b in bns)
            and type(module.relu) is torch.nn.ReLU
        ):
            report.notes.append(
                f"{name}: {type(module).__name__} not fused (its convs were not swapped or its "
                "layers are not Conv2d/BatchNorm2d/ReLU)"
            )
            continue
        if any(_has_hooks(m) for m in (*convs, *bns, module.relu)):
            report.notes.append(f"{name}: {type(module).__name__} not fused (a layer inside has hooks)")
            continue
        what = "stem conv1+bn1+relu" if depth == 1 else "conv+bn+relu blocks, the last one with the residual add"
        report.fused.append(([name or "<model>"], f"{type(module).__name__}: {what}"))
        _set_fused_class(module, mixin)


class _FusedInvertedResidual:
    """torchvision MobileNetV2 InvertedResidual: the last conv/bn with the residual add in one fused block."""

    def forward(self, x):
        if not self.use_res_connect:
            return self.conv(x)
        *body, conv, bn = self.conv
        out = x
        for layer in body:
            out = layer(out)
        return conv_bn_act(conv, bn, out, residual=x)


def fuse_inverted_residuals(model, report):
    """FUSERS entry: torchvision InvertedResidual blocks (exactly that class) with a skip connection whose
    last two layers are a swapped Conv2d and a BatchNorm2d and whose conv Sequential has no hooks."""
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual
    except ImportError:
        return
    for name, module in model.named_modules():
        if type(module) is not InvertedResidual or not module.use_res_connect:
            continue
        layers = list(module.conv)
        if not (
            len(layers) >= 2
            and isinstance(layers[-2], Conv2d)
            and layers[-2].activation is None
            and type(layers[-1]) is torch.nn.BatchNorm2d
        ) or any(_has_hooks(m) for m in (module.conv, layers[-2], layers[-1])):
            report.notes.append(f"{name}: InvertedResidual not fused (its last layers are not a swapped conv + BN)")
            continue
        report.fused.append(([name], "InvertedResidual: the last conv+bn with the residual add"))
        _set_fused_class(module, _FusedInvertedResidual)


# ------------------------------------------------------------------------------- timm fusions


def _timm_norm_activation(norm):
    """(fusable, kernel activation spec) of a timm BatchNormAct2d (its own activation kept), or of a
    plain BatchNorm2d (no activation)."""
    if type(norm) is torch.nn.BatchNorm2d:
        return True, None
    from timm.layers import BatchNormAct2d  # only reached for timm models (timm imported)

    if type(norm) is not BatchNormAct2d or type(norm.drop) is not torch.nn.Identity:
        return False, None
    if type(norm.act) is torch.nn.Identity:
        return True, None
    spec = kernel_activation(norm.act)
    return spec is not None, spec


def conv_norm_act(conv, norm, x, residual=None):
    """norm(conv(x)) (+ residual) for a timm BatchNormAct2d / BatchNorm2d `norm`: folded into one
    bmkernels.conv2d with the norm's activation when the norm is in eval mode (conv_bn_act's rule),
    else timm's module itself (batch statistics, its activation). A residual only with no activation."""
    fusable, spec = _timm_norm_activation(norm)
    if isinstance(conv, Conv2d) and _bn_folds(norm):
        return conv_bn_act(conv, norm, x, spec, residual)
    if isinstance(conv, Conv2d) and fusable and not _has_hooks(conv) and not _has_hooks(norm):
        out = conv.conv(x, conv.weight, conv.bias, private=True)  # the norm only reads it
        if batch_norm_act_wins(out, spec):
            return batch_norm_of(norm, out, spec, residual)
        out = _torch_norm(conv, norm, out)  # timm's module: batch statistics, then its activation
    else:
        out = _torch_norm(conv, norm, conv(x))
    return out if residual is None else out + residual


class _FusedTimmBasicBlock:
    """timm BasicBlock: conv1/bn1/act1 and conv2/bn2 + shortcut + act2 as fused blocks."""

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(self.conv1, self.bn1, x, kernel_activation(self.act1), act_module=self.act1)
        return conv_bn_act(
            self.conv2, self.bn2, out, kernel_activation(self.act2), residual=shortcut, act_module=self.act2
        )


class _FusedTimmBottleneck:
    """timm Bottleneck: conv1/bn1/act1, conv2/bn2/act2 and conv3/bn3 + shortcut + act3 as fused blocks."""

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(self.conv1, self.bn1, x, kernel_activation(self.act1), act_module=self.act1)
        out = conv_bn_act(self.conv2, self.bn2, out, kernel_activation(self.act2), act_module=self.act2)
        return conv_bn_act(
            self.conv3, self.bn3, out, kernel_activation(self.act3), residual=shortcut, act_module=self.act3
        )


class _FusedTimmResNet:
    """timm ResNet: the stem's conv1/bn1/act1 as one fused block (unless gradient checkpointing is on)."""

    def forward_features(self, x):
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self.maxpool(conv_bn_act(self.conv1, self.bn1, x, kernel_activation(self.act1), act_module=self.act1))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _FusedTimmEfficientNet:
    """timm EfficientNet: conv_stem/bn1 and conv_head/bn2 as fused blocks (unless gradient checkpointing is on)."""

    def forward_features(self, x):
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self.blocks(conv_norm_act(self.conv_stem, self.bn1, x))
        return conv_norm_act(self.conv_head, self.bn2, x)


class _FusedTimmDepthwiseSeparable:
    """timm DepthwiseSeparableConv: conv_dw/bn1 and conv_pw/bn2 (+ shortcut) as fused blocks."""

    def forward(self, x):
        out = self.se(self.aa(conv_norm_act(self.conv_dw, self.bn1, x)))
        return conv_norm_act(self.conv_pw, self.bn2, out, residual=x if self.has_skip else None)


class _FusedTimmInvertedResidual:
    """timm InvertedResidual: conv_pw/bn1, conv_dw/bn2 and conv_pwl/bn3 (+ shortcut) as fused blocks."""

    def forward(self, x):
        out = conv_norm_act(self.conv_dw, self.bn2, conv_norm_act(self.conv_pw, self.bn1, x))
        out = self.se(self.aa(out))
        return conv_norm_act(self.conv_pwl, self.bn3, out, residual=x if self.has_skip else None)


def _timm_layouts():
    """timm class -> (fused mixin, conv names, norm names, names that must be Identity or None, what)."""
    from timm.models import _efficientnet_blocks as blocks
    from timm.models import efficientnet, resnet

    return {
        resnet.BasicBlock: (
            _FusedTimmBasicBlock,
            ("conv1", "conv2"),
            ("bn1", "bn2"),
            ("drop_block", "aa", "se", "drop_path"),
            "conv+bn+act blocks, the last one with the residual add",
        ),
        resnet.Bottleneck: (
            _FusedTimmBottleneck,
            ("conv1", "conv2", "conv3"),
            ("bn1", "bn2", "bn3"),
            ("drop_block", "aa", "se", "drop_path"),
            "conv+bn+act blocks, the last one with the residual add",
        ),
        resnet.ResNet: (_FusedTimmResNet, ("conv1",), ("bn1",), (), "stem conv1+bn1+act1"),
        efficientnet.EfficientNet: (
            _FusedTimmEfficientNet,
            ("conv_stem", "conv_head"),
            ("bn1", "bn2"),
            (),
            "stem and head conv+BatchNormAct2d",
        ),
        blocks.DepthwiseSeparableConv: (
            _FusedTimmDepthwiseSeparable,
            ("conv_dw", "conv_pw"),
            ("bn1", "bn2"),
            ("conv_s2d", "drop_path"),
            "conv+BatchNormAct2d blocks, the last one with the residual add",
        ),
        blocks.InvertedResidual: (
            _FusedTimmInvertedResidual,
            ("conv_pw", "conv_dw", "conv_pwl"),
            ("bn1", "bn2", "bn3"),
            ("conv_s2d", "drop_path"),
            "conv+BatchNormAct2d blocks, the last one with the residual add",
        ),
    }


_TIMM_RESNET_CLASSES = ()


def _timm_blocker(module, convs, norms, identities):
    """Why a timm block cannot be fused, or None."""
    if not all(isinstance(getattr(module, c), Conv2d) and getattr(module, c).activation is None for c in convs):
        return "its convs were not swapped"
    fusable = [_timm_norm_activation(getattr(module, n)) for n in norms]
    if not all(ok for ok, _ in fusable):
        return "a norm layer is not BatchNorm2d / BatchNormAct2d with a kernel activation"
    if any(
        getattr(module, n, None) is not None and type(getattr(module, n)) is not torch.nn.Identity for n in identities
    ):
        return f"one of {', '.join(identities)} is in use"
    if isinstance(module, _TIMM_RESNET_CLASSES) and any(
        kernel_activation(getattr(module, f"act{i}")) is None for i in range(1, len(norms) + 1)
    ):
        return "an activation the conv kernel does not have"
    if fusable[-1][1] is not None and hasattr(module, "has_skip") and module.has_skip:
        return "an activation between the last norm and the residual add"
    parts = [getattr(module, n) for n in (*convs, *norms)]
    if any(_has_hooks(m) for m in parts):
        return "a layer inside has hooks"
    return None


def fuse_timm_blocks(model, report):
    """FUSERS entry (timm imported): timm ResNet BasicBlock / Bottleneck and stem, EfficientNet stem /
    head, DepthwiseSeparableConv and InvertedResidual (exactly those classes; BatchNormAct2d keeps its
    activation) whose convs were swapped and whose optional parts (drop path, anti-aliasing, SE in
    ResNet blocks, space-to-depth) are not in use."""
    import sys

    if "timm" not in sys.modules:
        return
    from timm.models import resnet

    global _TIMM_RESNET_CLASSES
    _TIMM_RESNET_CLASSES = (resnet.BasicBlock, resnet.Bottleneck, resnet.ResNet)  # their acts are act1, act2, ...
    layouts = _timm_layouts()
    for name, module in model.named_modules():
        layout = layouts.get(type(module))
        if layout is None:
            continue
        mixin, convs, norms, identities, what = layout
        why = _timm_blocker(module, convs, norms, identities)
        if why is not None:
            report.notes.append(f"{name or '<model>'}: timm {type(module).__name__} not fused ({why})")
            continue
        report.fused.append(([name or "<model>"], f"timm {type(module).__name__}: {what}"))
        _set_fused_class(module, mixin)


# ------------------------------------------------------------------- channels_last inside the model

_LAYOUT_CHOICES = "_bmkernels_layout_choices"
_MEASURE_ROUNDS = 3  # timed runs per layout (after one untimed run each) when the eval choice is measured
# channels_last is kept only when clearly faster: a first-call timing is noisy, NCHW is the user's layout
_CHANNELS_LAST_MARGIN = 0.97


def _is_nchw_image(x):
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.is_floating_point()
        and x.size(1) > 1
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)
    )


def _to_contiguous(out):
    """The output as the model computes it from NCHW input: 4-D tensors back to contiguous NCHW."""
    if isinstance(out, torch.Tensor):
        return out.contiguous() if out.dim() == 4 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_contiguous(o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _to_contiguous(v)) for k, v in out.items())
    return out


class _ChannelsLastInside:
    """Runs on channels_last activations when the input is NCHW and that measured faster (bmkernels.nn.fused)."""

    def forward(self, *args, **kwargs):
        if not args or not _is_nchw_image(args[0]):
            return super().forward(*args, **kwargs)
        x, rest = args[0], args[1:]
        first_conv = self.__dict__.get("_bmkernels_first_conv")
        if first_conv is None:  # kept in __dict__, not as a submodule (no change to the module tree)
            first_conv = next(m for m in self.modules() if isinstance(m, Conv2d))
            self.__dict__["_bmkernels_first_conv"] = first_conv
        no_grad = not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters())
        key = (tuple(x.shape), x.dtype, no_grad, _channels_last_weights(first_conv))
        choices = self.__dict__.setdefault(_LAYOUT_CHOICES, {})
        if key not in choices:
            choices[key] = self._choose_layout(x, rest, kwargs, no_grad, key[-1])
        if not choices[key]:
            return super().forward(*args, **kwargs)
        return _to_contiguous(super().forward(x.contiguous(memory_format=torch.channels_last), *rest, **kwargs))

    def _choose_layout(self, x, args, kwargs, no_grad, weights_channels_last):
        """channels_last or not, for calls like this one. With grad the weights are the model's own: an
        NCHW weight would be reordered on every channels_last call (forward and backward), so the layout
        follows the weights'. Without grad (eval weights are cached in x's layout) and with every module
        in eval mode without hooks (a forward then changes nothing anyone sees) both layouts are timed,
        interleaved."""
        if (
            not no_grad
            or torch.compiler.is_compiling()
            or any(m.training or _has_hooks(m) for m in self.modules())  # extra runs would show (hooks fire)
        ):
            return weights_channels_last
        import time

        runs = {False: lambda: super(_ChannelsLastInside, self).forward(x, *args, **kwargs)}
        x_cl = x.contiguous(memory_format=torch.channels_last)
        runs[True] = lambda: super(_ChannelsLastInside, self).forward(x_cl, *args, **kwargs)
        best = {False: float("inf"), True: float("inf")}
        with torch.no_grad():
            for round in range(_MEASURE_ROUNDS + 1):
                for layout, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if round:  # round 0 warms up (engine choices, cached eval weights of each layout)
                        best[layout] = min(best[layout], time.perf_counter() - start)
        return best[True] < _CHANNELS_LAST_MARGIN * best[False]


def _channels_last_weights(conv):
    return (
        conv.weight.dim() == 4
        and conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not (conv.weight.is_contiguous())
    )


def keep_channels_last(model, report):
    """FUSERS entry (last): a model holding bmkernels Conv2d modules runs NCHW CPU float input on
    channels_last activations inside when that is faster, and returns 4-D outputs in NCHW as the
    original would. Eval without grad: timed once per input shape (both layouts, interleaved) and
    cached; with grad or in training: channels_last exactly when the model's conv weights are
    (model.to(memory_format=torch.channels_last)). Channels_last input is left as it is."""
    if not any(isinstance(m, Conv2d) for m in model.modules()):
        return
    original = type(model)
    while getattr(original, _UNFUSED_CLASS, None) is not None:  # the class before any fusion
        original = getattr(original, _UNFUSED_CLASS)
    _set_fused_class(model, _ChannelsLastInside)
    report.notes.append(
        f"<model>: {original.__name__} runs NCHW input on channels_last activations where measured faster "
        "(its 4-D outputs are returned in NCHW)"
    )
