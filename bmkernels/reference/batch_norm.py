"""Reference (specification) of bmkernels.batch_norm_act: torch's batch_norm, then the residual, then the
activation, in plain PyTorch."""

import torch
import torch.nn.functional as F

from bmkernels.reference.conv import activation_fn


def _canonical(t):
    """t, or a copy with the canonical strides of its memory format where it has others (a size-1 dim
    with an unusual stride). torch's CPU batch_norm backward (2.14) pairs x and grad_out elements wrongly
    for those, e.g. a channels_last x of shape (1, C, H, 1) with N stride 1: dx off by O(1) in float64."""
    if t.dim() != 4:
        return t
    _, c, h, w = t.shape
    if t.is_contiguous():
        fmt, want = torch.contiguous_format, (c * h * w, h * w, w, 1)
    elif t.is_contiguous(memory_format=torch.channels_last):
        fmt, want = torch.channels_last, (c * h * w, 1, w * c, c)
    else:
        return t
    return t if t.stride() == want else t.clone(memory_format=fmt)


class _CanonicalGrad(torch.autograd.Function):
    """The identity, whose backward hands on the gradient with canonical strides (see _canonical)."""

    @staticmethod
    def forward(t):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _canonical(grad)


def batch_norm_act(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    activation=None,
    residual=None,
):
    """act(F.batch_norm(x, ...) + residual); the running statistics are updated as F.batch_norm does."""
    out = F.batch_norm(_canonical(x), running_mean, running_var, weight, bias, training, momentum, eps)
    if out.requires_grad:
        out = _CanonicalGrad.apply(out)
    if residual is not None:
        out = out + residual
    return activation_fn(activation)(out)
