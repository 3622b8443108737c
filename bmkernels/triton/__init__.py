"""Triton kernels, registered with torch.library.triton_op. Importing this package needs triton.

One module per op family (bmkernels/triton/<op>.py); each is imported only when its kernels are
first asked for, so that TRITON_INTERPRET can still be set before triton is imported."""

# Op families with a Triton kernel; each lands with its module here (bmkernels/triton/<op>.py).
OPS = frozenset({"attention", "conv2d", "gru"})
# the module of each op family whose name (the one bmkernels/ops passes to _backend.choose) differs from it
MODULES = {"conv2d": "conv"}


def module_name(op):
    """The module of op family `op`'s kernels."""
    return f"bmkernels.triton.{MODULES.get(op, op)}"
