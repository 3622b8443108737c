"""Triton kernels, registered with torch.library.triton_op. Importing this package needs triton."""

# Op families with a Triton kernel; each lands with its module here (bmkernels/triton/<op>.py).
OPS = frozenset()
