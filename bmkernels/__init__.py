"""bmkernels: fused attention, conv2d and GRU kernels for PyTorch (CPU C++, CUDA C++, Triton)."""

from typing import Any

import torch

from bmkernels import _backend, _extension
from bmkernels.ops.attention import attention, dropout_keep_mask, scaled_dot_product_attention
from bmkernels.ops.batch_norm import batch_norm_act
from bmkernels.ops.conv import conv2d, fold_batchnorm
from bmkernels.ops.gru import gru, gru_cell

__version__ = "0.1.0"
__all__ = [
    "attention",
    "build_info",
    "cpu_cache_bytes",
    "dropout_keep_mask",
    "empty_cache",
    "scaled_dot_product_attention",
]
__all__ += ["batch_norm_act", "conv2d", "fold_batchnorm"]
__all__ += ["gru", "gru_cell"]


def build_info() -> dict[str, Any]:
    """What this installation can run: compiled CPU instruction sets and the active one, CUDA
    archs and kernels (empty for a CPU-only build), Triton, and the torch/CUDA versions."""
    return {
        "version": __version__,
        "extension_loaded": _extension.loaded(),
        "cpu_isas": _extension.compiled_cpu_isas(),
        "active_cpu_isa": _extension.active_cpu_isa(),
        "cuda_archs": _extension.compiled_cuda_archs(),
        "cuda_kernels": _extension.cuda_kernels(),
        "cuda_verified": sorted(_backend.CUDA_VERIFIED),
        "cuda_emulated_kernels": _extension.emulated_kernels(),
        "triton_available": _backend.triton_available(),
        "triton_kernels": sorted(_backend.triton_ops()),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device_available": torch.cuda.is_available(),
    }


def cpu_cache_bytes() -> int:
    """Bytes the CPU kernels' buffer pool holds in freed blocks (kept for the next call of the same size:
    a fresh multi-megabyte buffer page-faults in on every call; cap BMK_CPU_CACHE_MB, default 1024)."""
    return _extension._C.cpu_cache_bytes() if _extension.loaded() else 0


def empty_cache() -> None:
    """Frees the blocks the CPU kernels' buffer pool holds (as torch.cuda.empty_cache does for CUDA)."""
    if _extension.loaded():
        _extension._C.empty_cpu_cache()


# Drop-in modules (bmkernels.nn) and swapping them into existing models (bmkernels.swap).
from bmkernels import nn  # noqa: E402
from bmkernels.integrations.sdpa import sdpa_mode  # noqa: E402
from bmkernels.swap import SwapReport, swap_modules, to_torch, unswap  # noqa: E402

__all__ += ["SwapReport", "nn", "sdpa_mode", "swap_modules", "to_torch", "unswap"]
