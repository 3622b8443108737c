"""conv2d v2 (csrc/cuda/conv_igemm.cu): our NHWC float16 / bfloat16 implicit-GEMM forward with the epilogue in
registers, selected by BMK_CUDA_CONV_ENGINE=igemm, against the float64 reference: forward and every gradient (the
backward is v1's), both memory formats, awkward channels and sizes, stride 2, dilation 2, padding 0..2 and
asymmetric, several pixel and channel blocks, k tails; run by the SIMT emulator on CPU tensors (its race detector
checks every launch) and by the GPU where there is one. Also the plans (csrc/cuda/conv_plan.h) and the fallback
to v1 where v2 does not apply."""

import warnings

import pytest
import torch

import bmkernels
from bmkernels.ops import conv as conv_op
from tests.cuda.test_cuda_emulator_conv import RUNNERS, check, kernel, needs_emulator, off_the_kink
from tests.ops.test_conv import make_inputs, rand

DTYPES = (torch.float16, torch.bfloat16)
CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# (batch, c_in, size, c_out, kernel, options): every case has C_in % 8 == 0, so v2 runs it
CASES = {
    "3x3 pad 1, 12 channels": (2, 8, 7, 12, 3, {"padding": 1, "activation": "relu"}),
    "stride 2 pad 0, 40 channels": (2, 16, 9, 40, 3, {"stride": 2, "activation": "gelu"}),
    "dilation 2 pad 2, k tail": (1, 24, 9, 10, 3, {"dilation": 2, "padding": 2, "activation": "silu"}),
    "rectangular": (2, 8, (5, 9), 8, (3, 2), {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}),
    "same even kernel": (1, 8, 6, 5, 4, {"padding": "same", "activation": "gelu_tanh"}),
    "1x1, 3 channel blocks": (2, 16, 5, 96, 1, {"activation": ("leaky_relu", 0.2)}),
    "3 pixel blocks, no bias, no residual": (3, 8, 8, 8, 3, {"padding": 1, "bias": False, "residual": False}),
    "input smaller than kernel": (1, 8, 2, 6, 5, {"padding": 2, "activation": "leaky_relu"}),
}


@pytest.fixture(autouse=True)
def igemm_engine(monkeypatch):
    monkeypatch.setenv("BMK_CUDA_CONV_ENGINE", "igemm")


def _sizes(size, kernel):
    return (size, size) if isinstance(size, int) else size, (kernel, kernel) if isinstance(kernel, int) else kernel


def _out_size(inputs, options):
    with warnings.catch_warnings():  # torch warns that padding="same" with an even kernel copies the input
        warnings.simplefilter("ignore")
        probe = torch.nn.functional.conv2d(
            inputs["x"].detach().float(),
            inputs["weight"].detach().float(),
            None,
            options.get("stride", 1),
            options.get("padding", 0),
            options.get("dilation", 1),
        )
    return tuple(probe.shape[-2:])


def _plan(dtype, x_shape, weight_shape, out_hw, groups=1, aligned16=True):
    """The v2 plan as a dict, or the reason v2 does not take the problem."""
    keys = ("threads", "block_m", "block_n", "block_k", "grid_m", "grid_n", "gemm_m", "gemm_k", "k_tiles", "shared")
    args = (CODE[dtype], x_shape[0], x_shape[1], weight_shape[0], *weight_shape[2:], *out_hw, groups, aligned16)
    plan = torch.ops.bmkernels.conv_igemm_cuda_plan(*args)
    return dict(zip(keys, plan, strict=True)) if plan else torch.ops.bmkernels.conv_igemm_cuda_fallback(*args)


