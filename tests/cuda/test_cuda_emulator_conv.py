"""The CUDA conv2d kernels (v1: the convolution through ATen, our fused epilogue and grad pass,
csrc/cuda/conv_kernels.cu) against the float64 reference: the CPU op's cases (tests/ops/test_conv.py) in
float32, float16 and bfloat16, both memory formats, forward and every gradient, run by the SIMT emulator on
CPU tensors (backend "cuda_emulated"; every launch checked by its race detector) and, where there is a GPU,
by the GPU (backend "cuda", the same tests). Also the launch plans (csrc/cuda/conv_plan.h)."""

import pytest
import torch

import bmkernels
from bmkernels import _extension
from bmkernels.ops import conv as conv_op
from bmkernels.reference import conv as reference
from bmkernels.testing import check_against_reference
from tests.ops.test_conv import CASES, _case_inputs, _fwd_args, make_inputs, rand, reference_fn

EMULATED = "conv2d" in _extension.emulated_kernels()
needs_emulator = pytest.mark.skipif(not EMULATED, reason="built without BMK_CUDA_EMULATOR=1")
ON_GPU = torch.cuda.is_available() and "conv2d" in _extension.cuda_kernels()
RUNNERS = [
    pytest.param("cuda_emulated", marks=needs_emulator),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="no CUDA build")]),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel(backend, **options):
    """bmkernels.conv2d on `backend` as a function of CPU tensors (moved to the GPU and back for "cuda";
    the memory format travels with the tensors)."""

    def run(x, weight, **tensors):
        if backend == "cuda":
            x, weight = x.cuda(), weight.cuda()
            tensors = {n: t.cuda() for n, t in tensors.items()}
        out = bmkernels.conv2d(x, weight, **tensors, **options, backend=backend)
        return out.cpu() if backend == "cuda" else out

    return run


# where each activation's derivative jumps (names the op's table may gain: cnn's relu6 and hardswish)
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0)}


def off_the_kink(inputs, dtype, options):
    """float16 / bfloat16 with an activation whose derivative jumps (KINKS): pre-activations within a few units
    of rounding of a kink moved off it (the residual nudged there). v1 rounds ATen's convolution output to the
    dtype before the epilogue adds bias and residual, as torch's own conv + add does in another order: such a
    value can land on either side of the kink in the kernel, in torch and in the float64 truth, and the gradient
    there jumps by the whole incoming gradient (the CPU op keeps its accumulator in float32 and needs no nudge)."""
    activation = options.get("activation")
    name = activation[0] if isinstance(activation, tuple) else activation
    if dtype == torch.float32 or name not in KINKS:
        return inputs
    exact = {n: t.detach().double() for n, t in inputs.items()}
    z = reference.conv2d(**exact, **{**options, "activation": None})
    margin = 8 * torch.finfo(dtype).eps * max(z.abs().max().item(), 1.0)
    push = torch.zeros_like(z)
    for kink in KINKS[name]:
        push = torch.where((z - kink).abs() < margin, torch.where(z < kink, -2 * margin, 2 * margin), push)
    residual = inputs["residual"]
    nudged = (exact["residual"] + push).to(dtype).contiguous(memory_format=_format(residual))
    return {**inputs, "residual": nudged.requires_grad_(residual.requires_grad)}


