"""bmkernels.conv2d (CPU kernel) against the reference (bmkernels/reference/conv.py): forward and every
gradient (input, weight, bias, residual), activations, groups and depthwise, awkward shapes, both memory
formats, non-contiguous inputs, dtypes, ISA paths, gradcheck, opcheck, torch.compile, bad inputs, and
bmkernels.fold_batchnorm. Tolerance rule: tests/conftest.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import bmkernels
from bmkernels.reference import conv as reference
from bmkernels.testing import check_against_reference, cpu_supports

ISAS = ("scalar", "avx2", "avx512")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@pytest.fixture(autouse=True)
def own_engine(monkeypatch):
    """These tests are of bmkernels' own conv kernels: no engine choice (tests/ops/test_conv_engine.py)."""
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0, requires_grad=True, channels_last=False):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def make_inputs(
    batch,
    c_in,
    size,
    c_out,
    kernel,
    *,
    groups=1,
    bias=True,
    residual=False,
    dtype=torch.float32,
    channels_last=False,
    out_size=None,
    unbatched=False,
    seed=0,
):
    """x, weight, bias, residual as leaves requiring grad (residual: of shape (batch, c_out, *out_size))."""
    h, w = (size, size) if isinstance(size, int) else size
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    lead = () if unbatched else (batch,)
    inputs = {
        "x": rand(*lead, c_in, h, w, dtype=dtype, seed=seed, channels_last=channels_last),
        "weight": rand(
            c_out, c_in // groups, kh, kw, dtype=dtype, seed=seed + 1, scale=0.5, channels_last=channels_last
        ),
    }
    if bias:
        inputs["bias"] = rand(c_out, dtype=dtype, seed=seed + 2)
    if residual:
        inputs["residual"] = rand(*lead, c_out, *out_size, dtype=dtype, seed=seed + 3, channels_last=channels_last)
    return inputs


