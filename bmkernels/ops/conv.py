"""bmkernels.conv2d and bmkernels.fold_batchnorm: argument checks, backend choice, and the fake
kernels of the torch.ops.bmkernels.conv2d_* operators. Autograd of conv2d_fwd is registered in C++
(csrc/autograd/conv.cpp); the Python backward below serves the Triton operator.

Memory: the forward saves x, weight and one output-sized tensor for the activation's derivative:
the output itself for None / relu / leaky_relu with a positive slope (the derivative can be read off
it), else the pre-activation, which the kernel writes in the same pass as the output.
"""

import copy
import math

import torch

from bmkernels import _backend, _extension
from bmkernels.ops._common import bind, call_args, check_tensor, forward_op, same_device_or_fail, table, tensor_names
from bmkernels.reference import conv as reference

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# codes of bmk::Activation (csrc/common/activations.h)
_ACTIVATION_CODES = {
    None: 0,
    "relu": 1,
    "leaky_relu": 2,
    "gelu": 3,
    "gelu_tanh": 4,
    "silu": 5,
    "relu6": 6,
    "hardswish": 7,
}


def _fail(cls, message):
    raise cls(f"conv2d: {message}")


def _pair(name, value, minimum):
    """An int or a pair of ints, each >= minimum, as a pair."""
    if type(value) is int and value >= minimum:  # the common cases first: this runs on every call
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        if value[0] >= minimum and value[1] >= minimum:
            return value
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        _fail(TypeError, f"{name} must be an int or a pair of ints; got {value!r}")
    if min(pair) < minimum:
        _fail(ValueError, f"{name} must be >= {minimum}; got {value!r}")
    return tuple(pair)


def _padding(padding, kernel, stride, dilation):
    """(top, bottom, left, right) from an int, a pair, "valid" or "same" (extra on the bottom/right, as torch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            _fail(ValueError, f"padding must be an int, a pair, 'same' or 'valid'; got {padding!r}")
        if stride != (1, 1):
            _fail(ValueError, f"padding='same' needs stride 1; got stride {stride}")
        pads = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = _pair("padding", padding, 0)
    return (ph, ph, pw, pw)


def _activation(activation):
    """(code, slope) of an activation spec: None, a name, or ("leaky_relu", slope)."""
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "leaky_relu":
        slope = activation[1]
        if not (isinstance(slope, (int, float)) and not isinstance(slope, bool) and math.isfinite(slope)):
            _fail(ValueError, f"the leaky_relu slope must be a finite number; got {slope!r}")
        return _ACTIVATION_CODES["leaky_relu"], float(slope)
    if not isinstance(activation, (str, type(None))) or activation not in _ACTIVATION_CODES:
        _fail(
            ValueError,
            f"activation must be one of {list(_ACTIVATION_CODES)} or ('leaky_relu', slope); got {activation!r}",
        )
    return _ACTIVATION_CODES[activation], reference.DEFAULT_LEAKY_SLOPE


def _derivative_from_output(code, slope):
    """Mirrors bmk::derivative_from_output: act'(z) readable from act(z)."""
    return code in (0, 1) or (code == 2 and slope > 0)


