"""The one place that decides which backend runs an op: `backend=` argument > BMK_BACKEND > auto.

auto: CPU tensor -> the CPU C++ kernel; CUDA tensor -> the CUDA C++ kernel if compiled, else the
Triton kernel, else an error that says how to get one. "reference" (plain PyTorch) always works.
"cuda_emulated": the CUDA kernels run by the SIMT emulator on CPU tensors (builds with BMK_CUDA_EMULATOR=1),
for testing them without a GPU; never chosen by auto.
auto picks the CUDA C++ kernel for CUDA tensors only for ops in CUDA_VERIFIED (passed on a real GPU);
until then the GPU-tested Triton kernel runs and the CUDA kernel only when asked for (backend="cuda").
A backend asked for explicitly that cannot run raises an error naming what is missing: nothing
silently falls back to something else.
"""

import importlib.util
import os
import sys

import torch

from bmkernels import _extension

BACKENDS = ("cpu", "cuda", "triton", "reference", "cuda_emulated")

# Op families whose CUDA C++ kernel has passed its tests on a GPU (none yet: no GPU run so far).
CUDA_VERIFIED = frozenset()


def triton_available():
    return importlib.util.find_spec("triton") is not None


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_ops():
    """Op families that have a Triton kernel."""
    if not triton_available():
        return frozenset()
    from bmkernels import triton as bmk_triton

    return bmk_triton.OPS


def requested(backend):
    """The backend name asked for (argument, else BMK_BACKEND, else 'auto'), validated."""
    name = backend if backend is not None else (os.environ.get("BMK_BACKEND") or "auto")
    if name not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else "BMK_BACKEND"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS + ('auto',))}; got {name!r}")
    return name


# The choice is a plain function of its arguments, the environment and the build: torch.compile calls it
# while tracing and keeps the name, instead of tracing the probes inside (find_spec, dispatcher queries).
@torch.compiler.assume_constant_result
def choose(op, device, backend=None):
    """Backend to run op family `op` ('attention', 'conv2d', 'gru') on tensors on `device`."""
    name = requested(backend)
    kind = device.type
    if name == "auto":
        if kind == "cpu":
            name = "cpu"
        elif kind == "cuda":
            name = "cuda" if op in CUDA_VERIFIED and op in _extension.cuda_kernels() else "triton"
            if name == "triton" and op not in triton_ops() and op in _extension.cuda_kernels():
                name = "cuda"
        else:
            raise RuntimeError(f"bmkernels {op}: no backend for {kind} tensors; use backend='reference'")
        if name == "triton" and op not in triton_ops():
            raise RuntimeError(
                f"bmkernels {op}: no kernel for CUDA tensors in this build: the CUDA kernel was not compiled "
                f"(rebuild with a CUDA toolkit, BMK_FORCE_CUDA=1) and no Triton kernel is available; "
                "use backend='reference'"
            )
    if name == "cpu":
        if kind != "cpu":
            raise RuntimeError(f"bmkernels {op}: backend 'cpu' needs CPU tensors; got {kind} tensors")
        _extension.require(f"bmkernels {op} backend 'cpu'")
    elif name == "cuda":
        if kind != "cuda":
            raise RuntimeError(f"bmkernels {op}: backend 'cuda' needs CUDA tensors; got {kind} tensors")
        _extension.require(f"bmkernels {op} backend 'cuda'")
        if op not in _extension.cuda_kernels():
            raise RuntimeError(
                f"bmkernels {op}: backend 'cuda' requested but this build has no CUDA kernel "
                f"for {op} (compiled CUDA archs: {_extension.compiled_cuda_archs() or 'none'})"
            )
    elif name == "cuda_emulated":
        if kind != "cpu":
            raise RuntimeError(f"bmkernels {op}: backend 'cuda_emulated' needs CPU tensors; got {kind} tensors")
        _extension.require(f"bmkernels {op} backend 'cuda_emulated'")
        if op not in _extension.emulated_kernels():
            raise RuntimeError(
                f"bmkernels {op}: backend 'cuda_emulated' requested but this build has no emulated CUDA kernel "
                f"for {op} (build with BMK_CUDA_EMULATOR=1)"
            )
    elif name == "triton":
        if not triton_available():
            raise RuntimeError(f"bmkernels {op}: backend 'triton' requested but triton is not installed")
        if op not in triton_ops():
            raise RuntimeError(
                f"bmkernels {op}: backend 'triton' requested but bmkernels has no Triton kernel for {op} yet"
            )
        if kind == "cpu" and not triton_interpreted():
            raise RuntimeError(
                f"bmkernels {op}: backend 'triton' on CPU tensors runs only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        from bmkernels import triton as bmk_triton

        if kind == "cpu" and not getattr(sys.modules.get(bmk_triton.module_name(op)), "INTERPRETED", True):
            raise RuntimeError(
                f"bmkernels {op}: backend 'triton' on CPU tensors: TRITON_INTERPRET=1 was set after "
                "the Triton kernels were compiled for the GPU; set it before importing triton"
            )
        if kind not in ("cpu", "cuda"):
            raise RuntimeError(f"bmkernels {op}: backend 'triton' needs CUDA tensors; got {kind} tensors")
    return name