def out_size_of(size, kernel, stride=1, padding=0, dilation=1):
    """Output (H, W) of a square conv for integer arguments."""
    return ((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1,) * 2


def kernel_fn(**options):
    return lambda x, weight, **tensors: bmkernels.conv2d(x, weight, **options, **tensors)


def reference_fn(**options):
    return lambda x, weight, **tensors: reference.conv2d(x, weight, **options, **tensors)


def check(inputs, dtype, **options):
    return check_against_reference(kernel_fn(**options), reference_fn(**options), inputs, dtype)


# ------------------------------------------------------------------------------------------------
# Shapes and options, each in both memory formats and every dtype.

# name -> (batch, c_in, size, c_out, kernel, options)
CASES = {
    "3x3": (2, 5, 9, 7, 3, {"padding": 1, "activation": "relu"}),
    "1x1": (2, 6, 7, 10, 1, {"activation": "relu"}),
    "7x7 stem c_in 3 stride 2": (1, 3, 15, 8, 7, {"stride": 2, "padding": 3, "activation": "relu"}),
    "stride 2 odd": (2, 4, 11, 6, 3, {"stride": 2, "padding": 1, "activation": "gelu"}),
    "1x1 stride 2": (2, 8, 9, 5, 1, {"stride": 2, "activation": "silu"}),
    # NCHW input: the strided pixels are picked before the layout change; rows/columns left over at the end
    "1x1 stride (3, 2) grouped": (2, 6, (10, 7), 4, 1, {"stride": (3, 2), "groups": 2, "activation": "relu"}),
    "dilation 2": (2, 4, 13, 5, 3, {"dilation": 2, "padding": 2, "activation": "gelu_tanh"}),
    "padding larger than kernel": (1, 3, 5, 4, 3, {"padding": 4, "activation": ("leaky_relu", 0.2)}),
    "input smaller than kernel": (2, 3, 2, 4, 5, {"padding": 2, "activation": "leaky_relu"}),
    "rectangular": (2, 3, (5, 9), 4, (3, 2), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}),
    "grouped": (2, 6, 8, 9, 3, {"groups": 3, "padding": 1, "activation": "relu"}),
    "depthwise": (2, 6, 9, 6, 3, {"groups": 6, "padding": 1, "activation": "relu"}),
    "depthwise stride 2 dilation 2": (
        2,
        5,
        10,
        5,
        3,
        {"groups": 5, "stride": 2, "padding": 2, "dilation": 2, "activation": "silu"},
    ),
    # NCHW: the strided pixels are picked before the layout change, for the depthwise loops too
    "depthwise 1x1 stride 2": (2, 8, 9, 8, 1, {"groups": 8, "stride": 2, "activation": "relu"}),
    "depthwise multiplier 2": (2, 4, 7, 8, 3, {"groups": 4, "padding": 1, "activation": "relu"}),
    "same even kernel": (2, 3, 8, 4, 4, {"padding": "same", "dilation": 1, "activation": "gelu"}),
    "same dilated": (1, 3, 9, 4, 3, {"padding": "same", "dilation": 2, "activation": "relu"}),
    "valid": (2, 3, 8, 4, 3, {"padding": "valid", "activation": ("leaky_relu", -0.3)}),
    "no bias, no activation": (2, 3, 6, 4, 3, {"padding": 1, "bias": False}),
    # MobileNet's activations
    "depthwise relu6 stride 2": (2, 8, 9, 8, 3, {"groups": 8, "stride": 2, "padding": 1, "activation": "relu6"}),
    "1x1 hardswish": (2, 6, 7, 10, 1, {"activation": "hardswish"}),
    # >= 32 input channels per group and output rows >= 28 wide: the forward without im2col (one GEMM per
    # tap over a row's pixels), its padding clipped per tap; also the stride-1 input gradient (a conv of dZ)
    "direct 3x3": (1, 32, 30, 32, 3, {"padding": 1, "activation": "relu"}),
    "direct grouped strided dilated": (
        1,
        66,
        (5, 61),
        6,
        3,
        {"groups": 2, "stride": (1, 2), "padding": 2, "dilation": 2, "activation": "gelu"},
    ),
    # no kernel column covers a whole output row (padding 3 > k - 1): the row's tile is zeroed first
    "direct padding wider than the kernel": (1, 32, (5, 26), 8, 3, {"padding": 3, "activation": "relu"}),
    # the input gradient by phases (>= 16 input channels per group; one stride-1 conv of dZ per input pixel
    # phase; fewer channels take the scatter path, as in the cases above): strides that share a factor with
    # the dilation or not, a kernel smaller than the stride (phases no tap reaches: zeros), a phase wide
    # enough for the im2col-free path (32 dZ channels, rows of 29)
    "phases stride 3 dilation 2": (2, 16, 13, 5, 3, {"stride": 3, "padding": 2, "dilation": 2, "activation": "relu"}),
    "phases stride 2 dilation 2 grouped": (2, 32, 12, 4, 3, {"stride": 2, "padding": 1, "dilation": 2, "groups": 2}),
    "phases kernel smaller than stride": (
        2,
        16,
        (11, 10),
        4,
        2,
        {"stride": (3, 2), "padding": 1, "activation": "silu"},
    ),
    "phases direct stride 2": (1, 16, (6, 58), 32, 3, {"stride": 2, "padding": 1, "activation": "relu"}),
}


def _case_inputs(case, dtype, channels_last, residual):
    batch, c_in, size, c_out, kernel, options = CASES[case]
    options = dict(options)
    bias = options.pop("bias", True)
    with warnings.catch_warnings():  # torch warns that padding="same" with an even kernel copies the input
        warnings.simplefilter("ignore")
        probe = F.conv2d(
            torch.zeros(batch, c_in, *((size, size) if isinstance(size, int) else size)),
            torch.zeros(
                c_out, c_in // options.get("groups", 1), *((kernel, kernel) if isinstance(kernel, int) else kernel)
            ),
            None,
            options.get("stride", 1),
            options.get("padding", 0),
            options.get("dilation", 1),
            options.get("groups", 1),
        )
    inputs = make_inputs(
        batch,
        c_in,
        size,
        c_out,
        kernel,
        groups=options.get("groups", 1),
        bias=bias,
        residual=residual,
        dtype=dtype,
        channels_last=channels_last,
        out_size=tuple(probe.shape[-2:]),
    )
    return inputs, options


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, channels_last, dtype):
    inputs, options = _case_inputs(case, dtype, channels_last, residual=case not in ("1x1", "valid"))
    out, _, grads = check(inputs, dtype, **options)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    assert grads["x"].shape == inputs["x"].shape


