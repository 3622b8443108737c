"""What the op files share: the forward operator of each compiled backend, the tensor-argument check, the
accumulation dtype, the fakes' device check and the argument tables (one per operator: the fakes and the
backward wiring read their arguments by name from it). Backend choice itself is bmkernels._backend.choose."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

REQUIRED = object()


class Arg(NamedTuple):
    """One schema argument of an operator: name, kind ("Tensor", "Tensor?" or the scalar's schema type) and
    default (REQUIRED when the schema has none). A table (a tuple of Arg) mirrors the schema in
    csrc/registration.cpp in order; tests/ops/test_op_tables.py checks that it does."""

    name: str
    kind: str
    default: object = REQUIRED


def table(spec: str) -> tuple[Arg, ...]:
    """An argument table from the schema's arguments written "name:kind" ("name:kind=None" for a
    default of None), space-separated."""
    rows = []
    for word in spec.split():
        name, kind = word.split(":")
        kind, _, default = kind.partition("=")
        rows.append(Arg(name, kind, None) if default == "None" else Arg(name, kind))
    return tuple(rows)


def bind(table: Sequence[Arg], args: Sequence[object], kwargs: Mapping[str, object] | None = None) -> dict[str, object]:
    """An operator call's arguments (positional, then by keyword as torch.ops passes those given so) by
    name, the missing ones at their defaults."""
    values = dict(zip((a.name for a in table), args, strict=False))
    values.update(kwargs or {})
    missing = [a.name for a in table if a.name not in values and a.default is REQUIRED]
    unknown = set(values) - {a.name for a in table}
    if len(args) > len(table) or missing or unknown:
        raise TypeError(f"expected the arguments ({', '.join(a.name for a in table)}); got {len(args)} and {kwargs}")
    return {a.name: values.get(a.name, a.default) for a in table}


def call_args(table: Sequence[Arg], values: Mapping[str, object]) -> tuple:
    """The positional arguments of a call to the operator of `table`, taken by name from `values` (the
    forward's bound arguments plus what the backward adds: one dict wires a forward to its backward)."""
    return tuple(values[a.name] for a in table)


def tensor_names(table: Sequence[Arg]) -> tuple[str, ...]:
    """The table's tensor arguments (optional ones included), in order."""
    return tuple(a.name for a in table if a.kind.startswith("Tensor"))


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
