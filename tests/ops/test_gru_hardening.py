"""Hostile inputs to the raw GRU layer operators: each gets a clear error naming the argument, never a
crash (hidden size 0 used to divide by zero), an out-of-bounds read (wrong grad_out / grad_h_n /
lengths) or a silent broadcast."""

import pytest
import torch

import bmkernels
from tests.ops.test_gru import _layer_args


def _fwd(**changes):
    args = _layer_args(bias=True, lengths=True, directions=2, save=True)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "save"]
    named = dict(zip(names, args, strict=True))
    named.update(changes)
    return [named[n] for n in names]


@pytest.mark.parametrize(
    "changes,match",
    [
        (
            lambda a: {
                "w_ih": a["w_ih"][:, :0],
                "w_hh": a["w_hh"][:, :0, :0],
                "h0": a["h0"][..., :0],
                "b_ih": None,
                "b_hh": None,
            },
            "hidden size must be >= 1",
        ),
        (lambda a: {"x": a["x"].to(torch.int64)}, "x must be float32, float64 or bfloat16"),
        (lambda a: {"h0": a["h0"].double()}, "must have x's dtype"),
        (lambda a: {"b_ih": a["b_ih"][:, :-1]}, r"b_ih must be .* of shape \(D, 3H\)"),
        (lambda a: {"lengths": torch.tensor([4, 9, 3])}, r"lengths must lie in \[0, T\]"),
        (lambda a: {"lengths": torch.tensor([4, -1, 3])}, r"lengths must lie in \[0, T\]"),
        (lambda a: {"lengths": torch.tensor([4.0, 2.0, 3.0])}, "lengths must be int64"),
    ],
)
def test_raw_forward_checks(changes, match):
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "save"]
    base = dict(zip(names, _fwd(), strict=True))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bmkernels.gru_layer_fwd(*_fwd(**changes(base)))


@pytest.mark.parametrize("what", ("grad_out", "grad_h_n"))
def test_raw_backward_checks_gradient_shapes(what):
    args = _fwd()
    with torch.no_grad():
        out, h_n, ws = torch.ops.bmkernels.gru_layer_fwd(*args)
    grads = {"grad_out": torch.randn_like(out), "grad_h_n": torch.randn_like(h_n)}
    grads[what] = grads[what][..., :-1]  # one feature short: used to read past the end
    with pytest.raises(RuntimeError, match=f"{what} must be"):
        torch.ops.bmkernels.gru_layer_bwd(grads["grad_out"], grads["grad_h_n"], *args[:4], args[6], ws, True)


@pytest.mark.parametrize("what", ("grad_out", "grad_h_n", "workspace"))
def test_raw_backward_names_wrong_dtypes(what):
    """Used to fail with a bare "expected scalar type Float but found Double"."""
    args = _fwd()
    with torch.no_grad():
        out, h_n, ws = torch.ops.bmkernels.gru_layer_fwd(*args)
    grads = {"grad_out": torch.randn_like(out), "grad_h_n": torch.randn_like(h_n), "workspace": ws}
    grads[what] = grads[what].double()
    with pytest.raises(RuntimeError, match=f"{what} .*must"):
        torch.ops.bmkernels.gru_layer_bwd(
            grads["grad_out"], grads["grad_h_n"], *args[:4], args[6], grads["workspace"], True
        )


@pytest.mark.parametrize("which", ("layer", "cell", "backward"))
def test_fake_kernels_refuse_mixed_devices(which):
    """One meta tensor among CPU ones used to get uninitialized CPU memory back (the fake kernel ran)."""
    args = _fwd()
    with pytest.raises(RuntimeError, match="one device"):
        if which == "layer":
            torch.ops.bmkernels.gru_layer_fwd(args[0], args[1], args[2].to("meta"), *args[3:])
        elif which == "cell":
            x, h = torch.randn(3, 5), torch.randn(3, 6)
            torch.ops.bmkernels.gru_cell_fwd(
                x, h, torch.randn(18, 5, device="meta"), torch.randn(18, 6), None, None, False
            )
        else:
            with torch.no_grad():
                out, h_n, ws = torch.ops.bmkernels.gru_layer_fwd(*args)
            torch.ops.bmkernels.gru_layer_bwd(out, h_n.to("meta"), *args[:4], args[6], ws, True)


@pytest.mark.parametrize("bidirectional", (False, True))
def test_dropout_one_in_training_gives_torchs_result(bidirectional):
    """dropout=1.0 between layers used to compute x * 0 / 0: all NaN (torch gives finite output)."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 5, num_layers=3, dropout=1.0, bidirectional=bidirectional)
    x = torch.randn(3, 2, 4)
    truth, truth_h = gru(x)
    for backend in ("cpu", "reference"):
        out, h_n = bmkernels.gru(
            x,
            None,
            gru._flat_weights,
            num_layers=3,
            bidirectional=bidirectional,
            batch_first=False,
            dropout=1.0,
            training=True,
            backend=backend,
        )
        torch.testing.assert_close(out, truth)
        torch.testing.assert_close(h_n, truth_h)
