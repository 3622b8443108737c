"""Reference (specification) of bmkernels.batch_norm_act: torch's batch_norm, then the residual, then the
activation, in plain PyTorch."""

import torch.nn.functional as F

from bmkernels.reference.conv import activation_fn


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
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return activation_fn(activation)(out)
