"""The Triton conv2d kernels (bmkernels/triton/conv.py) against the reference: forward and every
gradient (input, weight, bias, residual) on the CPU op's cases (tests/ops/test_conv.py: odd channels, 1x1,
3x3, 7x7 stem, stride 2, dilation 2, padding "same"/"valid", rectangular, groups, depthwise with and
without a channel multiplier), both memory formats, every activation, non-contiguous and empty
inputs, routing, determinism, bad inputs. Tolerance rule: tests/conftest.py.

Where it runs:
- no GPU (CI): under the Triton interpreter on CPU tensors, small shapes, float32 and float16 (the
  interpreter cannot do bfloat16 arithmetic). tests/conftest.py sets TRITON_INTERPRET=1 before
  anything imports triton; an autouse fixture keeps it set for these tests.
- a CUDA GPU: the same tests on CUDA tensors plus bfloat16, larger shapes, inductor and full opcheck.
"""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# Without a GPU, tests/conftest.py switched the Triton interpreter on before anything imported triton.
triton_conv = pytest.importorskip("bmkernels.triton.conv", reason="triton is not installed")

import bmkernels  # noqa: E402
from bmkernels import _backend  # noqa: E402
from bmkernels.reference import conv as reference  # noqa: E402
from bmkernels.testing import check_against_reference  # noqa: E402
from tests.ops.test_conv import CASES, _case_inputs, make_inputs, reference_fn  # noqa: E402  (the CPU op's cases)

# tanh and sigmoid from exp saturate correctly where exp overflows to inf; numpy (the interpreter) warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.gpu(
        reason="the Triton interpreter cannot compute in bfloat16 (test_interpreter_refuses_bfloat16)"
    ),
)
INTERPRETER_ONLY_SKIP = pytest.mark.skipif(ON_GPU, reason="checks the interpreter set-up")
GPU_ONLY = pytest.mark.gpu(reason="needs a CUDA GPU: large shapes are too slow for the Triton interpreter")


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_fn(**options):
    return lambda x, weight, **tensors: bmkernels.conv2d(x, weight, **options, **tensors, backend="triton")


def on_device(inputs):
    return {name: t.detach().to(DEVICE).requires_grad_(t.requires_grad) for name, t in inputs.items()}


def check(inputs, dtype, **options):
    return check_against_reference(triton_fn(**options), reference_fn(**options), on_device(inputs), dtype)


# ------------------------------------------------------------------------------------------------
# Every case of the CPU op, forward and every gradient, against the float64 reference.

# under the interpreter each case runs once per (dtype, memory format) pair below; on a GPU every pair
LAYOUTS = [(torch.float32, False), (torch.float16, True)] + (
    [(torch.float32, True), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)] if ON_GPU else []
)


@pytest.mark.parametrize(
    "dtype,channels_last", LAYOUTS, ids=[f"{str(d)[6:]}-{'channels_last' if c else 'nchw'}" for d, c in LAYOUTS]
)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_matches_reference(case, dtype, channels_last):
    inputs, options = _case_inputs(case, dtype, channels_last, residual=case not in ("1x1", "valid"))
    out, _, grads = check(inputs, dtype, **options)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    assert set(grads) == set(inputs)


ACTIVATIONS = reference.ACTIVATIONS + (("leaky_relu", 0.0), ("leaky_relu", -1.5))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, BF16), ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.slow
def test_every_activation(activation, dtype):
    """Each activation with a residual: the derivative read off the output (None, relu, leaky_relu with a
    positive slope) or off the saved pre-activation (the others)."""
    inputs = make_inputs(2, 5, 6, 7, 3, residual=True, out_size=(6, 6), dtype=dtype, seed=3)
    check(inputs, dtype, padding=1, activation=activation)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "residual"])
def test_single_gradient(wanted):
    """Only one input requires grad: the backward computes just that gradient (output_mask)."""
    inputs = make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(4, 4))
    for name, t in inputs.items():
        t.requires_grad_(name == wanted)
    check(inputs, torch.float32, stride=2, padding=1, activation="gelu")


# (batch, c_in, size, c_out, groups, stride, dtype, channels_last): channel counts above the kernels' channel
# blocks (16 under the interpreter), so every channel loop and channel-block grid axis runs more than once
MANY_CHANNELS = [
    (2, 37, 6, 35, 1, 1, torch.float32, False),
    (2, 40, 6, 36, 2, 2, torch.float16, True),
    (1, 40, 6, 40, 40, 1, torch.float32, True),
]


@pytest.mark.parametrize(
    "batch,c_in,size,c_out,groups,stride,dtype,channels_last", MANY_CHANNELS, ids=["dense", "grouped", "depthwise"]
)
def test_many_channels(batch, c_in, size, c_out, groups, stride, dtype, channels_last):
    out_size = (size - 1) // stride + 1
    inputs = make_inputs(
        batch,
        c_in,
        size,
        c_out,
        3,
        groups=groups,
        residual=True,
        dtype=dtype,
        channels_last=channels_last,
        out_size=(out_size, out_size),
    )
    check(inputs, dtype, stride=stride, padding=1, groups=groups, activation="gelu")