def test_every_activation_every_gradient():
    for activation in reference.ACTIVATIONS + (("leaky_relu", 0.0), ("leaky_relu", -1.5)):
        inputs = make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(7, 7))
        check(inputs, torch.float32, padding=1, activation=activation)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("engine", ("bmkernels", "aten"))
def test_relu6_hardswish_kinks_follow_torch(engine, dtype, monkeypatch):
    """At exactly 0 and 6 (relu6) and -3 and 3 (hardswish) the gradient is torch's: F.relu6's is 0 at
    both kinks, F.hardswish's 0 at -3 and 1 at 3; NaN propagates as in torch. An identity 1x1 conv makes
    the pre-activation exactly x."""
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    values = [-4.0, -3.0, -1.5, -0.0, 0.0, 1.0, 3.0, 5.5, 6.0, 7.0, float("nan"), 2.0]
    weight = torch.ones(1, 1, 1, 1, dtype=dtype)
    for activation, torch_fn in (("relu6", F.relu6), ("hardswish", F.hardswish)):
        x = torch.tensor(values, dtype=dtype).view(1, 1, 3, 4).requires_grad_()
        xt = x.detach().clone().requires_grad_()
        grad = torch.arange(1.0, 13.0, dtype=dtype).view(1, 1, 3, 4)
        out = bmkernels.conv2d(x, weight, activation=activation)
        want = torch_fn(xt)
        out.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True, msg=activation)
        torch.testing.assert_close(x.grad, xt.grad, rtol=0, atol=0, equal_nan=True, msg=activation)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_blocked_paths(channels_last, dtype):
    """Shapes that span several pixel tiles, channel tiles (a partial last one), K chunks, weight-gradient
    blocks and the channel split of a batch of 1."""
    inputs = make_inputs(1, 72, 11, 290, 3, residual=True, out_size=(11, 11), dtype=dtype, channels_last=channels_last)
    check(inputs, dtype, padding=1, activation="relu")
    inputs = make_inputs(
        3, 40, 13, 70, 3, groups=2, residual=True, out_size=(7, 7), dtype=dtype, channels_last=channels_last
    )
    check(inputs, dtype, stride=2, padding=1, groups=2, activation="gelu")


def test_unbatched():
    inputs = make_inputs(1, 3, 8, 5, 3, residual=True, out_size=(8, 8), unbatched=True)
    out, _, _ = check(inputs, torch.float32, padding=1, activation="relu")
    assert out.shape == (5, 8, 8)


