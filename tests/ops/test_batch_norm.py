"""bmkernels.batch_norm_act and the torch.ops.bmkernels.batch_norm_act_* operators: training-mode BatchNorm
fused with the residual and the activation, against torch's batch_norm + add + activation (float64 truth,
the tolerance rule), every gradient, both memory formats, the running statistics, every ISA build,
opcheck, gradcheck, torch.compile, and clear errors on bad input."""

import pytest
import torch
from torch.library import opcheck

import bmkernels
from bmkernels.reference import batch_norm as reference
from bmkernels.testing import assert_within_rule, check_against_reference, cpu_supports, float64_tolerance
from tests import fuzzing

ACTIVATIONS = [None, "relu", ("leaky_relu", 0.2), "gelu", "gelu_tanh", "silu", "relu6", "hardswish"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_inputs(shape=(3, 6, 5, 7), dtype=torch.float32, channels_last=False, residual=True, affine=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    # per-channel offsets and scales, so the statistics matter
    x = torch.randn(shape, generator=gen) * (torch.rand(c, generator=gen) * 3 + 0.5).view(1, c, 1, 1)
    x = x + (torch.rand(c, generator=gen) * 4 - 2).view(1, c, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = {"x": x.to(dtype).contiguous(memory_format=fmt).requires_grad_()}
    inputs["weight"] = (torch.rand(c, generator=gen) + 0.5).to(dtype).requires_grad_() if affine else None
    inputs["bias"] = (torch.randn(c, generator=gen)).to(dtype).requires_grad_() if affine else None
    inputs["residual"] = (
        torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_() if residual else None
    )
    return inputs


def kernel_fn(activation=None, momentum=0.1, eps=1e-5):
    def run(x, weight, bias, residual):
        c = x.shape[1]
        stats = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
        return bmkernels.batch_norm_act(
            x, *stats, weight, bias, True, momentum, eps, activation=activation, residual=residual, backend="cpu"
        )

    return run


def reference_fn(activation=None, momentum=0.1, eps=1e-5):
    def run(x, weight, bias, residual):
        c = x.shape[1]
        stats = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
        return reference.batch_norm_act(
            x, *stats, weight, bias, True, momentum, eps, activation=activation, residual=residual
        )

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_matches_reference(activation, channels_last, dtype):
    inputs = make_inputs(dtype=dtype, channels_last=channels_last)
    out, _, grads = check_against_reference(kernel_fn(activation), reference_fn(activation), inputs, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert set(grads) == {"x", "weight", "bias", "residual"}


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 1, 2), (2, 1, 1, 1), (5, 17, 3, 1), (2, 40, 33, 35), (16, 3, 1, 1), (4, 130, 2, 3)],
    ids=str,
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_awkward_shapes(shape, channels_last):
    """One value per image, one channel, planes longer than a summing block, more channels than lanes."""
    inputs = make_inputs(shape, dtype=torch.float32, channels_last=channels_last)
    check_against_reference(kernel_fn("relu"), reference_fn("relu"), inputs, torch.float32)


@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (3, 300, 1, 2)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_vectorized_activations(activation, shape, channels_last):
    """SiLU/GELU run on SIMD chunks of 256 values: planes and channels_last rows longer than a chunk, with a
    partial chunk and a partial vector at the end; large |z| where the activations saturate."""
    inputs = make_inputs(shape, dtype=torch.float32, channels_last=channels_last)
    with torch.no_grad():
        inputs["residual"][:, :, :1] *= 40  # |z| up to ~150: exp overflows / underflows in float
    check_against_reference(kernel_fn(activation), reference_fn(activation), inputs, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_vectorized_activation_gradient_subsets(channels_last):
    """SiLU's dz kept by the sums pass in dx, in the residual's gradient, or in neither."""
    for needs in (("x",), ("residual",), ("x", "residual"), ("weight", "bias")):
        inputs = make_inputs((2, 3, 17, 19), dtype=torch.float32, channels_last=channels_last)
        for name, t in inputs.items():
            t.requires_grad_(name in needs)
        _, _, grads = check_against_reference(kernel_fn("silu"), reference_fn("silu"), inputs, torch.float32)
        assert set(grads) == set(needs)


# x of shape (1, C, H, 1) or (1, C, 1, W) stored in reversed dim order: channels_last with an N stride of 1
FEW_VALUES = [(1, 2, 2, 1), (1, 3, 1, 3), (3, 2, 1, 1), (1, 4, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("shape", FEW_VALUES, ids=str)
def test_few_values_per_channel(shape, layout, dtype):
    """Two or three values per channel: dx ~ (1 - xhat^2) ~ eps / var nearly cancels; every layout."""
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "x": fuzzing.randn(shape, dtype, layout, seed=1, requires_grad=True),
        "weight": torch.randn(shape[1], generator=gen).to(dtype).requires_grad_(),
        "bias": torch.randn(shape[1], generator=gen).to(dtype).requires_grad_(),
        "residual": None,
    }
    check_against_reference(kernel_fn(), reference_fn(), inputs, dtype)


def _batch_norm_by_formula(x, weight):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1)


@pytest.mark.parametrize(
    "shape,x_layout,grad_layout",
    [
        ((1, 2, 2, 1), "permuted", "contiguous"),
        ((1, 3, 4, 1), "permuted", "contiguous"),
        ((1, 2, 1, 2), "contiguous", "permuted"),
    ],
    ids=str,
)
def test_reference_right_where_torch_pairs_wrongly(shape, x_layout, grad_layout):
    """The reference's gradients equal the formula's in float64 for the layouts torch's batch_norm
    backward gets wrong (a size-1 dim with an unusual stride in x or in grad_out)."""
    x = fuzzing.randn(shape, torch.float64, x_layout, seed=2, requires_grad=True)
    weight = torch.rand(shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    grad = fuzzing.randn(shape, torch.float64, grad_layout, seed=4)
    (got,) = torch.autograd.grad(reference.batch_norm_act(x, None, None, weight, None, True), x, grad)
    (want,) = torch.autograd.grad(_batch_norm_by_formula(x, weight), x, grad)
    assert (got - want).abs().max().item() <= float64_tolerance(want.abs().max().item())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_optional_arguments(residual, affine):
    inputs = make_inputs(dtype=torch.float64, residual=residual, affine=affine)
    check_against_reference(kernel_fn("silu"), reference_fn("silu"), inputs, torch.float64)


def test_only_some_gradients():
    """Each subset of inputs requiring grad gets exactly its gradients (absent optionals shift the indices)."""
    for needs in (("x",), ("weight",), ("bias",), ("residual",), ("weight", "residual"), ("x", "bias")):
        for affine in (True, False):
            inputs = make_inputs(dtype=torch.float64, affine=affine)
            for name, t in inputs.items():
                if t is not None:
                    t.requires_grad_(name in needs)
            if not any(t is not None and t.requires_grad for t in inputs.values()):
                continue
            check_against_reference(kernel_fn("relu"), reference_fn("relu"), inputs, torch.float64)


def test_large_mean_does_not_cancel():
    """Values far from 0 with a small spread: the shifted sums keep the variance."""
    inputs = make_inputs((4, 5, 9, 9), dtype=torch.float32)
    with torch.no_grad():
        inputs["x"].mul_(1e-3).add_(1e3)
    check_against_reference(kernel_fn(), reference_fn(), inputs, torch.float32)


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_running_statistics(momentum, dtype, channels_last):
    """Updated as F.batch_norm does: momentum, the unbiased batch variance in the running estimate."""
    inputs = make_inputs(dtype=dtype, channels_last=channels_last)
    x, w, b, r = (inputs[k] for k in ("x", "weight", "bias", "residual"))
    c = x.shape[1]
    gen = torch.Generator().manual_seed(3)
    start = torch.rand(c, generator=gen, dtype=torch.float64), torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    ours = [s.to(dtype, copy=True) for s in start]
    same = [s.to(dtype, copy=True) for s in start]
    truth = [s.clone() for s in start]
    for _ in range(2):
        bmkernels.batch_norm_act(x, *ours, w, b, True, momentum, 1e-5, activation="relu", residual=r)
        reference.batch_norm_act(x, *same, w, b, True, momentum, 1e-5, activation="relu", residual=r)
        reference.batch_norm_act(
            x.double(), *truth, w.double(), b.double(), True, momentum, 1e-5, activation="relu", residual=r.double()
        )
    for name, o, s, t in zip(("running_mean", "running_var"), ours, same, truth, strict=True):
        assert_within_rule(name, o, t, s, dtype)


def test_eval_and_untracked_statistics_follow_torch():
    """Eval mode with running statistics runs torch's ops (the conv before it folds them); training
    without running statistics (track_running_stats=False) normalizes with the batch's, in the kernel."""
    inputs = make_inputs(dtype=torch.float64)
    x, w, b, r = (inputs[k] for k in ("x", "weight", "bias", "residual"))
    rm, rv = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    got = bmkernels.batch_norm_act(x, rm, rv, w, b, False, activation="relu", residual=r)
    want = reference.batch_norm_act(x, rm, rv, w, b, False, activation="relu", residual=r)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = bmkernels.batch_norm_act(x, None, None, w, b, True, activation="relu", residual=r, backend="cpu")
    want = reference.batch_norm_act(x, None, None, w, b, True, activation="relu", residual=r)
    assert (got - want).abs().max().item() <= float64_tolerance(want.abs().max().item())


def test_matches_the_modules():
    """BatchNorm2d + residual + ReLU in training mode, as a CNN block runs them: outputs, every gradient
    and the running statistics alike."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    mine = torch.nn.BatchNorm2d(6).double().train()
    mine.load_state_dict(bn.state_dict())
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    want = torch.relu(bn(x) + r)
    got = bmkernels.batch_norm_act(
        x,
        mine.running_mean,
        mine.running_var,
        mine.weight,
        mine.bias,
        True,
        mine.momentum,
        mine.eps,
        activation="relu",
        residual=r,
    )
    tol = float64_tolerance(want.abs().max().item())
    assert (got - want).abs().max().item() <= tol
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, bn.weight, bn.bias), g)
    got_grads = torch.autograd.grad(got, (x, mine.weight, mine.bias), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max().item() <= float64_tolerance(b.abs().max().item())
    for name in ("running_mean", "running_var"):
        assert (getattr(mine, name) - getattr(bn, name)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_isa_paths(isa, monkeypatch):
    if not cpu_supports(isa):
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    for channels_last in (False, True):
        inputs = make_inputs((3, 20, 6, 5), dtype=torch.float32, channels_last=channels_last)
        check_against_reference(kernel_fn("gelu"), reference_fn("gelu"), inputs, torch.float32)


def test_non_contiguous_inputs():
    base = make_inputs((3, 6, 10, 7), dtype=torch.float64)
    inputs = {
        "x": base["x"].detach()[:, :, ::2].requires_grad_(),
        "weight": torch.rand(12, dtype=torch.float64)[::2].requires_grad_(),
        "bias": base["bias"],
        "residual": base["residual"].detach().transpose(2, 3).contiguous().transpose(2, 3)[:, :, ::2].requires_grad_(),
    }
    check_against_reference(kernel_fn("relu"), reference_fn("relu"), inputs, torch.float64)


def test_float16():
    inputs = make_inputs(dtype=torch.float16)
    check_against_reference(kernel_fn("silu"), reference_fn("silu"), inputs, torch.float16)


def test_gradcheck():
    inputs = make_inputs((2, 3, 3, 2), dtype=torch.float64)
    fn = kernel_fn("silu")
    assert torch.autograd.gradcheck(lambda *a: fn(*a), tuple(inputs[k] for k in ("x", "weight", "bias", "residual")))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(channels_last):
    inputs = make_inputs(dtype=torch.float32, channels_last=channels_last)
    x, w, b, r = (inputs[k] for k in ("x", "weight", "bias", "residual"))
    opcheck(torch.ops.bmkernels.batch_norm_act_fwd, (x, w, b, r, 1e-5, 5, 0.01, True))
    opcheck(torch.ops.bmkernels.batch_norm_act_fwd, (x.detach(), None, None, None, 1e-5, 1, 0.0, False))
    out, mean, invstd, _, preact = torch.ops.bmkernels.batch_norm_act_fwd(
        x.detach(), w.detach(), b.detach(), r.detach(), 1e-5, 5, 0.01, True
    )
    g = torch.randn_like(out)
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, False]):
        opcheck(
            torch.ops.bmkernels.batch_norm_act_bwd,
            (g, x.detach(), w.detach(), mean, invstd, preact, 5, 0.01, False, mask),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def test_compile_fullgraph():
    inputs = make_inputs(dtype=torch.float32)
    x, w, b, r = (inputs[k] for k in ("x", "weight", "bias", "residual"))
    rm, rv = torch.zeros(6), torch.ones(6)
    fn = torch.compile(
        lambda x, w, b, r: bmkernels.batch_norm_act(x, rm, rv, w, b, True, activation="relu", residual=r),
        fullgraph=True,
    )
    out = fn(x, w, b, r)
    eager_rm, eager_rv = torch.zeros(6), torch.ones(6)
    want = bmkernels.batch_norm_act(x, eager_rm, eager_rv, w, b, True, activation="relu", residual=r)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(rm, eager_rm)
    torch.testing.assert_close(rv, eager_rv)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


BAD_PUBLIC = [
    ("x 3-D", dict(x=torch.randn(2, 3, 4)), ValueError, "x must be 4-D"),
    ("weight shape", dict(weight=torch.ones(4)), ValueError, "weight must have shape"),
    ("residual shape", dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual must have x's shape"),
    ("residual dtype", dict(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), ValueError, "residual"),
    ("activation", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("half stats", dict(running_var=None), ValueError, "both tensors or both None"),
    ("backend", dict(backend="triton"), ValueError, "backend must be one of"),
    ("one value per channel", dict(x=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
]


@pytest.mark.parametrize("case", BAD_PUBLIC, ids=[c[0] for c in BAD_PUBLIC])
def test_bad_public_input(case):
    _, overrides, error, message = case
    args = dict(
        x=torch.randn(2, 3, 4, 4), running_mean=torch.zeros(3), running_var=torch.ones(3), weight=None, bias=None
    )
    kwargs = {k: overrides.pop(k) for k in ("activation", "residual", "backend") if k in overrides}
    args.update(overrides)
    with pytest.raises(error, match=message):
        bmkernels.batch_norm_act(**args, training=True, **kwargs)


def test_cpu_backend_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match="backend 'cpu' runs CPU tensors"):
        bmkernels.batch_norm_act(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), training=False, backend="cpu")


X = torch.randn(2, 3, 4, 4)
BAD_RAW_FWD = [
    ("x 3-D", (torch.randn(3, 4, 4), None, None, None, 1e-5, 1, 0.0, False), "x must be 4-D"),
    ("x int", (torch.ones(2, 3, 4, 4, dtype=torch.int64), None, None, None, 1e-5, 1, 0.0, False), "floating-point"),
    ("one value", (torch.randn(1, 3, 1, 1), None, None, None, 1e-5, 1, 0.0, False), "more than 1 value per channel"),
    ("weight", (X, torch.ones(2), None, None, 1e-5, 1, 0.0, False), "weight must have shape \\(3,\\)"),
    ("bias 2-D", (X, None, torch.ones(3, 1), None, 1e-5, 1, 0.0, False), "bias must have shape \\(3,\\)"),
    ("residual shape", (X, None, None, torch.randn(2, 3, 4, 5), 1e-5, 1, 0.0, False), "residual must have x's shape"),
    ("residual dtype", (X, None, None, X.double(), 1e-5, 1, 0.0, False), "residual must have x's dtype"),
    ("eps", (X, None, None, None, -1.0, 1, 0.0, False), "eps must be >= 0"),
    ("activation", (X, None, None, None, 1e-5, 99, 0.0, False), "activation must be a code"),
]


@pytest.mark.parametrize("case", BAD_RAW_FWD, ids=[c[0] for c in BAD_RAW_FWD])
def test_bad_raw_forward(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bmkernels.batch_norm_act_fwd(*args)


def test_bad_raw_backward():
    out, mean, invstd, _, _ = torch.ops.bmkernels.batch_norm_act_fwd(X, None, None, None, 1e-5, 1, 0.0, False)
    mask = [True, True, True, True]
    cases = [
        ((X[:, :, :3], X, None, mean, invstd, out, 1, 0.0, True, mask), "grad_out must have x's shape"),
        ((X, X, None, mean, invstd, out[:1], 1, 0.0, True, mask), "act_saved must have x's shape"),
        ((X, X, None, mean[:2], invstd, out, 1, 0.0, True, mask), "mean must have shape \\(3,\\)"),
        ((X, X, None, mean, invstd.view(3, 1), out, 1, 0.0, True, mask), "invstd must have shape \\(3,\\)"),
        ((X, X, None, mean, invstd, out, 3, 0.0, True, mask), "saved_is_output needs an activation"),
        ((X.double(), X, None, mean, invstd, out, 1, 0.0, True, mask), "grad_out must have x's dtype"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.bmkernels.batch_norm_act_bwd(*args)
