"""bmkernels.batch_norm_act: torch.nn.functional.batch_norm followed by a residual add and an activation
(the tail of a CNN block), one fused CPU kernel in training mode, and the fake kernels of the
torch.ops.bmkernels.batch_norm_act_* operators. Autograd of batch_norm_act_fwd is registered in C++
(csrc/autograd/batch_norm.cpp).

The kernel normalizes with the batch statistics; the running statistics are updated here, from the
batch mean and biased variance the kernel returns, exactly as F.batch_norm does (momentum, the unbiased
variance in the running estimate). Eval mode with running statistics is a per-channel affine map that
a swapped model folds into the conv before it (bmkernels.fold_batchnorm); here it runs torch's ops.
Memory: the forward saves x and, for the activation's derivative, relu's output or the other
activations' pre-activation (nothing more without an activation), as torch's modules save theirs.
"""

import torch

from bmkernels import _backend, _extension
from bmkernels.ops._common import bind, table
from bmkernels.ops.conv import _activation, _memory_format
from bmkernels.reference import batch_norm as reference

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "cpu", "reference")


def _fail(cls, message):
    raise cls(f"batch_norm_act: {message}")


def _check_channels(name, t, x):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor or None; got {type(t).__name__}")
    if tuple(t.shape) != (x.shape[1],):
        _fail(
            ValueError,
            f"{name} must have shape (C,) = ({x.shape[1]},) for x of shape {tuple(x.shape)}; got {tuple(t.shape)}",
        )
    if t.device != x.device:
        _fail(ValueError, f"{name} must be on x's device {x.device}; got {t.device}")


def batch_norm_act(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | tuple[str, float] | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual).

    x: (N, C, H, W), NCHW or channels_last (the output keeps x's memory format); running_mean,
    running_var: (C,) or None, updated in place in training mode as F.batch_norm does; weight, bias:
    (C,) or None; residual: x's shape, added after the normalization; activation: as bmkernels.conv2d
    (None, "relu", "gelu", "gelu_tanh", "silu", "leaky_relu", ("leaky_relu", slope), "relu6", "hardswish").
    backend: "auto" (the fused kernel for CPU tensors in training mode, torch's ops otherwise), "cpu"
    (the kernel, an error where it cannot run) or "reference" (torch's ops). Returns x's shape and dtype.
    """
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        _fail(ValueError, f"x must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_channels(name, t, x)
    if (running_mean is None) != (running_var is None):
        _fail(ValueError, "running_mean and running_var must be both tensors or both None")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            _fail(TypeError, f"residual must be a torch.Tensor or None; got {type(residual).__name__}")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            _fail(
                ValueError,
                f"residual must have x's shape {tuple(x.shape)}, dtype {x.dtype} and device {x.device}; got "
                f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}",
            )
    code, slope = _activation(activation)
    name = _backend.requested(backend)
    if name not in _BACKENDS:
        _fail(ValueError, f"backend must be one of {list(_BACKENDS)} (or None); got {backend!r}")
    per_channel = x.shape[0] * x.shape[2] * x.shape[3]
    kernel_runs = (
        training and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and per_channel > 1 and _extension.loaded()
    )
    if name == "cpu" and not kernel_runs:
        _fail(
            RuntimeError,
            "backend 'cpu' runs CPU tensors of float32/float64/bfloat16/float16 in training mode (batch statistics) "
            f"with more than 1 value per channel and the extension built; got a {x.device.type} {x.dtype} tensor "
            f"of shape {tuple(x.shape)}, training={training}",
        )
    if name == "reference" or not kernel_runs:
        return reference.batch_norm_act(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation=activation,
            residual=residual,
        )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    save_preact = needs_grad and code not in (0, 1)  # relu's output or nothing serves the others (autograd)
    out, mean, _, var, _ = torch.ops.bmkernels.batch_norm_act_fwd(
        x, weight, bias, residual, eps, code, slope, save_preact
    )
    if training and running_mean is not None:
        with torch.no_grad():
            unbiased = var * (per_channel / (per_channel - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out


# the schemas of batch_norm_act_fwd / batch_norm_act_bwd (csrc/registration.cpp), in order
BATCH_NORM_ACT_FWD = table(
    "x:Tensor weight:Tensor? bias:Tensor? residual:Tensor? eps:float activation:int slope:float save_preact:bool"
)
BATCH_NORM_ACT_BWD = table(
    "grad_out:Tensor x:Tensor weight:Tensor? mean:Tensor invstd:Tensor act_saved:Tensor activation:int "
    "slope:float saved_is_output:bool output_mask:bool[4]"
)


def _fake_fwd(*args, **kwargs):
    a = bind(BATCH_NORM_ACT_FWD, args, kwargs)
    x, save_preact = a["x"], a["save_preact"]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x, memory_format=_memory_format(x))
    preact = torch.empty_like(out) if save_preact else x.new_empty((0,))
    stats = [x.new_empty((x.shape[1],), dtype=stat_dtype) for _ in range(3)]
    return (out, *stats, preact)


def _fake_bwd(*args, **kwargs):
    a = bind(BATCH_NORM_ACT_BWD, args, kwargs)
    x, weight, output_mask = a["x"], a["weight"], a["output_mask"]
    fmt = _memory_format(x)
    param_dtype = weight.dtype if weight is not None else x.dtype
    wanted = (
        torch.empty_like(x, memory_format=fmt),
        x.new_empty((x.shape[1],), dtype=param_dtype),
        x.new_empty((x.shape[1],), dtype=param_dtype),
        torch.empty_like(x, memory_format=fmt),
    )
    return tuple(g if m else x.new_empty((0,)) for g, m in zip(wanted, output_mask, strict=True))


if _extension.loaded():
    torch.library.register_fake("bmkernels::batch_norm_act_fwd")(_fake_fwd)
    torch.library.register_fake("bmkernels::batch_norm_act_bwd")(_fake_bwd)
