"""Hostile inputs to attention, through the public function and the raw operators: each gets a clear
error naming the argument (or torch's result for a legal edge case), never a crash, an
out-of-bounds read or silent garbage. Crash cases run in a subprocess, so a regression shows up as
a failed test rather than a dead test run."""

import subprocess
import sys
import textwrap

import pytest
import torch

import bmkernels
from bmkernels.reference import attention as reference
from bmkernels.testing import make_qkv
from tests.ops.test_attention import _op_args


def _fwd_args(q, k, v, **changes):
    return _op_args(q=q, k=k, v=v, scale=0.5, **changes)


def _run_isolated(code):
    """Runs code in a fresh interpreter: returns (returncode, stderr)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


@pytest.mark.slow
def test_zero_heads_forward_and_backward_do_not_crash():
    """0 heads: empty results and gradients (a division by the group size used to kill the process)."""
    code, err = _run_isolated(
        """
        import torch, bmkernels
        q = torch.randn(2, 0, 5, 8, requires_grad=True)
        out, lse = torch.ops.bmkernels.attention_fwd(q, q, q, None, None, None, None, 0.5, 0.0, -1, -1, 0, 0.0)
        out.sum().backward()
        assert out.shape == (2, 0, 5, 8) and q.grad.shape == q.shape
        dq, dk, dv, _ = torch.ops.bmkernels.attention_bwd(out, q, q, q, out, lse, None, None, None, None, None, 0.5,
                                                          0.0, -1, -1, 0, 0.0, False)
        assert dq.shape == q.shape
        print("ok")
        """
    )
    assert code == 0, err[-2000:]


@pytest.mark.parametrize(
    "name,value",
    [
        ("bias", torch.zeros(3, 1, 1, 1)),
        ("bias", torch.zeros(5, 7, 2)),
        ("mask", torch.ones(1, 1, 9, dtype=torch.bool)),
        ("mask", torch.ones(2, 3, 5, 6, dtype=torch.bool)),
    ],
)
def test_raw_operator_names_a_bias_or_mask_that_does_not_broadcast(name, value):
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=5, k_len=7, head_dim=4, requires_grad=False)
    with pytest.raises(RuntimeError, match=f"{name} of shape .* cannot broadcast to the score grid"):
        torch.ops.bmkernels.attention_fwd(*_fwd_args(q, k, v, **{name: value}))


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 2, 2)])
def test_raw_operator_names_wrong_alibi_shapes(shape):
    q, k, v = make_qkv(batch=2, q_heads=2, q_len=5, k_len=7, head_dim=4, requires_grad=False)
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        torch.ops.bmkernels.attention_fwd(*_fwd_args(q, k, v, alibi_slopes=torch.ones(shape)))


@pytest.mark.parametrize(
    "left,right,offset", [(2**63 - 1, 2**63 - 1, 0), (2**63 - 1, 0, 3), (3, 2**62, -(2**63)), (-1, 0, 2**63 - 1)]
)
def test_raw_operator_saturates_huge_window_bounds_and_offsets(left, right, offset):
    """Bounds past every position are unbounded and offsets are capped: no int64 overflow (UB)."""
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=6, k_len=9, head_dim=4, requires_grad=False)
    out, _ = torch.ops.bmkernels.attention_fwd(
        *_fwd_args(q, k, v, window_left=left, window_right=right, diag_offset=offset)
    )
    cap = 2**61
    window = (-1 if left > 15 else left, -1 if right > 15 else right)
    truth = reference.attention(q, k, v, window=window, causal_offset=max(-cap, min(cap, offset)), scale=0.5)
    torch.testing.assert_close(out, truth)


def test_fake_kernel_refuses_mixed_devices():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=3, k_len=3, head_dim=4, requires_grad=False)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.bmkernels.attention_fwd(*_fwd_args(q, k.to("meta"), v))


def test_meta_tensors_get_meta_results():
    q = torch.empty(2, 4, 5, 8, device="meta")
    out, lse = torch.ops.bmkernels.attention_fwd(*_fwd_args(q, q, q))
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5)


def test_public_window_beyond_int64_is_unbounded():
    q, k, v = make_qkv(batch=1, q_heads=2, q_len=4, k_len=6, head_dim=4, requires_grad=False)
    out = bmkernels.attention(q, k, v, window=(2**70, 2**70))
    torch.testing.assert_close(out, bmkernels.attention(q, k, v))