def test_single_input_channel():
    """C_in = 1 with groups = 1 is a depthwise conv with multiplier C_out (the direct kernels)."""
    check(
        make_inputs(2, 1, 7, 5, 3, residual=True, out_size=(4, 4)),
        torch.float32,
        stride=2,
        padding=1,
        activation="gelu",
    )


def test_unbatched():
    inputs = make_inputs(1, 3, 7, 5, 3, residual=True, out_size=(7, 7), unbatched=True)
    check(inputs, torch.float32, padding=1, activation="silu")


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous_inputs(layout):
    inputs = make_inputs(2, 4, 9, 6, 3, residual=True, out_size=(9, 9))
    if layout == "sliced":  # every other column of a wider image, residual likewise
        inputs["x"] = torch.randn(2, 4, 9, 18)[..., ::2].requires_grad_()
        inputs["residual"] = torch.randn(3, 6, 9, 9)[1:].requires_grad_()
    else:  # H and W swapped in memory; the weight a transposed view
        inputs["x"] = torch.randn(2, 4, 9, 9).transpose(2, 3).requires_grad_()
        inputs["weight"] = torch.randn(6, 4, 3, 3).transpose(2, 3).mul(0.5).detach().requires_grad_()
    check(inputs, torch.float32, padding=1, activation="relu")


def test_backward_is_deterministic():
    """No atomics: the weight gradient's slices and the bias partial sums are added by torch in order."""
    inputs = on_device(make_inputs(2, 6, 9, 8, 3, residual=True, out_size=(9, 9)))
    runs = []
    for _ in range(2):
        out = bmkernels.conv2d(**inputs, padding=1, activation="silu", backend="triton")
        runs.append(torch.autograd.grad(out.square().sum(), list(inputs.values())))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_weight_gradient_slices():
    """More output pixels than one slice holds: the weight gradient is summed over several slices."""
    assert 2 * 9 * 9 > triton_conv.PIXELS_PER_SPLIT or ON_GPU
    check(make_inputs(2, 3, 9, 4, 3), torch.float32, padding=1)


def test_empty_batch():
    x = torch.randn(0, 3, 5, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    out = bmkernels.conv2d(x, w, b, padding=1, activation="gelu", backend="triton")
    assert out.shape == (0, 4, 5, 5)
    dx, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    assert dx.shape == x.shape and not dw.any() and not db.any()


# ------------------------------------------------------------------------------------------------
# Selection and errors.


@pytest.mark.parametrize("via", ["argument", "env"])
def test_routes_to_the_triton_kernel(via, monkeypatch):
    calls = []
    kernel = triton_conv.conv2d_fwd
    monkeypatch.setattr(triton_conv, "conv2d_fwd", lambda *a: calls.append(1) or kernel(*a))
    kwargs = {"backend": "triton"} if via == "argument" else {}
    if via == "env":
        monkeypatch.setenv("BMK_BACKEND", "triton")
    inputs = on_device(make_inputs(1, 3, 6, 4, 3))
    out = bmkernels.conv2d(**inputs, padding=1, **kwargs)
    torch.testing.assert_close(out, reference.conv2d(**inputs, padding=1), atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_build_info_lists_the_kernel():
    assert "conv2d" in bmkernels.build_info()["triton_kernels"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU auto picks the CUDA C++ kernel if compiled, else Triton")
def test_auto_on_cpu_is_the_cpu_kernel():
    assert _backend.choose("conv2d", torch.device("cpu")) == "cpu"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="runs only under the Triton interpreter"):
        bmkernels.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), backend="triton")


def test_float64_is_refused():
    x, w = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs on backend='cpu'"):
        bmkernels.conv2d(x.to(DEVICE), w.to(DEVICE), backend="triton")


@pytest.mark.skipif(ON_GPU, reason="float16 CPU tensors: the CPU kernel has no float16 path")
def test_float16_is_triton_only():
    x, w = torch.randn(1, 3, 5, 5).half(), torch.randn(4, 3, 3, 3).half()
    with pytest.raises(TypeError, match="float32, float64 or bfloat16 .float16 on backend='triton'."):
        bmkernels.conv2d(x, w)


@INTERPRETER_ONLY_SKIP
def test_interpreter_refuses_bfloat16():
    x, w = torch.randn(1, 3, 5, 5).bfloat16(), torch.randn(4, 3, 3, 3).bfloat16()
    with pytest.raises(TypeError, match="interpreter .* cannot compute in bfloat16"):
        bmkernels.conv2d(x, w, backend="triton")


