"""Hostile inputs to the raw GRU layer operators: each gets a clear error naming the argument, never a
crash (hidden size 0 used to divide by zero), an out-of-bounds read (wrong grad_out / grad_h_n /
lengths) or a silent broadcast."""

import pytest
import torch

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