def test_tuple_and_int_arguments_agree():
    inputs = make_inputs(2, 4, 9, 6, 3)
    a = bmkernels.conv2d(inputs["x"], inputs["weight"], inputs["bias"], 2, 1, 1, 1)
    b = bmkernels.conv2d(inputs["x"], inputs["weight"], inputs["bias"], (2, 2), (1, 1), (1, 1), 1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """Sliced x, weight and residual views; transposed views that are neither NCHW nor NHWC."""
    base = rand(3, 10, 9, 11, dtype=dtype, requires_grad=False)
    x = base[1:, ::2, :, 1:].detach().requires_grad_(True)
    weight = rand(6, 10, 3, 3, dtype=dtype, requires_grad=False)[:, ::2].detach().requires_grad_(True)
    bias = rand(12, dtype=dtype, requires_grad=False)[::2].detach().requires_grad_(True)
    residual = rand(2, 6, 10, 9, dtype=dtype, requires_grad=False).transpose(2, 3).detach().requires_grad_(True)
    assert not (x.is_contiguous() or weight.is_contiguous() or residual.is_contiguous())
    check({"x": x, "weight": weight, "bias": bias, "residual": residual}, dtype, padding=1, activation="silu")
    xt = rand(2, 9, 8, 4, dtype=dtype, requires_grad=False).permute(0, 3, 2, 1).detach().requires_grad_(True)
    check({"x": xt, "weight": rand(5, 4, 3, 3, dtype=dtype)}, dtype, stride=2, activation="relu")


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_non_contiguous_grad_output(channels_last):
    """grad_output sliced (neither NCHW nor NHWC) or in the other memory format than the output."""
    inputs = make_inputs(
        2, 4, 7, 6, 3, residual=True, out_size=(7, 7), dtype=torch.float64, channels_last=channels_last
    )
    leaves = list(inputs.values())
    for grad_out in (
        torch.randn(2, 6, 7, 14, dtype=torch.float64)[..., ::2],
        torch.randn(2, 6, 7, 7, dtype=torch.float64).contiguous(
            memory_format=torch.contiguous_format if channels_last else torch.channels_last
        ),
    ):
        got = torch.autograd.grad(bmkernels.conv2d(**inputs, padding=1, activation="gelu"), leaves, grad_out)
        want = torch.autograd.grad(reference.conv2d(**inputs, padding=1, activation="gelu"), leaves, grad_out)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_only_some_gradients():
    inputs = make_inputs(2, 4, 6, 5, 3, residual=True, out_size=(4, 4))
    inputs["x"].requires_grad_(False)
    inputs["bias"].requires_grad_(False)
    check(inputs, torch.float32, activation="gelu")
    inputs = make_inputs(2, 4, 6, 5, 3, residual=True, out_size=(4, 4))
    inputs["weight"].requires_grad_(False)
    check(inputs, torch.float32, activation="relu")


def test_no_grad_forward_saves_nothing_and_matches():
    inputs = make_inputs(2, 4, 6, 5, 3)
    with torch.no_grad():
        a = bmkernels.conv2d(inputs["x"], inputs["weight"], inputs["bias"], activation="gelu")
    b = bmkernels.conv2d(inputs["x"], inputs["weight"], inputs["bias"], activation="gelu")
    assert torch.equal(a, b.detach())


def test_reference_backend():
    inputs = make_inputs(2, 4, 6, 5, 3)
    a = bmkernels.conv2d(inputs["x"], inputs["weight"], inputs["bias"], activation="silu", backend="reference")
    b = reference.conv2d(inputs["x"], inputs["weight"], inputs["bias"], activation="silu")
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# CPU instruction-set paths (BMK_CPU_ISA is read at every call).


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ("3x3", "depthwise", "stride 2 odd"))
@pytest.mark.parametrize("isa", ISAS)
def test_isa_paths(isa, case, dtype, monkeypatch):
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    inputs, options = _case_inputs(case, dtype, channels_last=case == "depthwise", residual=True)
    if not cpu_supports(isa):
        with pytest.raises(RuntimeError, match="does not support"):
            bmkernels.conv2d(inputs["x"], inputs["weight"])
        return
    assert bmkernels.build_info()["active_cpu_isa"] == isa
    check(inputs, dtype, **options)


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile.