def test_argument_errors_are_the_ops():
    """Argument checks are shared with the CPU backend (bmkernels/ops/conv.py)."""
    with pytest.raises(ValueError, match="expects 2 input channels"):
        bmkernels.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), backend="triton")


def test_direct_operator_calls_check_shapes():
    """The operators, called directly, refuse shapes that would make a kernel read or write outside a tensor."""
    x, w, bias, res = _fwd_inputs()
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 6, 4, 4\); got \(2, 6, 4, 3\)"):
        torch.ops.bmkernels.conv2d_triton_fwd(x, w, bias, res[..., :3], *FWD_ARGS, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.bmkernels.conv2d_triton_fwd(x, w, bias[:5], res, *FWD_ARGS, False)
    with pytest.raises(ValueError, match="do not make a conv2d"):
        torch.ops.bmkernels.conv2d_triton_fwd(x, w[:, :1], bias, res, *FWD_ARGS, False)
    out, preact = torch.ops.bmkernels.conv2d_triton_fwd(x, w, bias, res, *FWD_ARGS, True)
    with pytest.raises(ValueError, match="act_saved must have the output's shape"):
        torch.ops.bmkernels.conv2d_triton_bwd(out, x, w, preact[:1], *FWD_ARGS, False, [True] * 4)


@INTERPRETER_ONLY_SKIP
def test_interpreter_uses_one_small_config():
    assert triton_conv.INTERPRETED
    for kernel in (
        triton_conv._fwd_kernel,
        triton_conv._dx_kernel,
        triton_conv._dweight_kernel,
        triton_conv._depthwise_fwd_kernel,
        triton_conv._depthwise_dx_kernel,
        triton_conv._depthwise_dweight_kernel,
    ):
        assert len(kernel.configs) == 1


# ------------------------------------------------------------------------------------------------
# torch.compile and opcheck; GPU only: large shapes.


def test_compile_fullgraph():
    """Dynamo traces the triton_op without a graph break. Under the interpreter only with the 'eager'
    backend (AOT autograd and inductor cannot run interpreted kernels on fake tensors)."""
    torch._dynamo.reset()
    inputs = on_device(make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(4, 4), channels_last=True))

    def fn(x, weight, bias, residual):
        return (
            bmkernels.conv2d(
                x, weight, bias, stride=2, padding=1, activation="gelu", residual=residual, backend="triton"
            )
            * 2
        )

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if ON_GPU else "eager")
    out = compiled(**inputs)
    want = fn(**inputs)
    torch.testing.assert_close(out, want)
    assert out.is_contiguous(memory_format=torch.channels_last)
    leaves = list(inputs.values())
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), leaves), strict=True):
        torch.testing.assert_close(a, b)


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ()
)
# x, weight, bias, residual, stride, padding (top, bottom, left, right), dilation, groups, activation (gelu), slope
FWD_ARGS = ((2, 1), [1, 2, 0, 1], (1, 2), 2, 3, 0.01)


def _fwd_inputs():
    inputs = on_device(make_inputs(2, 4, 7, 6, 3, groups=2, residual=True, out_size=(4, 4), channels_last=True))
    return inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"]


def test_opcheck_fwd():
    torch.library.opcheck(
        torch.ops.bmkernels.conv2d_triton_fwd.default, (*_fwd_inputs(), *FWD_ARGS, True), test_utils=OPCHECK_UTILS
    )


@pytest.mark.parametrize("mask", ([True, True, True, True], [False, True, False, True]), ids=str)
def test_opcheck_bwd(mask):
    x, w, bias, res = _fwd_inputs()
    out, preact = torch.ops.bmkernels.conv2d_triton_fwd(x, w, bias, res, *FWD_ARGS, True)
    # plain tensors: opcheck would otherwise differentiate through the backward op, which has no autograd
    args = (torch.randn_like(out), x.detach(), w.detach(), preact.detach(), *FWD_ARGS, False, mask)
    torch.library.opcheck(torch.ops.bmkernels.conv2d_triton_bwd.default, args, test_utils=OPCHECK_UTILS)
    grads = torch.ops.bmkernels.conv2d_triton_bwd(*args)
    for g, wanted, shape in zip(grads, mask, (x.shape, w.shape, bias.shape, out.shape), strict=True):
        assert g.shape == (shape if wanted else (0,))


@GPU_ONLY
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, BF16), ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize(
    "shape", [(8, 64, 56, 64, 3, 1), (4, 256, 28, 256, 3, 1), (8, 96, 56, 96, 3, 96), (4, 128, 30, 256, 1, 1)], ids=str
)
def test_large(shape, channels_last, dtype):
    batch, c_in, size, c_out, kernel, groups = shape
    inputs = make_inputs(
        batch,
        c_in,
        size,
        c_out,
        kernel,
        groups=groups,
        residual=True,
        dtype=dtype,
        channels_last=channels_last,
        out_size=(size, size),
    )
    check(inputs, dtype, padding=kernel // 2, groups=groups, activation="silu")
