"""Test helpers of bmkernels, public so downstream kernels can be held to the same bar: input makers and
the tolerance rule.

Tolerance rule (the project's DESIGN.md, "Tests — what correct means"): ground truth is the reference run in
float64 on the same inputs (upcast). PyTorch's own error is the same reference run eagerly in the
test dtype, measured against that truth. A kernel result passes when

    max|kernel - truth| <= 2 * max|torch_same_dtype - truth| + floor

with floor = FLOOR[dtype] * max(max|truth|, 1): relative to the compared tensor's magnitude, but
never below the inputs' unit scale (every test draws O(1) inputs). Where the truth is identically 0
because terms cancel exactly (dq and dk when each query sees a single key: softmax is constant
there), the floor's unit is the largest magnitude among the truths of that check (out and every
gradient): the kernel's dS = P (dP - delta) then rounds at the scale of dP and delta, not to 0,
while PyTorch's softmax backward happens to cancel exactly. The rule adapts to dtype, length and
head dim instead of a magic atol. Float64 kernels are held to a plain tight tolerance instead
(the float64 reference *is* the truth, so PyTorch's error there is 0).
"""

import math
import pathlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FLOOR",
    "FLOAT64_TOL",
    "float64_tolerance",
    "max_abs_diff",
    "magnitude",
    "assert_within_rule",
    "check_against_reference",
    "make_qkv",
    "cpu_supports",
    "random_batchnorm_statistics",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Floors, in units of max(max|truth|, 1) of the compared tensor:
# - float32: 1e-6 (~8 ulp): a fused kernel sums in another order than torch's GEMMs and uses a
#   vectorized exp, so a few ulp of difference is legitimate even where eager torch is exact.
# - bfloat16 / float16: one ulp at the tensor's magnitude (finfo.eps: 7.8e-3 / 9.8e-4). A kernel
#   that computes in float32 still rounds its result to the dtype once (up to half an ulp), and a
#   tensor of mostly representable values can make PyTorch's own error near 0.
# - float64: 1e-10 absolute-or-relative, as a plain tolerance (see float64_tolerance).
FLOOR = {
    torch.float32: 1e-6,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}
FLOAT64_TOL = 1e-10


def float64_tolerance(magnitude: float) -> float:
    return FLOAT64_TOL * max(1.0, magnitude)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over finite entries of b (the truth); inf where a is non-finite there or where
    the non-finite entries of a and b differ."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    finite = torch.isfinite(b)
    # non-finite entries must match exactly: NaN for NaN (NaN != NaN, hence nan_to_num), inf with its sign
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(
        a[~finite].nan_to_num(0.0, math.inf, -math.inf), b[~finite].nan_to_num(0.0, math.inf, -math.inf)
    ):
        return float("inf")
    if a.numel() == 0 or not finite.any():
        return 0.0
    return (a[finite] - b[finite]).abs().max().item()


def magnitude(t: torch.Tensor) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def assert_within_rule(
    what: str,
    got: torch.Tensor,
    truth: torch.Tensor,
    same_dtype: torch.Tensor,
    dtype: torch.dtype,
    problem_scale: float = 1.0,
) -> None:
    """The tolerance rule for one tensor: got (kernel), truth (float64 reference), same_dtype
    (reference in `dtype`). problem_scale: the floor's unit where the truth is identically 0."""
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    err = max_abs_diff(got, truth)
    mag = magnitude(truth) or problem_scale
    if dtype == torch.float64:
        tol = float64_tolerance(mag)
        assert err <= tol, f"{what} (float64): max error {err:.3e} > {tol:.1e}"
        return
    torch_err = max_abs_diff(same_dtype, truth)
    if torch_err == float("inf"):  # PyTorch's own low-precision math broke down (overflow): floor only
        torch_err = 0.0
    bound = 2 * torch_err + FLOOR[dtype] * max(mag, 1.0)
    assert err <= bound, (
        f"{what} ({dtype}): kernel error {err:.3e} > 2 x torch error {torch_err:.3e} "
        f"+ floor {FLOOR[dtype]:.1e} x max(magnitude {mag:.3e}, 1) = {bound:.3e}"
    )