def _case(case, dtype, channels_last):
    batch, c_in, size, c_out, kernel_size, options = CASES[case]
    options = dict(options)
    bias, residual = options.pop("bias", True), options.pop("residual", True)
    (h, w), (kh, kw) = _sizes(size, kernel_size)
    probe = make_inputs(batch, c_in, (h, w), c_out, (kh, kw), bias=False)
    out_hw = _out_size(probe, options)
    inputs = make_inputs(
        batch, c_in, (h, w), c_out, (kh, kw), bias=bias, residual=residual, dtype=dtype, out_size=out_hw,
        channels_last=channels_last,
    )  # fmt: skip
    return inputs, options, out_hw


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, channels_last, dtype):
    inputs, options, out_hw = _case(case, dtype, channels_last)
    assert isinstance(_plan(dtype, inputs["x"].shape, inputs["weight"].shape, out_hw), dict), "v2 takes this case"
    out, _, grads = check(backend, off_the_kink(inputs, dtype, options), dtype, **options)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
    assert grads["x"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_activation(backend, dtype):
    """Every code of the op's table: codes added to it are covered here without a change."""
    for activation in (*conv_op._ACTIVATION_CODES, ("leaky_relu", -1.5)):
        inputs = make_inputs(2, 8, 5, 9, 3, residual=True, out_size=(5, 5), dtype=dtype, channels_last=True)
        options = {"padding": 1, "activation": activation}
        check(backend, off_the_kink(inputs, dtype, options), dtype, **options)


@pytest.mark.parametrize("backend", RUNNERS)
def test_non_contiguous_inputs(backend):
    """Views of x, weight and residual that are neither NCHW- nor NHWC-dense (v2 runs on NHWC copies)."""
    dtype = torch.bfloat16
    x = rand(3, 8, 9, 12, dtype=dtype, requires_grad=False).permute(0, 1, 3, 2)[1:].detach().requires_grad_(True)
    weight = rand(6, 16, 3, 3, dtype=dtype, scale=0.5, requires_grad=False)[:, ::2].detach().requires_grad_(True)
    residual = rand(2, 6, 9, 24, dtype=dtype, requires_grad=False)[..., ::2].transpose(2, 3)
    inputs = {"x": x, "weight": weight, "bias": rand(6, dtype=dtype), "residual": residual.detach().requires_grad_()}
    options = {"padding": 1, "activation": "relu"}
    check(backend, off_the_kink(inputs, dtype, options), dtype, **options)


def _v1_and_v2(monkeypatch, inputs, **options):
    outs = []
    for engine in ("aten", "igemm"):
        monkeypatch.setenv("BMK_CUDA_CONV_ENGINE", engine)
        outs.append(kernel("cuda_emulated", **options)(**inputs))
    return outs


@needs_emulator
def test_falls_back_to_v1(monkeypatch):
    """Where v2 does not apply the plan says why and the result is v1's, bit for bit (fp32 C % 8 fails first)."""
    for dtype, c_in, groups, why in (
        (torch.float16, 12, 1, "C_in = 12 is not a multiple of 8"),
        (torch.bfloat16, 3, 1, "C_in = 3 is not a multiple of 8"),
        (torch.float16, 16, 2, "groups = 2"),
        (torch.float32, 8, 1, "float32"),
    ):
        inputs = make_inputs(2, c_in, 6, 8, 3, groups=groups, residual=True, out_size=(6, 6), dtype=dtype)
        assert why in _plan(dtype, inputs["x"].shape, inputs["weight"].shape, (6, 6), groups)
        v1, v2 = _v1_and_v2(monkeypatch, inputs, padding=1, groups=groups, activation="silu")
        assert torch.equal(v1, v2)
    # x at an odd address: v2 needs 16-byte aligned rows
    storage = torch.randn(2 * 8 * 6 * 6 + 1).half()
    x = storage[1:].view(2, 6, 6, 8).permute(0, 3, 1, 2)
    inputs = {"x": x, "weight": rand(8, 8, 3, 3, dtype=torch.float16, requires_grad=False)}
    assert "16-byte" in _plan(torch.float16, x.shape, (8, 8, 3, 3), (6, 6), aligned16=False)
    v1, v2 = _v1_and_v2(monkeypatch, inputs, padding=1)
    assert torch.equal(v1, v2)


@needs_emulator
def test_v2_rounds_once(monkeypatch):
    """v2 keeps the convolution in float32 through bias and residual (v1 rounds ATen's output first): closer to
    float64, and so not v1's result bit for bit."""
    inputs = make_inputs(2, 32, 6, 16, 3, residual=True, out_size=(6, 6), dtype=torch.float16, channels_last=True)
    exact = bmkernels.conv2d(**{n: t.detach().double() for n, t in inputs.items()}, padding=1, backend="reference")
    v1, v2 = (out.double() for out in _v1_and_v2(monkeypatch, inputs, padding=1))
    assert not torch.equal(v1, v2)
    assert (v2 - exact).abs().mean() < (v1 - exact).abs().mean()


@needs_emulator
def test_engine_name_is_checked(monkeypatch):
    monkeypatch.setenv("BMK_CUDA_CONV_ENGINE", "cudnn")
    inputs = make_inputs(1, 8, 4, 8, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="BMK_CUDA_CONV_ENGINE must be aten or igemm; got 'cudnn'"):
        kernel("cuda_emulated")(**inputs)


@needs_emulator
def test_empty_batch(monkeypatch):
    x = torch.zeros(0, 8, 5, 5, dtype=torch.float16, requires_grad=True)
    w = rand(4, 8, 3, 3, dtype=torch.float16)
    y = kernel("cuda_emulated", activation="relu")(x, w)
    assert y.shape == (0, 4, 3, 3)


# ------------------------------------------------------------------------------------------------
# Planning (csrc/cuda/conv_plan.h), plain C++ run on the CPU.


def test_plans_tile_every_problem():
    for dtype in DTYPES:
        for c_in in (8, 16, 264):
            for c_out in (1, 8, 31, 32, 33, 40, 64, 65, 96, 200):
                for kernel_hw in ((1, 1), (3, 3), (7, 2)):
                    for batch, out_hw in ((0, (4, 4)), (1, (1, 1)), (2, (9, 13)), (64, (56, 56))):
                        p = _plan(dtype, (batch, c_in), (c_out, c_in, *kernel_hw), out_hw)
                        bn = p["block_n"]
                        waste = {n: -(-c_out // n) * n - c_out for n in (32, 64)}
                        assert bn == (32 if waste[32] < waste[64] else 64), "the tile that pads C_out less"
                        assert (p["threads"], p["block_m"], p["block_k"]) == (128, 64, 32)
                        assert p["gemm_m"] == batch * out_hw[0] * out_hw[1]
                        assert p["gemm_k"] == kernel_hw[0] * kernel_hw[1] * c_in
                        assert p["k_tiles"] * 32 >= p["gemm_k"] > (p["k_tiles"] - 1) * 32
                        assert p["grid_m"] * 64 >= p["gemm_m"] > (p["grid_m"] - 1) * 64 or p["gemm_m"] == 0
                        assert p["grid_n"] * bn >= c_out > (p["grid_n"] - 1) * bn
                        # two stages of (64 + block_n) rows of 32 + 8 elements: under the 48 KB default
                        assert p["shared"] == 2 * (64 + bn) * 40 * 2 <= 48 * 1024


def test_plan_refusals_name_the_reason():
    x, w = (2, 8), (4, 8, 3, 3)
    assert "float32" in _plan(torch.float32, x, w, (4, 4))
    assert "groups = 4" in _plan(torch.float16, x, w, (4, 4), groups=4)
    assert "16-byte" in _plan(torch.float16, x, w, (4, 4), aligned16=False)
    assert "exceeds CUDA's limits" in _plan(torch.float16, (2**20, 8), w, (2**12, 2**12))
