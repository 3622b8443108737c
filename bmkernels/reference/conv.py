"""Plain-PyTorch fused conv2d: the specification of bmkernels.conv2d and its ground truth in tests.

    out = act(conv2d(x, weight, stride, padding, dilation, groups) + bias + residual)

Arguments as in torch.nn.functional.conv2d (int or pair; padding "same"/"valid"; unbatched
(C, H, W) input). residual has the output's shape and is added before the activation, as in a
ResNet block. activation: None, "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation),
"silu", "leaky_relu" (slope 0.01), ("leaky_relu", slope), "relu6" (F.relu6: gradient 0 at exactly 0
and 6) or "hardswish" (F.hardswish: gradient 0 at -3 and below, 1 at 3 and above). Imports nothing of
bmkernels.
"""

import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "leaky_relu", "relu6", "hardswish")
DEFAULT_LEAKY_SLOPE = 0.01


def activation_fn(activation):
    """The activation as a callable on a tensor."""
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "leaky_relu":
        slope = activation[1]
        return lambda z: F.leaky_relu(z, slope)
    table = {
        None: lambda z: z,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "leaky_relu": lambda z: F.leaky_relu(z, DEFAULT_LEAKY_SLOPE),
        "relu6": F.relu6,
        "hardswish": F.hardswish,
    }
    if not isinstance(activation, (str, type(None))) or activation not in table:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or ('leaky_relu', slope); got {activation!r}")
    return table[activation]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None, residual=None):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        z = z + residual
    return activation_fn(activation)(z)
