"""What the op files share: the forward operator of each compiled backend, the tensor-argument check, the
accumulation dtype and the fakes' device check. Backend choice itself is bmkernels._backend.choose."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _triton_module(family: str):
    """bmkernels.triton's module of the family's Triton twins, imported (with triton) only when asked for;
    import statements, not importlib, so that torch.compile traces through them."""
    if family == "attention":
        from bmkernels.triton import attention as module
    elif family == "conv2d":
        from bmkernels.triton import conv as module
    else:
        from bmkernels.triton import gru as module
    return module


def forward_op(op: str, backend: str) -> Callable:
    """The forward operator `op` ("attention_fwd", "conv2d_fwd", "gru_cell_fwd", "gru_layer_fwd") of a
    compiled backend: 'cpu'/'cuda' the C++ op (the dispatcher picks the device's kernel); 'triton' its
    Triton twin in bmkernels/triton (same arguments; triton is imported only then); 'cuda_emulated' the
    CUDA kernel in the SIMT emulator (bmkernels::<op with _emulated_fwd>)."""
    if backend == "cuda_emulated":
        return getattr(torch.ops.bmkernels, op.replace("_fwd", "_emulated_fwd"))
    if backend == "triton":
        return getattr(_triton_module(op.split("_")[0]), op)
    return getattr(torch.ops.bmkernels, op)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype (of lse, workspaces, bias gradients): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(op: str, name: str, t: object, like: torch.Tensor | None = None, like_name: str = "the input") -> None:
    """`t` is a tensor and, given `like`, has like's dtype and device (the messages call it like_name)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if like is None:
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have {like_name}'s dtype {like.dtype}; got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like_name}'s device {like.device}; got {t.device}")


def same_device_or_fail(family, *tensors):
    """The fake kernels refuse tensors on different devices, as the real kernels (and torch's meta
    functions) do, instead of allocating on the first one's device (None entries are absent optionals)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"bmkernels {family}: all tensors must be on one device; got {sorted(map(str, devices))}")