GRADCHECK_CASES = {
    "3x3 gelu residual": (2, 3, 5, 4, 3, {"padding": 1, "stride": 2, "activation": "gelu"}, True),
    "grouped silu channels_last": (1, 4, 5, 6, 3, {"padding": 1, "groups": 2, "activation": "silu"}, False),
    "depthwise leaky negative": (
        2,
        3,
        6,
        3,
        3,
        {"groups": 3, "dilation": 2, "padding": 2, "activation": ("leaky_relu", -0.4)},
        True,
    ),
    "1x1 relu": (2, 3, 4, 5, 1, {"activation": "relu"}, True),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(case):
    batch, c_in, size, c_out, kernel, options, nchw = GRADCHECK_CASES[case]
    out_hw = F.conv2d(
        torch.zeros(batch, c_in, size, size),
        torch.zeros(c_out, c_in // options.get("groups", 1), kernel, kernel),
        None,
        options.get("stride", 1),
        options.get("padding", 0),
        options.get("dilation", 1),
        options.get("groups", 1),
    ).shape[-2:]
    inputs = make_inputs(
        batch,
        c_in,
        size,
        c_out,
        kernel,
        groups=options.get("groups", 1),
        residual=True,
        out_size=tuple(out_hw),
        dtype=torch.float64,
        channels_last=not nchw,
    )
    if options.get("activation") == "relu":  # keep pre-activations away from relu's kink at 0
        inputs["bias"].data += 3.0

    def fn(x, weight, bias, residual):
        return bmkernels.conv2d(x, weight, bias, residual=residual, **options)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def _fwd_args(channels_last=False, optional=True):
    x = rand(2, 4, 6, 5, requires_grad=False, channels_last=channels_last)
    w = rand(6, 2, 3, 3, requires_grad=False, seed=1)
    bias = rand(6, requires_grad=False, seed=2) if optional else None
    res = rand(2, 6, 3, 5, requires_grad=False, seed=3, channels_last=channels_last) if optional else None
    return (x, w, bias, res, [2, 1], [1, 1, 2, 2], [1, 2], 2, 3, 0.01, optional)


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("optional", (False, True), ids=("no_optional", "all_optional"))
def test_opcheck_conv2d_fwd(optional, channels_last):
    torch.library.opcheck(torch.ops.bmkernels.conv2d_fwd.default, _fwd_args(channels_last, optional))


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize(
    "mask", ([True, True, True, True], [False, True, False, True], [True, False, True, False]), ids=str
)
def test_opcheck_conv2d_bwd(mask, channels_last):
    x, w, bias, res, stride, padding, dilation, groups, act, slope, _ = _fwd_args(channels_last)
    out, preact = torch.ops.bmkernels.conv2d_fwd(x, w, bias, res, stride, padding, dilation, groups, act, slope, True)
    grad_out = torch.randn_like(out)
    args = (grad_out, x, w, preact, stride, padding, dilation, groups, act, slope, False, mask)
    torch.library.opcheck(torch.ops.bmkernels.conv2d_bwd.default, args)
    grads = torch.ops.bmkernels.conv2d_bwd(*args)
    every = torch.ops.bmkernels.conv2d_bwd(*args[:-1], [True] * 4)
    for g, full, wanted, shape in zip(grads, every, mask, (x.shape, w.shape, bias.shape, out.shape), strict=True):
        assert g.shape == (shape if wanted else (0,))
        if wanted:  # a gradient asked for alone equals the one computed with all the others
            torch.testing.assert_close(g, full, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph():
    torch._dynamo.reset()
    inputs = make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(4, 4), channels_last=True)

    def fn(x, weight, bias, residual):
        y = bmkernels.conv2d(x, weight, bias, stride=2, padding=1, activation="gelu", residual=residual)
        return y * 2

    eager = fn(**inputs)
    compiled = torch.compile(fn, fullgraph=True)(**inputs)
    torch.testing.assert_close(compiled, eager)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    leaves = list(inputs.values())
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    g_compiled = torch.autograd.grad(compiled.sum(), leaves)
    for a, b in zip(g_eager, g_compiled, strict=True):
        torch.testing.assert_close(b, a)


# ------------------------------------------------------------------------------------------------
# fold_batchnorm


@pytest.mark.parametrize("conv_bias", (True, False))
@pytest.mark.parametrize("affine", (True, False))
def test_fold_batchnorm(conv_bias, affine):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias).double()
    bn = torch.nn.BatchNorm2d(6, affine=affine).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = bmkernels.fold_batchnorm(conv, bn)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
        out = bmkernels.conv2d(x, fused.weight, fused.bias, padding=1, activation="relu")
        torch.testing.assert_close(out, F.relu(bn(conv(x))), rtol=1e-12, atol=1e-12)
    assert fused is not conv and conv.weight.dtype == fused.weight.dtype


def test_fold_batchnorm_errors():
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="eval mode"):
        bmkernels.fold_batchnorm(conv, bn)
    with pytest.raises(ValueError, match="4 output channels"):
        bmkernels.fold_batchnorm(conv, torch.nn.BatchNorm2d(5).eval())
    with pytest.raises(TypeError, match="torch.nn.Conv2d"):
        bmkernels.fold_batchnorm(torch.nn.Linear(3, 4), bn.eval())
    with pytest.raises(TypeError, match="torch.nn.BatchNorm2d"):
        bmkernels.fold_batchnorm(conv, torch.nn.LayerNorm(4))