def _detached(inputs, dtype=None):
    """Fresh leaves of the float inputs (same strides, optionally cast), with their requires_grad;
    everything else (bool masks, ints, None) as is."""
    out = {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            c = t.detach() if dtype is None else t.detach().to(dtype)
            out[name] = c.requires_grad_(t.requires_grad)
        else:
            out[name] = t
    return out


def _forward(fn, inputs):
    result = fn(**inputs)
    return result if isinstance(result, tuple) else (result, None)


def _backward(inputs, out, lse, grad_out, grad_lse):
    """Gradients of sum(out * grad_out) (+ sum(lse * grad_lse)) for every input requiring grad."""
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if not names:
        return {}
    loss = (out * grad_out.to(out.device, out.dtype)).sum()
    if grad_lse is not None:
        loss = loss + (lse * grad_lse.to(lse.device, lse.dtype)).sum()
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names]), strict=True))


def check_against_reference(
    kernel_fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    inputs: dict[str, Any],
    dtype: torch.dtype,
    *,
    lse_grad: bool = False,
    seed: int = 1234,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Runs kernel_fn and reference_fn on `inputs` (a dict of keyword arguments; float tensors that
    require grad get gradients), and holds out, lse (if returned) and every gradient to the
    tolerance rule against reference_fn in float64. lse_grad: the loss also uses lse (rows with no
    visible key would make that loss -inf: use it without them).
    Returns the kernel's (out, lse, grads) for further checks."""
    kernel_inputs = _detached(inputs)
    truth_inputs = _detached(inputs, torch.float64)
    same_inputs = _detached(inputs)
    k_out, k_lse = _forward(kernel_fn, kernel_inputs)
    t_out, t_lse = _forward(reference_fn, truth_inputs)
    s_out, s_lse = _forward(reference_fn, same_inputs)
    # incoming gradients rounded to the test dtype, so all three runs see exactly the same values
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(k_out.shape, generator=gen).to(dtype)
    grad_lse = torch.randn(k_lse.shape, generator=gen).to(dtype) if lse_grad else None
    k_grads = _backward(kernel_inputs, k_out, k_lse, grad_out, grad_lse)
    t_grads = _backward(truth_inputs, t_out, t_lse, grad_out, grad_lse)
    s_grads = _backward(same_inputs, s_out, s_lse, grad_out, grad_lse)
    scale = max([1.0, magnitude(t_out)] + [magnitude(g) for g in t_grads.values()])
    assert k_out.dtype == dtype, f"out dtype {k_out.dtype}, expected {dtype}"
    assert_within_rule("out", k_out, t_out, s_out, dtype, scale)
    assert (k_lse is None) == (t_lse is None)
    if k_lse is not None:
        assert k_lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), k_lse.dtype
        assert_within_rule("lse", k_lse, t_lse, s_lse.to(t_lse.dtype), dtype, scale)
    assert set(k_grads) == set(t_grads)
    for name in k_grads:
        assert k_grads[name].dtype == inputs[name].dtype, f"grad of {name} has dtype {k_grads[name].dtype}"
        assert_within_rule(f"grad {name}", k_grads[name], t_grads[name], s_grads[name], dtype, scale)
    return k_out, k_lse, k_grads


def make_qkv(
    batch: int = 2,
    q_heads: int = 2,
    kv_heads: int | None = None,
    q_len: int = 17,
    k_len: int | None = None,
    head_dim: int = 16,
    v_head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = True,
    layout: str = "contiguous",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) as leaves.
    layout="transposed": views of (B, L, H, D) storage (the usual projection layout);
    layout="sliced": views taking every other element of the last dim and a slice of the batch."""
    kv_heads = kv_heads or q_heads
    k_len = q_len if k_len is None else k_len
    v_head_dim = v_head_dim or head_dim
    gen = torch.Generator().manual_seed(seed)

    def one(heads, length, dim):
        if layout == "contiguous":
            t = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
        elif layout == "transposed":
            t = torch.randn(batch, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(batch + 1, heads, length, 2 * dim, generator=gen).to(dtype)[1:, :, :, ::2]
        else:
            raise ValueError(layout)
        return t.requires_grad_(requires_grad)

    return one(q_heads, q_len, head_dim), one(kv_heads, k_len, head_dim), one(kv_heads, k_len, v_head_dim)


def cpu_supports(isa: str) -> bool:
    """Whether this CPU runs the kernels' `isa` build (the same flags csrc/cpu/registration.cpp needs)."""
    if isa == "scalar":
        return True
    try:
        flags = set(
            next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
            .split(":", 1)[1]
            .split()
        )
    except (OSError, StopIteration):
        return False
    need = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}}[isa]
    return need <= flags


def random_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode's folding is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
