"""The CPU conv2d engine choice (csrc/cpu/conv_engine.h): BMK_CONV_ENGINE=aten runs ATen's convolution
with bmkernels' fused epilogue around it and must meet the same contract as bmkernels' kernels
(forward and every gradient against the reference under the tolerance rule, both layouts, dtypes,
asymmetric padding, groups, depthwise); auto times both once per shape key and keeps the choice;
the raw operators check every argument either engine indexes by."""

import pytest
import torch

import bmkernels
from bmkernels.ops import conv as ops_conv
from bmkernels.testing import check_against_reference
from tests.ops.test_conv import kernel_fn, make_inputs, out_size_of, reference_fn

CASES = {
    "3x3_bias_relu": (dict(batch=2, c_in=8, size=9, c_out=12, kernel=3), dict(padding=1, activation="relu")),
    "residual_gelu": (dict(batch=2, c_in=6, size=7, c_out=6, kernel=3), dict(padding=1, activation="gelu")),
    "stride2_silu": (dict(batch=2, c_in=5, size=11, c_out=7, kernel=3), dict(stride=2, activation="silu")),
    "same_even_kernel": (
        dict(batch=1, c_in=4, size=8, c_out=5, kernel=4),
        dict(padding="same", activation="gelu_tanh"),
    ),
    "groups_leaky": (
        dict(batch=2, c_in=8, size=6, c_out=8, kernel=3, groups=4),
        dict(padding=1, groups=4, activation=("leaky_relu", 0.2)),
    ),
    "depthwise_dilated": (
        dict(batch=2, c_in=6, size=10, c_out=6, kernel=3, groups=6),
        dict(padding=2, dilation=2, groups=6),
    ),
    "negative_slope": (
        dict(batch=1, c_in=3, size=6, c_out=4, kernel=1, bias=False),
        dict(activation=("leaky_relu", -0.5)),
    ),
    "depthwise_relu6": (
        dict(batch=2, c_in=6, size=9, c_out=6, kernel=3, groups=6),
        dict(padding=1, stride=2, groups=6, activation="relu6"),
    ),
    "hardswish": (dict(batch=2, c_in=5, size=7, c_out=8, kernel=1), dict(activation="hardswish")),
}


def _inputs(case, dtype, channels_last):
    shape, options = CASES[case]
    residual = case == "residual_gelu"
    out = (
        out_size_of(
            shape["size"],
            shape["kernel"],
            options.get("stride", 1),
            options.get("padding", 0),
            options.get("dilation", 1),
        )
        if residual
        else None
    )
    inputs = make_inputs(**shape, residual=residual, out_size=out, dtype=dtype, channels_last=channels_last)
    return inputs, options


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES)
def test_aten_engine_matches_reference(case, channels_last, dtype, monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", "aten")
    inputs, options = _inputs(case, dtype, channels_last)
    out, _, _ = check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected)


@pytest.mark.parametrize("engine", ("aten", "bmkernels"))
def test_gradients_asked_for_alone(engine, monkeypatch):
    """Each gradient alone (the output_mask of conv2d_bwd) equals the one computed with all others."""
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    inputs, options = _inputs("residual_gelu", torch.float64, False)
    out = bmkernels.conv2d(**inputs, **options)
    grad = torch.randn_like(out)
    names = list(inputs)
    together = torch.autograd.grad(out, [inputs[n] for n in names], grad, retain_graph=True)
    for name, full in zip(names, together, strict=True):
        (alone,) = torch.autograd.grad(out, inputs[name], grad, retain_graph=True)
        torch.testing.assert_close(alone, full)