# ------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, never a crash.


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_INPUTS = {
    "channel mismatch": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 2, 3, 3)),
        ValueError,
        "expects 2 input channels",
    ),
    "groups not dividing in": (
        lambda: bmkernels.conv2d(_x(1, 5, 5, 5), _x(4, 1, 3, 3), groups=2),
        ValueError,
        "must divide the input channels",
    ),
    "groups not dividing out": (
        lambda: bmkernels.conv2d(_x(1, 4, 5, 5), _x(3, 2, 3, 3), groups=2),
        ValueError,
        "output channels",
    ),
    "groups zero": (lambda: bmkernels.conv2d(_x(1, 4, 5, 5), _x(3, 4, 3, 3), groups=0), ValueError, "groups"),
    "residual shape": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), residual=_x(1, 4, 5, 5)),
        ValueError,
        r"residual must have the output's shape \(1, 4, 3, 3\)",
    ),
    "unknown activation": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), activation="tanh"),
        ValueError,
        "activation must be one of",
    ),
    "bad leaky slope": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), activation=("leaky_relu", float("nan"))),
        ValueError,
        "slope",
    ),
    "output size zero": (
        lambda: bmkernels.conv2d(_x(1, 3, 2, 2), _x(4, 3, 3, 3)),
        ValueError,
        "output size .* must be positive",
    ),
    "mixed dtypes": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3, dtype=torch.float64)),
        TypeError,
        "weight must have x's dtype",
    ),
    "bias dtype": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), _x(4, dtype=torch.bfloat16)),
        TypeError,
        "bias must have x's dtype",
    ),
    "mixed devices": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3).to("meta")),
        ValueError,
        "weight must be on x's device",
    ),
    "bias shape": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), _x(3)),
        ValueError,
        r"bias must have shape \(C_out,\) = \(4,\)",
    ),
    "x dims": (lambda: bmkernels.conv2d(_x(3, 5), _x(4, 3, 3, 3)), ValueError, "x must be 4-D"),
    "weight dims": (lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3)), ValueError, "weight must be 4-D"),
    "integer dtype": (
        lambda: bmkernels.conv2d(torch.ones(1, 3, 5, 5, dtype=torch.int32), torch.ones(4, 3, 3, 3, dtype=torch.int32)),
        TypeError,
        "float32, float64 or bfloat16",
    ),
    "float16": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5, dtype=torch.float16), _x(4, 3, 3, 3, dtype=torch.float16)),
        TypeError,
        "float32, float64 or bfloat16",
    ),
    "not a tensor": (lambda: bmkernels.conv2d([1.0], _x(4, 3, 3, 3)), TypeError, "x must be a torch.Tensor"),
    "stride zero": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), stride=0),
        ValueError,
        "stride must be >= 1",
    ),
    "negative padding": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), padding=-1),
        ValueError,
        "padding must be >= 0",
    ),
    "padding string": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), padding="full"),
        ValueError,
        "'same' or 'valid'",
    ),
    "same with stride": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), stride=2, padding="same"),
        ValueError,
        "needs stride 1",
    ),
    "dilation triple": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), dilation=(1, 1, 1)),
        TypeError,
        "dilation must be an int or a pair",
    ),
    "unknown backend": (
        lambda: bmkernels.conv2d(_x(1, 3, 5, 5), _x(4, 3, 3, 3), backend="gpu"),
        ValueError,
        "backend must be one of",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    make, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        make()


def test_empty_batch():
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = bmkernels.conv2d(x, w, b, padding=1, activation="relu")
    assert out.shape == (0, 4, 5, 5)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_preactivation_output_is_not_differentiable():
    """The saved pre-activation is an internal output: no gradient flows into it (and autograd allocates
    no zero-filled gradient for it)."""
    x, w, bias, res, stride, padding, dilation, groups, act, slope, _ = _fwd_args(False)
    x.requires_grad_()
    out, preact = torch.ops.bmkernels.conv2d_fwd(x, w, bias, res, stride, padding, dilation, groups, act, slope, True)
    assert out.requires_grad and not preact.requires_grad