def _format(t):
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def check(backend, inputs, dtype, **options):
    return check_against_reference(kernel(backend, **options), reference_fn(**options), inputs, dtype)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, channels_last, dtype):
    # float16 / bfloat16: always a residual, for off_the_kink
    residual = case not in ("1x1", "valid") or dtype != torch.float32
    inputs, options = _case_inputs(case, dtype, channels_last, residual=residual)
    out, _, grads = check(backend, off_the_kink(inputs, dtype, options), dtype, **options)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    assert grads["x"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_activation_every_gradient(backend, dtype):
    # the op's own table: codes added to it are covered here without a change
    for activation in (*conv_op._ACTIVATION_CODES, ("leaky_relu", 0.0), ("leaky_relu", -1.5)):
        inputs = make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(7, 7), dtype=dtype)
        options = {"padding": 1, "activation": activation}
        check(backend, off_the_kink(inputs, dtype, options), dtype, **options)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_several_chunks_and_channel_tiles(backend, channels_last):
    """The grad pass over more pixels than one chunk (NCHW: 2 chunks of 2048 pixels; channels_last: 40 output
    channels in 2 tiles of 32, 12 chunks of 64 pixels) and the in-order reduction of the chunks' sums."""
    inputs = make_inputs(2, 3, 40, 40, 3, residual=True, out_size=(20, 20), channels_last=channels_last)
    check(backend, inputs, torch.float32, stride=2, padding=1, activation="silu")


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_non_contiguous_inputs(backend, dtype):
    """Sliced x, weight and residual views; transposed views that are neither NCHW nor NHWC."""
    base = rand(3, 10, 9, 11, dtype=dtype, requires_grad=False)
    x = base[1:, ::2, :, 1:].detach().requires_grad_(True)
    weight = rand(6, 10, 3, 3, dtype=dtype, requires_grad=False)[:, ::2].detach().requires_grad_(True)
    bias = rand(12, dtype=dtype, requires_grad=False)[::2].detach().requires_grad_(True)
    residual = rand(2, 6, 10, 9, dtype=dtype, requires_grad=False).transpose(2, 3).detach().requires_grad_(True)
    check(backend, {"x": x, "weight": weight, "bias": bias, "residual": residual}, dtype, padding=1, activation="silu")
    xt = rand(2, 9, 8, 4, dtype=dtype, requires_grad=False).permute(0, 3, 2, 1).detach().requires_grad_(True)
    check(backend, {"x": xt, "weight": rand(5, 4, 3, 3, dtype=dtype)}, dtype, stride=2, activation="relu")


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_grad_output_in_another_layout(backend, channels_last):
    inputs = make_inputs(2, 4, 7, 6, 3, residual=True, out_size=(7, 7), channels_last=channels_last)
    leaves = list(inputs.values())
    for grad_out in (
        torch.randn(2, 6, 7, 14)[..., ::2],
        torch.randn(2, 6, 7, 7).contiguous(
            memory_format=torch.contiguous_format if channels_last else torch.channels_last
        ),
    ):
        got = torch.autograd.grad(kernel(backend, padding=1, activation="gelu")(**inputs), leaves, grad_out)
        want = torch.autograd.grad(bmkernels.conv2d(**inputs, padding=1, activation="gelu"), leaves, grad_out)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", RUNNERS)
def test_only_some_gradients(backend):
    for frozen in (("x", "bias"), ("weight",), ("x", "weight", "residual"), ("bias", "residual")):
        for activation in ("gelu", None):
            inputs = make_inputs(2, 4, 6, 5, 3, residual=True, out_size=(4, 4))
            for name in frozen:
                inputs[name].requires_grad_(False)
            check(backend, inputs, torch.float32, activation=activation)


@pytest.mark.parametrize("backend", RUNNERS)
def test_unbatched_empty_batch_and_no_grad(backend):
    inputs = make_inputs(1, 3, 8, 5, 3, residual=True, out_size=(8, 8), unbatched=True)
    out, _, _ = check(backend, inputs, torch.float32, padding=1, activation="relu")
    assert out.shape == (5, 8, 8)
    x = torch.zeros(0, 3, 6, 6, requires_grad=True)
    w, b = rand(4, 3, 3, 3), rand(4)
    y = kernel(backend, activation="silu")(x, w, bias=b)
    assert y.shape == (0, 4, 4, 4)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and not gw.any() and not gb.any()
    inputs = make_inputs(2, 4, 6, 5, 3)
    with torch.no_grad():
        a = kernel(backend, activation="gelu")(**inputs)
    assert torch.equal(a, kernel(backend, activation="gelu")(**inputs).detach())


