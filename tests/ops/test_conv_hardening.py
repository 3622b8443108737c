"""Hostile inputs to conv2d, through the public function and the raw operators: a clear error naming the
argument, or torch's result for a legal edge case (0 input channels), never a crash or an unnamed
"expected scalar type Float but found Double"."""

import pytest
import torch
import torch.nn.functional as F

import bmkernels


def _fwd_args(**changes):
    args = {
        "x": torch.randn(2, 3, 8, 8),
        "weight": torch.randn(4, 3, 3, 3),
        "bias": None,
        "residual": None,
        "stride": [1, 1],
        "padding": [0, 0, 0, 0],
        "dilation": [1, 1],
        "groups": 1,
        "activation": 0,
        "slope": 0.01,
        "save_preact": False,
    }
    args.update(changes)
    return list(args.values())


def _bwd_args(**changes):
    args = {
        "grad_out": torch.randn(2, 4, 6, 6),
        "x": torch.randn(2, 3, 8, 8),
        "weight": torch.randn(4, 3, 3, 3),
        "act_saved": torch.randn(2, 4, 6, 6),
        "stride": [1, 1],
        "padding": [0, 0, 0, 0],
        "dilation": [1, 1],
        "groups": 1,
        "activation": 1,
        "slope": 0.01,
        "saved_is_output": True,
        "output_mask": [True, True, True, False],
    }
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"weight": torch.randn(4, 3, 3, 3, dtype=torch.float64)}, "weight must have x's dtype"),
        ({"bias": torch.randn(4, dtype=torch.float64)}, "bias must have x's dtype"),
        ({"residual": torch.randn(2, 4, 6, 6, dtype=torch.float64)}, "residual must have x's dtype"),
        (
            {"x": torch.ones(2, 3, 8, 8, dtype=torch.half), "weight": torch.ones(4, 3, 3, 3, dtype=torch.half)},
            "x must be",
        ),
        (
            {"x": torch.ones(2, 3, 8, 8, dtype=torch.long), "weight": torch.ones(4, 3, 3, 3, dtype=torch.long)},
            "x must be",
        ),
        ({"weight": torch.randn(0, 3, 3, 3)}, "Cout >= 1"),
    ],
)
def test_raw_forward_names_wrong_dtypes(changes, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bmkernels.conv2d_fwd(*_fwd_args(**changes))


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"grad_out": torch.randn(2, 4, 6, 6, dtype=torch.float64)}, "grad_out must have x's dtype"),
        ({"act_saved": torch.randn(2, 4, 6, 6, dtype=torch.float64)}, "act_saved must have x's dtype"),
    ],
)
def test_raw_backward_names_wrong_dtypes(changes, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bmkernels.conv2d_bwd(*_bwd_args(**changes))


@pytest.mark.parametrize("which", ["x", "weight"])
def test_fake_kernels_refuse_mixed_devices(which):
    """One meta tensor among CPU ones used to get uninitialized CPU memory back (the fake kernel ran)."""
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.bmkernels.conv2d_fwd(*_fwd_args(**{which: _fwd_args()[0 if which == "x" else 1].to("meta")}))
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.bmkernels.conv2d_bwd(*_bwd_args(weight=torch.randn(4, 3, 3, 3, device="meta")))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("groups", [1, 2])
def test_zero_input_channels_give_torchs_result(backend, groups):
    """torch returns an empty (N, 0, Ho, Wo) map and zero gradients; we used to refuse (CPU)."""
    x = torch.randn(2, 0, 7, 6, requires_grad=True)
    w = torch.randn(4, 0, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = bmkernels.conv2d(x, w, b, stride=2, padding=1, groups=groups, activation="gelu", backend=backend)
    truth = F.conv2d(x, w, b, stride=2, padding=1, groups=groups)
    assert out.shape == truth.shape == (2, 0, 4, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros(4))


def test_zero_input_channels_module():
    conv = bmkernels.nn.Conv2d(0, 4, 3)
    assert conv(torch.randn(1, 0, 5, 5)).shape == torch.nn.Conv2d(0, 4, 3)(torch.randn(1, 0, 5, 5)).shape


@pytest.mark.parametrize("shape", [(4, 3, 0, 3), (4, 3, 3, 0), (0, 3, 3, 3)])
def test_public_refuses_what_torch_refuses(shape):
    x, w = torch.randn(1, 3, 5, 5), torch.randn(shape)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w)
    with pytest.raises(ValueError, match=r"weight must have C_out >= 1 and a kernel of at least 1x1"):
        bmkernels.conv2d(x, w)