def _memory_format(x):
    """channels_last when x is laid out so (and not also plain contiguous), as the kernel decides."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_dtype(dtype, name):
    """The dtypes beyond float32 / bfloat16 that backend `name` takes: float64 (not the CUDA kernels),
    float16 (Triton and the CUDA kernels)."""
    cuda = name in ("cuda", "cuda_emulated")
    if dtype == torch.float64 and cuda:
        _fail(TypeError, f"x must be float16, bfloat16 or float32 on backend '{name}'; got {dtype}")
    if dtype not in _DTYPES and not (dtype == torch.float16 and (cuda or name == "triton")):
        _fail(
            TypeError,
            f"x must be float32, float64 or bfloat16 (float16 on backend='triton', 'cuda', 'cuda_emulated'); "
            f"got {dtype}",
        )


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    activation: str | tuple[str, float] | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual) in one pass.

    x: (N, C_in, H, W) or unbatched (C_in, H, W), float32 / float64 / bfloat16 (float32 accumulation
    for bfloat16; float16 too on backend="triton", "cuda" and "cuda_emulated", float64 not on the last two),
    NCHW or channels_last: the output keeps x's memory format.
    weight: (C_out, C_in / groups, kH, kW); bias: (C_out,) or None; stride, padding, dilation,
    groups as in torch.nn.functional.conv2d (padding also "same" / "valid").
    residual: a tensor of the output's shape, added before the activation (a ResNet block).
    activation: None, "relu", "gelu", "gelu_tanh", "silu", "leaky_relu" (slope 0.01),
    ("leaky_relu", slope), "relu6" or "hardswish" (torch's gradients at the kinks).
    Returns (N, C_out, H_out, W_out) (or unbatched) in x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() not in (3, 4):
        _fail(ValueError, f"x must be 4-D (N, C, H, W) or 3-D unbatched (C, H, W); got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES or x.dtype == torch.float64:
        _check_dtype(x.dtype, _backend.choose("conv2d", x.device, backend))
    check_tensor("conv2d", "weight", weight, x, "x")
    if weight.dim() != 4:
        _fail(ValueError, f"weight must be 4-D (C_out, C_in / groups, kH, kW); got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1 or min(weight.shape[2:]) < 1:
        _fail(
            ValueError,
            f"weight must have C_out >= 1 and a kernel of at least 1x1 (as torch); got shape {tuple(weight.shape)}",
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        _fail(ValueError, f"groups must be a positive int; got {groups!r}")
    in_c, out_c = x.shape[-3], weight.shape[0]
    if in_c % groups or out_c % groups:
        _fail(
            ValueError, f"groups ({groups}) must divide the input channels ({in_c}) and the output channels ({out_c})"
        )
    if weight.shape[1] * groups != in_c:
        _fail(
            ValueError,
            f"weight {tuple(weight.shape)} expects {weight.shape[1] * groups} input channels "
            f"(C_in / groups = {weight.shape[1]}, groups = {groups}); x {tuple(x.shape)} has {in_c}",
        )
    if bias is not None:
        check_tensor("conv2d", "bias", bias, x, "x")
        if tuple(bias.shape) != (out_c,):
            _fail(ValueError, f"bias must have shape (C_out,) = ({out_c},); got {tuple(bias.shape)}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    kernel = tuple(weight.shape[2:])
    pads = _padding(padding, kernel, stride, dilation)
    *_, out_channels, out_h, out_w = output_shape((1, *x.shape[-3:]), weight.shape, stride, pads, dilation)
    out_hw = (out_h, out_w)
    if min(out_hw) <= 0:
        _fail(
            ValueError,
            f"output size {out_hw} must be positive: input {tuple(x.shape[-2:])}, kernel {kernel}, "
            f"padding {pads} (top, bottom, left, right), stride {stride}, dilation {dilation}",
        )
    out_shape = (*x.shape[:-3], out_channels, *out_hw)
    if residual is not None:
        check_tensor("conv2d", "residual", residual, x, "x")
        if tuple(residual.shape) != out_shape:
            _fail(ValueError, f"residual must have the output's shape {out_shape}; got {tuple(residual.shape)}")
    code, slope = _activation(activation)

    name = _backend.choose("conv2d", x.device, backend)
    if name == "reference":
        return reference.conv2d(
            x, weight, bias, stride, padding, dilation, groups, activation=activation, residual=residual
        )
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    save_preact = needs_grad and not _derivative_from_output(code, slope)
    out, _ = forward_op("conv2d_fwd", name)(
        x, weight, bias, residual, stride, pads, dilation, groups, code, slope, save_preact
    )
    return out.squeeze(0) if unbatched else out


def fold_batchnorm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """A copy of `conv` (torch.nn.Conv2d) with the eval-mode `bn` (torch.nn.BatchNorm2d) folded in:
    fused(x) == bn(conv(x)). Computed in float64 and rounded once to the conv's dtype."""
    if not isinstance(conv, torch.nn.Conv2d):
        raise TypeError(f"fold_batchnorm: conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
    if not isinstance(bn, torch.nn.BatchNorm2d):
        raise TypeError(f"fold_batchnorm: bn must be a torch.nn.BatchNorm2d; got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fold_batchnorm: bn has {bn.num_features} features; the conv has {conv.out_channels} output channels"
        )
    if bn.training or bn.running_mean is None:
        raise ValueError(
            "fold_batchnorm: bn must be in eval mode with running statistics (call bn.eval(); "
            "track_running_stats=True): a training-mode BatchNorm normalizes with batch statistics, "
            "which no fixed weight can fold"
        )
    with torch.no_grad():
        dtype = conv.weight.dtype
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = -bn.running_mean.double() if conv.bias is None else conv.bias.double() - bn.running_mean.double()
        bias = bias * scale + (bn.bias.double() if bn.bias is not None else 0.0)
        fused = copy.deepcopy(conv)
        fused.weight = torch.nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
        fused.bias = torch.nn.Parameter(bias.to(dtype))
    return fused


def engine_choices() -> dict[str, str]:
    """{shape key: "bmkernels" | "aten"}: the engine each CPU conv2d shape runs (BMK_CONV_ENGINE=auto
    times both on a key's first call and keeps the faster; see docs/conv.md)."""
    return _extension._C.conv_engine_choices() if _extension.loaded() else {}


def clear_engine_choices() -> None:
    """Forgets the engine choices: the next call of each shape times both engines again."""
    if _extension.loaded():
        _extension._C.clear_conv_engine_choices()


def output_shape(x_shape, weight_shape, stride, padding, dilation):
    """(N, C_out, H_out, W_out) of x (N, C_in, H, W) convolved with weight (C_out, C_in / groups, kH, kW),
    padding (top, bottom, left, right); x with 0 channels gives torch's result, (N, 0, H_out, W_out)."""
    out_hw = (
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, lo, hi, k, s, d in zip(
            x_shape[2:], padding[0::2], padding[1::2], weight_shape[2:], stride, dilation, strict=True
        )
    )
    return (x_shape[0], weight_shape[0] if x_shape[1] else 0, *out_hw)


# the schemas of conv2d_fwd / conv2d_bwd (csrc/registration.cpp), in order
CONV2D_FWD = table(
    "x:Tensor weight:Tensor bias:Tensor? residual:Tensor? stride:int[2] padding:int[4] dilation:int[2] groups:int "
    "activation:int slope:float save_preact:bool"
)
CONV2D_BWD = table(
    "grad_out:Tensor x:Tensor weight:Tensor act_saved:Tensor stride:int[2] padding:int[4] dilation:int[2] "
    "groups:int activation:int slope:float saved_is_output:bool output_mask:bool[4]"
)


def _fake_fwd(*args, **kwargs):
    a = bind(CONV2D_FWD, args, kwargs)
    x, weight = a["x"], a["weight"]
    same_device_or_fail("conv2d", *(a[n] for n in tensor_names(CONV2D_FWD)))
    out_shape = output_shape(x.shape, weight.shape, a["stride"], a["padding"], a["dilation"])
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    preact = torch.empty_like(out) if a["save_preact"] else x.new_empty((0,))
    return out, preact


def _fake_bwd(*args, **kwargs):
    a = bind(CONV2D_BWD, args, kwargs)
    x, weight = a["x"], a["weight"]
    same_device_or_fail("conv2d", *(a[n] for n in tensor_names(CONV2D_BWD)))
    fmt = _memory_format(x)
    out_shape = output_shape(x.shape, weight.shape, a["stride"], a["padding"], a["dilation"])
    wanted = (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(weight, memory_format=fmt),  # as a channels_last model's weights: no copy in AccumulateGrad
        weight.new_empty((weight.shape[0],)),
        torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt),
    )
    return tuple(g if m else x.new_empty((0,)) for g, m in zip(wanted, a["output_mask"], strict=True))


