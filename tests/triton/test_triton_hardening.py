"""Hostile inputs to the raw Triton conv2d and GRU operators (under the interpreter here): each gets the
C++ operators' checks, a clear error naming the argument, never a ZeroDivisionError, a wrong-size map or
an out-of-bounds read."""

import pytest
import torch

triton_conv = pytest.importorskip("bmkernels.triton.conv", reason="triton is not installed")

import bmkernels  # noqa: E402
from bmkernels.triton import gru as triton_gru  # noqa: E402
from tests.ops.test_conv_hardening import _fwd_args  # noqa: E402
from tests.ops.test_gru import _layer_args  # noqa: E402


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"stride": [0, 1]}, "stride must be"),
        ({"dilation": [1, 0]}, "dilation must be"),
        ({"padding": [-1, 0, 0, 0]}, "padding must be"),
        ({"activation": 99}, "activation must be"),
        ({"weight": torch.randn(4, 3, 0, 3)}, "do not make a conv2d"),
        ({"weight": torch.randn(4, 3, 3, 3, dtype=torch.float64)}, "weight must have x's dtype"),
        ({"bias": torch.randn(4, dtype=torch.float64)}, "bias must have x's dtype"),
        ({"residual": torch.randn(2, 4, 5, 6)}, "residual must have the output's shape"),
    ],
)
def test_raw_conv_checks(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        triton_conv.conv2d_fwd(*_fwd_args(**changes))


def test_conv_zero_input_channels_and_zero_kernel():
    x = torch.randn(2, 0, 5, 5, requires_grad=True)
    w = torch.randn(4, 0, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = bmkernels.conv2d(x, w, b, activation="relu", backend="triton")
    assert out.shape == (2, 0, 3, 3)  # torch's result; a bias-only (2, 4, 3, 3) map before
    out.sum().backward()
    assert torch.equal(b.grad, torch.zeros(4)) and w.grad.shape == w.shape
    with pytest.raises(ValueError, match="kernel of at least 1x1"):
        bmkernels.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 0, 3), backend="triton")


def _named():
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "save"]
    return names, dict(zip(names, _layer_args(bias=True, directions=2, save=True), strict=True))


@pytest.mark.parametrize(
    "changes,match",
    [
        (lambda a: {"w_hh": a["w_hh"][:, :-3]}, r"w_hh must have shape \(2, 18, 6\)"),
        (lambda a: {"b_hh": a["b_hh"][:, :-3]}, r"b_hh must have shape"),
        (lambda a: {"b_ih": None}, "both b_ih and b_hh"),
        (lambda a: {"w_ih": a["w_ih"].double()}, "w_ih must have x's dtype"),
        (lambda a: {"x": a["x"].long()}, "x must be float16"),
        (lambda a: {"w_ih": a["w_ih"][:, :0], "w_hh": a["w_hh"][:, :0, :0], "b_ih": None, "b_hh": None}, "H >= 1"),
        (lambda a: {"lengths": torch.tensor([4, 9, 3])}, r"lengths must lie in \[0, T\]"),
    ],
)
def test_raw_gru_layer_checks(changes, match):
    names, args = _named()
    args.update(changes(args))
    with pytest.raises((ValueError, TypeError), match=match):
        triton_gru.gru_layer_fwd(*[args[n] for n in names])


@pytest.mark.parametrize("what", ["grad_out", "grad_h_n"])
def test_raw_gru_backward_checks_gradient_shapes(what):
    """One feature or direction short used to read past the end (values like 1e23 came back)."""
    names, args = _named()
    out, h_n, ws = triton_gru.gru_layer_fwd(*[args[n] for n in names])
    grads = {"grad_out": torch.randn_like(out), "grad_h_n": torch.randn_like(h_n)}
    grads[what] = grads[what][..., :-1] if what == "grad_out" else grads[what][:1]
    with pytest.raises(ValueError, match=f"{what} must have shape"):
        triton_gru.gru_layer_bwd(grads["grad_out"], grads["grad_h_n"], *[args[n] for n in names[:4]], None, ws, True)


def test_raw_gru_cell_names_a_wrong_bias():
    with pytest.raises(ValueError, match=r"b_ih must have shape \(18,\)"):
        triton_gru.gru_cell_fwd(
            torch.randn(3, 5),
            torch.randn(3, 6),
            torch.randn(18, 5),
            torch.randn(18, 6),
            torch.randn(17),
            torch.randn(18),
            False,
        )


def test_gru_dropout_one_is_finite():
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 5, num_layers=2, dropout=1.0)
    x = torch.randn(3, 2, 4)
    out, h_n = bmkernels.gru(
        x,
        None,
        gru._flat_weights,
        num_layers=2,
        bidirectional=False,
        batch_first=False,
        dropout=1.0,
        training=True,
        backend="triton",
    )
    truth, truth_h = gru(x)
    torch.testing.assert_close(out, truth)
    torch.testing.assert_close(h_n, truth_h)
