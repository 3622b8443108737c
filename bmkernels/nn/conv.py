"""bmkernels.nn.Conv2d: torch.nn.Conv2d running bmkernels.conv2d (bias and activation fused).

A subclass of torch.nn.Conv2d: same constructor (every padding_mode: zeros, reflect, replicate,
circular; padding as an int, a pair, "same" or "valid"), forward, parameters and state_dict, so
`load_state_dict` works both ways and `isinstance(m, nn.Conv2d)` stays true. Extra keyword-only
arguments: activation= (None, "relu", "silu", "gelu", "gelu_tanh", "leaky_relu", ("leaky_relu",
slope), "relu6" or "hardswish"), applied in the same pass as the convolution, and backend= (None = auto).

The non-zeros padding modes pad first with torch.nn.functional.pad, exactly as torch.nn.Conv2d
does, then convolve without padding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bmkernels import _backend, _extension
from bmkernels.nn._convert import rebuild
from bmkernels.ops.conv import (
    _ACTIVATION_CODES,
    _DTYPES,
    _activation,
    _derivative_from_output,
    _padding,
    _pair,
    conv2d,
    fold_batchnorm,
)

_CONV2D_FWD = torch.ops.bmkernels.conv2d_fwd.default if _extension.loaded() else None


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d with the convolution, bias and an optional activation in bmkernels.conv2d."""

    family = "conv"
    torch_class = torch.nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str | tuple[str, float] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        _activation(activation)  # a clear error for a bad activation now, not at the first forward
        _backend.requested(backend)
        self.activation = activation
        self.backend = backend

    def _ctor_kwargs(self):
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
        )

    @classmethod
    def swap_blocker(cls, module: torch.nn.Module) -> str | None:
        """Why `module` (a torch.nn.Conv2d) cannot be swapped, or None."""
        if type(module) is not torch.nn.Conv2d:
            return f"{type(module).__name__} subclasses nn.Conv2d; its forward may differ from torch's, so it is kept"
        if module.weight.dtype not in _DTYPES:
            return f"dtype {module.weight.dtype} (bmkernels.conv2d runs float32, float64 and bfloat16)"
        try:
            _backend.choose("conv2d", module.weight.device)
        except RuntimeError as e:
            return str(e)
        return None

    @classmethod
    def from_torch(
        cls, module: torch.nn.Module, *, activation: str | tuple[str, float] | None = None, backend: str | None = None
    ) -> Conv2d:
        """A bmkernels Conv2d sharing `module`'s parameters (the same Parameter objects), device,
        dtype, train/eval mode and hooks."""
        return rebuild(module, cls, cls._ctor_kwargs(module), activation=activation, backend=backend)

    def to_torch(self) -> torch.nn.Module:
        """The torch.nn.Conv2d twin, sharing this module's parameters. A module with an activation
        has no single torch.nn.Conv2d twin: it raises."""
        if self.activation is not None:
            raise ValueError(
                f"bmkernels Conv2d with activation={self.activation!r} has no torch.nn.Conv2d twin "
                "(use torch.nn.Sequential(conv, activation))"
            )
        return rebuild(self, torch.nn.Conv2d, self._ctor_kwargs())

    def backend_in_use(self) -> str:
        try:
            return _backend.choose("conv2d", self.weight.device, self.backend)
        except RuntimeError as e:
            return f"unavailable ({e})"

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s + f", backend={self.backend_in_use()}"

    def conv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        activation: str | tuple[str, float] | None = None,
        residual: torch.Tensor | None = None,
        private: bool = False,
    ) -> torch.Tensor:
        """act(conv(x, weight) + bias + residual) with this module's geometry and padding mode (the
        fused blocks call it with BatchNorm-folded weights). private=True: the caller only reads the
        result (no copy for in-place safety, see below)."""
        args, code, slope, from_output = self._parsed(activation)
        if self._runs_cpu_op(x, weight, bias, residual):
            # bmkernels.conv2d's checks hold by construction here (the C++ operator checks the rest)
            needs_grad = torch.is_grad_enabled() and (
                x.requires_grad
                or weight.requires_grad
                or (bias is not None and bias.requires_grad)
                or (residual is not None and residual.requires_grad)
            )
            out = _CONV2D_FWD(x, weight, bias, residual, *args, needs_grad and not from_output)[0]
        else:
            padding = self.padding
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                padding = 0
            out = conv2d(
                x,
                weight,
                bias,
                self.stride,
                padding,
                self.dilation,
                self.groups,
                activation=activation,
                residual=residual,
                backend=self.backend,
            )
        if not private and out.requires_grad and code != _ACTIVATION_CODES["relu"] and from_output:
            # the op keeps its output for backward even where the math does not need it (no activation,
            # leaky_relu), while torch's conv / BatchNorm output may be overwritten in place by the caller
            # (torchvision's `result += input`): hand out a copy, as free to modify as torch's
            out = out.clone()
        return out

    def _parsed(self, activation):
        """(conv2d_fwd's stride, padding, dilation, groups, activation code and slope; the code; the
        slope; whether act' is read off the output) for this module's geometry and `activation`, parsed
        once per module: on small CNNs the per-call Python work of every layer adds up to percents."""
        key = (self.stride, self.padding, self.dilation, self.groups, self.kernel_size, activation)
        cached = self.__dict__.get("_bmkernels_parsed")
        if cached is None or cached[0] != key:
            code, slope = _activation(activation)
            stride, dilation = _pair("stride", self.stride, 1), _pair("dilation", self.dilation, 1)
            padding = _padding(self.padding, self.kernel_size, stride, dilation) if self.padding_mode == "zeros" else 0
            args = (stride, padding, dilation, self.groups, code, slope)
            cached = (key, (args, code, slope, _derivative_from_output(code, slope)))
            self.__dict__["_bmkernels_parsed"] = cached
        return cached[1]

    def _runs_cpu_op(self, x, weight, bias, residual):
        """Whether this call goes straight to the CPU operator: batched CPU input in the weight's
        dtype with the channels it expects, zeros padding, the CPU backend, not being compiled."""
        return (
            x.is_cpu
            and weight.is_cpu
            and self.padding_mode == "zeros"
            and x.dim() == 4
            and x.dtype == weight.dtype
            and x.dtype in _DTYPES
            and x.shape[1] == weight.shape[1] * self.groups
            and (bias is None or (bias.dtype == x.dtype and bias.is_cpu))
            and (residual is None or (residual.dtype == x.dtype and residual.is_cpu))
            and not torch.compiler.is_compiling()
            and self._cpu_backend()
        )

    def _cpu_backend(self):
        """Whether _backend.choose picks 'cpu' for CPU tensors, cached per (backend=, BMK_BACKEND)."""
        key = (self.backend, os.environ.get("BMK_BACKEND"))
        cached = self.__dict__.get("_bmkernels_cpu_backend")
        if cached is None or cached[0] != key:
            cached = (key, _backend.choose("conv2d", torch.device("cpu"), self.backend) == "cpu")
            self.__dict__["_bmkernels_cpu_backend"] = cached
        return cached[1]

    def weights_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for a call on x: the parameters themselves, or, without grad on a
        channels_last x, the cached channels_last copy of eval_weights."""
        params = _tensors(self, ("weight", "bias"))
        if x.dim() != 4 or not _channels_last(x) or _channels_last(params[0]) or torch.compiler.is_compiling():
            return params
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return params
        return self.eval_weights(x)

    def eval_weights(
        self, x: torch.Tensor, bn: torch.nn.BatchNorm2d | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for a call without grad on x: the eval-mode BatchNorm `bn` (running
        statistics) folded in (bmkernels.fold_batchnorm's float64 math), the weight in x's memory
        format (oneDNN would reorder an NCHW weight on every channels_last call). Cached on the module
        and recomputed only when a parameter, statistic or x's layout changed (each tensor's identity,
        version counter and storage are the key: in-place updates bump the version, .data / .to()
        / load_state_dict(assign=True) change the storage or the tensor); costs one weight-sized copy.
        The key is ints only, built in about a microsecond: it runs on every eval call."""
        fmt = torch.channels_last if x.dim() == 4 and _channels_last(x) else torch.contiguous_format
        tensors = _tensors(self, ("weight", "bias"))
        if bn is not None:
            tensors += _tensors(bn, ("weight", "bias", "running_mean", "running_var"))
        key = (
            fmt,
            None if bn is None else bn.eps,
            *[-1 if t is None else (id(t), t._version, t.data_ptr()) for t in tensors],
        )
        cached = self.__dict__.get("_bmkernels_eval_cache")
        if cached is None or cached[0] != key:
            self.__dict__.pop("_bmkernels_eval_cache", None)  # stale; fold_batchnorm copies the module
            with torch.no_grad():
                weight, bias = (self.weight, self.bias) if bn is None else _fold(self, bn)
                weight = weight.detach().contiguous(memory_format=fmt)
                # the key's tensors and their storages (aliases) live as long as it: no id or address reuse
                alive = (tensors, [t.detach() for t in tensors if t is not None])
                cached = (key, weight, None if bias is None else bias.detach(), alive)
            self._bmkernels_eval_cache = cached
        return cached[1], cached[2]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.conv(input, *self.weights_for(input), activation=self.activation)


def _channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _tensors(module, names):
    """The parameters / buffers `names` of `module`, as module.<name> gives them, without
    nn.Module.__getattr__ (~0.5 us each: per eval call that is most of a tiny layer's Python time).
    A name that is neither (e.g. a parametrization's property) falls back to getattr."""
    params, buffers = module._parameters, module._buffers
    return tuple([params[n] if n in params else buffers[n] if n in buffers else getattr(module, n) for n in names])


def _fold(conv, bn):
    folded = fold_batchnorm(conv, bn)
    return folded.weight, folded.bias