@pytest.mark.parametrize("engine", ("aten", "bmkernels"))
@pytest.mark.parametrize("case", ("3x3_bias_relu", "groups_leaky", "depthwise_dilated", "hardswish"))
def test_weight_grad_in_the_models_layout(case, engine, monkeypatch):
    """The operator's weight gradient comes back in x's memory format, as a channels_last model's weights
    are (AccumulateGrad then keeps it without a copy), with the same values in both layouts."""
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    grads = {}
    for channels_last in (False, True):
        inputs, options = _inputs(case, torch.float64, channels_last)
        weight = inputs["weight"]
        # autograd.grad: the operator's own gradient (AccumulateGrad would copy it into the weight's layout)
        (grad,) = torch.autograd.grad(bmkernels.conv2d(**inputs, **options).square().sum(), weight)
        # strides of size-1 dims do not matter (nor does AccumulateGrad compare them)
        assert [s for s, n in zip(grad.stride(), grad.shape, strict=True) if n > 1] == [
            s for s, n in zip(weight.stride(), weight.shape, strict=True) if n > 1
        ]
        grads[channels_last] = grad
    torch.testing.assert_close(grads[True], grads[False])


def test_auto_times_once_and_keeps_the_choice(monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", "auto")
    ops_conv.clear_engine_choices()
    inputs, options = _inputs("3x3_bias_relu", torch.float32, False)
    first = bmkernels.conv2d(**inputs, **options)
    first.sum().backward()
    choices = ops_conv.engine_choices()
    assert len(choices) == 2, choices  # one forward key, one backward key
    assert {k.split()[0] for k in choices} == {"fwd", "bwd"} and set(choices.values()) <= {"aten", "bmkernels"}
    engine = choices[next(k for k in choices if k.startswith("fwd"))]
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    forced = bmkernels.conv2d(**inputs, **options)
    monkeypatch.setenv("BMK_CONV_ENGINE", "auto")
    again = bmkernels.conv2d(**inputs, **options)
    assert ops_conv.engine_choices() == choices  # looked up, not timed again
    torch.testing.assert_close(again, forced, rtol=0, atol=0)
    torch.testing.assert_close(first, forced, rtol=0, atol=0)
    ops_conv.clear_engine_choices()
    assert ops_conv.engine_choices() == {}


def test_auto_runs_aten_by_rule_on_nchw_spatial_convs(monkeypatch):
    """NCHW dense convs with a spatial kernel and >= 16 input channels go to ATen untimed (and say so in
    engine_choices); forcing BMK_CONV_ENGINE=bmkernels still runs our kernel there, with the same result."""
    monkeypatch.setenv("BMK_CONV_ENGINE", "auto")
    ops_conv.clear_engine_choices()
    inputs = make_inputs(batch=2, c_in=16, size=9, c_out=8, kernel=3, dtype=torch.float64)
    auto = bmkernels.conv2d(**inputs, padding=1, activation="relu")
    auto.sum().backward()
    choices = ops_conv.engine_choices()
    assert len(choices) == 2 and set(choices.values()) == {"aten"}, choices
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")
    torch.testing.assert_close(bmkernels.conv2d(**inputs, padding=1, activation="relu"), auto)
    ops_conv.clear_engine_choices()


def test_bad_engine_name(monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", "cudnn")
    inputs, options = _inputs("3x3_bias_relu", torch.float32, False)
    with pytest.raises(RuntimeError, match="BMK_CONV_ENGINE must be auto, bmkernels or aten; got 'cudnn'"):
        bmkernels.conv2d(**inputs, **options)


def _raw_args(**changes):
    x = torch.randn(2, 4, 8, 8)
    args = dict(
        x=x,
        weight=torch.randn(6, 4, 3, 3),
        bias=torch.randn(6),
        residual=None,
        stride=[1, 1],
        padding=[1, 1, 1, 1],
        dilation=[1, 1],
        groups=1,
        activation=1,
        slope=0.01,
        save_preact=False,
    )
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize("engine", ("auto", "aten", "bmkernels"))
@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(stride=[0, 1]), "stride must be two ints >= 1"),
        (dict(stride=[-1, 1]), "stride must be two ints >= 1"),
        (dict(dilation=[1, 0]), "dilation must be two ints >= 1"),
        (dict(padding=[1, -1, 1, 1]), "padding must be four ints"),
        (dict(activation=99), "activation must be a code 0..7"),
        (dict(groups=0), "groups must be >= 1"),
        (dict(weight=torch.randn(6, 4, 0, 3)), "at least 1x1"),
        (dict(bias=torch.randn(5)), r"bias must have shape \(Cout,\) = \(6\)"),
        (dict(residual=torch.randn(2, 6, 8, 7)), "residual must have the output's shape"),
        (dict(residual=torch.randn(6, 1, 1)), "residual must have the output's shape"),
        (dict(x=torch.randn(2, 4, 2, 2), padding=[0, 0, 0, 0]), "smaller than the"),
    ],
)
def test_raw_forward_checks_every_argument(changes, match, engine, monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.bmkernels.conv2d_fwd(*_raw_args(**changes))


@pytest.mark.parametrize("engine", ("auto", "aten", "bmkernels"))
@pytest.mark.parametrize("what", ("grad_out", "act_saved"))
def test_raw_backward_checks_shapes(what, engine, monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    x, weight = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    good = torch.randn(2, 6, 8, 8)
    tensors = {"grad_out": good, "act_saved": good, what: torch.randn(2, 6, 4, 4)}
    with pytest.raises(RuntimeError, match=f"{what} must have the output's shape"):
        torch.ops.bmkernels.conv2d_bwd(
            tensors["grad_out"],
            x,
            weight,
            tensors["act_saved"],
            [1, 1],
            [1, 1, 1, 1],
            [1, 1],
            1,
            1,
            0.01,
            True,
            [True, True, True, False],
        )


# torch 2.14.1's CPU bfloat16 convolution (oneDNN) returns inf/NaN/1e38 when the output is 1 wide with a
# stride of 2 along the width (found by the emulator's long fuzz profile, tests/cuda/test_fuzz_emulator.py;
# correct with torch.backends.mkldnn disabled). The engine choice keeps such shapes on bmkernels' own kernel.
ONEDNN_BF16_CASE = dict(x=(1, 6, 7, 4), weight=(6, 3, 3, 4), stride=(1, 2), padding=(2, 0), groups=2)


@pytest.mark.parametrize("engine", ["auto", "aten", "bmkernels"])
@pytest.mark.parametrize("transposed", [False, True])
def test_onednn_bfloat16_case_stays_on_our_kernel(monkeypatch, engine, transposed):
    """csrc/cpu/conv_engine.cpp keeps ATen off these shapes whatever BMK_CONV_ENGINE says, forward and backward."""
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    ops_conv.clear_engine_choices()
    gen = torch.Generator().manual_seed(0)
    case = dict(ONEDNN_BF16_CASE)
    if transposed:  # the same hazard along the height
        case = dict(x=(1, 6, 4, 7), weight=(6, 3, 4, 3), stride=(2, 1), padding=(0, 2), groups=2)
    x = torch.randn(case["x"], generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(case["weight"], generator=gen) * 0.5).bfloat16().requires_grad_()
    options = {k: v for k, v in case.items() if k not in ("x", "weight")}
    out = bmkernels.conv2d(x, weight, backend="cpu", **options)
    xf, wf = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    truth = torch.nn.functional.conv2d(xf, wf, **options)
    assert (out.float() - truth).abs().max().item() < 0.05
    grad = torch.randn(out.shape, generator=gen)
    dx, dw = torch.autograd.grad(out, (x, weight), grad.bfloat16())
    tx, tw = torch.autograd.grad(truth, (xf, wf), grad.bfloat16().float())
    assert (dx.float() - tx).abs().max().item() < 0.1 and (dw.float() - tw).abs().max().item() < 0.1
    assert all(v == "bmkernels" for v in ops_conv.engine_choices().values())
    ops_conv.clear_engine_choices()
