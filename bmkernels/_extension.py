"""Loads the compiled extension bmkernels._C (which registers the torch.ops.bmkernels operators)
and says what it was built with. Importing bmkernels never fails because of it: the reference
backend works without it, and asking for a compiled backend then raises a clear error."""

import importlib

_C = None
_LOAD_ERROR = None


def _load():
    global _C, _LOAD_ERROR
    if _C is None and _LOAD_ERROR is None:
        try:
            _C = importlib.import_module("bmkernels._C")
        except ImportError as e:  # not built, or built against another torch
            _LOAD_ERROR = e
    return _C


def loaded():
    return _load() is not None


def require(what):
    """Returns the extension module, or raises saying that `what` needs it and how to build it."""
    if _load() is None:
        raise RuntimeError(
            f"{what} needs the compiled bmkernels extension, which could not be loaded ({_LOAD_ERROR}). "
            "Build it with `pip install --no-build-isolation -e .` in an environment that has torch, "
            "or use backend='reference'."
        )
    return _C


def compiled_cpu_isas():
    """CPU instruction sets the kernels were compiled for, e.g. ['scalar', 'avx2', 'avx512']."""
    return [s for s in _C.build_info()["cpu_isas"].split(",") if s] if loaded() else []


def compiled_cuda_archs():
    """CUDA architectures compiled in, e.g. ['8.0', '9.0']; [] for a CPU-only build."""
    return [s for s in _C.build_info()["cuda_archs"].split(",") if s] if loaded() else []


def cuda_kernels():
    """Op families with a compiled CUDA kernel (none until a CUDA kernel lands)."""
    if not loaded():
        return []
    import torch

    return [
        op
        for op in ("attention", "conv2d", "gru")
        if hasattr(torch.ops.bmkernels, f"{op}_fwd")
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"bmkernels::{op}_fwd", "CUDA")
    ]


def emulated_kernels():
    """Op families whose CUDA kernels the SIMT emulator runs on CPU tensors (BMK_CUDA_EMULATOR=1 builds)."""
    if not loaded():
        return []
    import torch

    # the family's emulated forward operator
    ops = {"attention": "attention_emulated_fwd", "conv2d": "conv2d_emulated_fwd", "gru": "gru_layer_emulated_fwd"}
    return [
        op
        for op, name in ops.items()
        if hasattr(torch.ops.bmkernels, name)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"bmkernels::{name}", "CPU")
    ]


def active_cpu_isa():
    return _C.active_cpu_isa() if loaded() else None