def _setup_context(ctx, inputs, output):
    """Saves x, weight and what the activation's derivative reads (the output or the pre-activation);
    keeps the scalars by name."""
    a = bind(CONV2D_FWD, inputs)
    out, preact = output
    from_output = _derivative_from_output(a["activation"], a["slope"])
    ctx.save_for_backward(a["x"], a["weight"], out if from_output else preact)
    ctx.scalars = {n: value for n, value in a.items() if n not in tensor_names(CONV2D_FWD)}
    ctx.scalars["saved_is_output"] = from_output
    ctx.has_bias, ctx.has_residual = a["bias"] is not None, a["residual"] is not None


def backward_with(bwd_op):
    """The autograd backward of a conv2d_fwd-shaped operator whose gradients come from bwd_op
    (conv2d_bwd's signature): the Triton operator's (the C++ operator's is csrc/autograd/conv.cpp). The
    backward's arguments are the forward's, by name (CONV2D_BWD), plus the gradient, the saved activation
    and the mask."""

    def backward(ctx, grad_out, grad_preact):
        x, weight, act_saved = ctx.saved_tensors
        if not ctx.scalars["saved_is_output"] and act_saved.shape != grad_out.shape:
            # an empty batch's saved pre-activation is empty too
            raise RuntimeError(
                "conv2d: backward needs the pre-activation, which the forward did not save (it ran "
                "without any input requiring grad)"
            )
        mask = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
            ctx.has_residual and ctx.needs_input_grad[3],
        ]
        values = ctx.scalars | {"grad_out": grad_out, "x": x, "weight": weight, "act_saved": act_saved}
        dx, dw, db, dres = bwd_op(*call_args(CONV2D_BWD, values | {"output_mask": mask}))
        grads = [g if m else None for g, m in zip((dx, dw, db, dres), mask, strict=True)]
        return (*grads, *([None] * (len(CONV2D_FWD) - 4)))

    return backward


if _extension.loaded():
    for fwd, bwd in (("conv2d_fwd", "conv2d_bwd"), ("conv2d_emulated_fwd", "conv2d_emulated_bwd")):
        torch.library.register_fake(f"bmkernels::{fwd}")(_fake_fwd)
        torch.library.register_fake(f"bmkernels::{bwd}")(_fake_bwd)