@pytest.mark.parametrize("backend", RUNNERS)
def test_backward_is_deterministic(backend):
    """No atomics: two backward runs give bit-identical gradients (bias sums over several chunks)."""
    inputs = make_inputs(2, 3, 40, 8, 3, residual=True, out_size=(40, 40), dtype=torch.float16, channels_last=True)
    grads = [
        torch.autograd.grad(
            kernel(backend, padding=1, activation="gelu")(**inputs).float().square().sum(), list(inputs.values())
        )
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@needs_emulator
def test_refuses_float64_and_names_it():
    x, w = rand(1, 2, 4, 4, dtype=torch.float64), rand(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32 on backend 'cuda_emulated'"):
        bmkernels.conv2d(x, w, backend="cuda_emulated")
    with pytest.raises(RuntimeError, match=r"conv2d \(CUDA kernel, emulated\): x must be float16"):
        torch.ops.bmkernels.conv2d_emulated_fwd(x, w, None, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, 0, 0.0, False)


@needs_emulator
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("optional", (False, True), ids=("no_optional", "all_optional"))
def test_opcheck_emulated_ops(optional, channels_last):
    """Schema, fake kernels, autograd registration of the emulated operators (torch.compile traces them)."""
    args = _fwd_args(channels_last, optional)
    torch.library.opcheck(torch.ops.bmkernels.conv2d_emulated_fwd.default, args)
    x, w, bias, res, stride, padding, dilation, groups, act, slope, _ = _fwd_args(channels_last)
    out, preact = torch.ops.bmkernels.conv2d_emulated_fwd(
        x, w, bias, res, stride, padding, dilation, groups, act, slope, True
    )
    for mask in ([True] * 4, [False, True, False, True], [True, False, True, False]):
        bwd_args = (torch.randn_like(out), x, w, preact, stride, padding, dilation, groups, act, slope, False, mask)
        torch.library.opcheck(torch.ops.bmkernels.conv2d_emulated_bwd.default, bwd_args)


# ------------------------------------------------------------------------------------------------
# Launch planning (csrc/cuda/conv_plan.h), plain C++ run on the CPU.


def _plan(numel, channels, inner, pixels):
    keys = ("threads", "blocks", "cpb", "tpc", "tiles", "chunks", "chunk_pixels", "shared", "partial")
    return dict(zip(keys, torch.ops.bmkernels.conv_cuda_plan(numel, channels, inner, pixels), strict=True))


def test_plans_cover_every_pixel_and_channel():
    for channels in (1, 7, 32, 33, 513):
        for inner in (1, 49, 3136):
            for outer in (0, 1, 3, 64, 5000):
                pixels = outer * inner
                p = _plan(pixels * channels, channels, inner, pixels)
                assert p["threads"] == 256 and p["blocks"] == min(-(-pixels * channels // 1024), 1 << 16)
                assert p["cpb"] == (32 if inner == 1 else 1) and p["cpb"] * p["tpc"] == 256
                assert p["shared"] == 1024
                if pixels == 0:
                    assert p["chunks"] == 0
                    continue
                assert p["tiles"] * p["cpb"] >= channels > (p["tiles"] - 1) * p["cpb"]
                # whole pixel lanes per chunk, at least 8 pixels per thread, at most 1024 chunks covering all pixels
                assert p["chunk_pixels"] % p["tpc"] == 0 and p["chunk_pixels"] >= 8 * p["tpc"]
                assert p["chunks"] <= 1024 and p["chunks"] * p["chunk_pixels"] >= pixels
                assert (p["chunks"] - 1) * p["chunk_pixels"] < pixels
                assert p["partial"] == p["chunks"] * channels


def test_plan_errors():
    with pytest.raises(RuntimeError, match="inner >= 1"):
        _plan(10, 10, 0, 1)
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        _plan(2**40, 2**36, 1, 2**4)  # 2^31 channel tiles
