"""Numerics at the edges: +-inf and NaN inputs, huge and tiny magnitudes, fp16/bf16 scores beyond their
range, rows left with no key by a mask, GRU saturation. Each op against PyTorch on the same inputs
(SDPA's math backend, F.conv2d + epilogue, torch's GRU) under the tolerance rule, which also requires
NaN and +-inf at exactly the places of the float64 computation (testing.max_abs_diff): NaN where torch
gives NaN, finite where it is finite. tests/triton/test_triton_numerics_edges.py runs the same cases on
the Triton kernels.

Left out on purpose: non-finite values at masked-out positions (torch's math backend adds the -inf mask
to them and gets NaN, its flash backend skips them, the spec masks them: they do not reach our result)
and sums that overflow only in reduced precision (no float64 truth to hold them to)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import bmkernels
from bmkernels import reference
from bmkernels.testing import check_against_reference, cpu_supports

INF, NAN = math.inf, math.nan
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def poked(t, index, value):
    t = t.detach().clone()
    t[index] = value
    return t


def sdpa_math(q, k, v, bias=None, mask=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask is not None else bias)


def _qkv(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 7, 8, generator=gen).to(dtype) for _ in range(3)]


def _row_bias(value, dtype):
    bias = torch.zeros(7, 7)
    bias[3] = value
    return bias.to(dtype)


# name -> changes to (q, k, v) and options, from q, k, v and the dtype
ATTENTION_EDGES = {
    "q +inf": lambda q, k, v, dt: {"q": poked(q, (0, 0, 1, 2), INF)},
    "q nan": lambda q, k, v, dt: {"q": poked(q, (1, 1, 3, 0), NAN)},
    "k -inf": lambda q, k, v, dt: {"k": poked(k, (0, 1, 2, 5), -INF)},
    "v +inf": lambda q, k, v, dt: {"v": poked(v, (0, 1, 2, 3), INF)},
    "v nan": lambda q, k, v, dt: {"v": poked(v, (1, 0, 6, 7), NAN)},
    # scores ~1e6: beyond fp16's range (65504) in the q.k products, finite in the float accumulation (in
    # float32 nothing overflows, and the P recomputed from lse then errs 1e-4 on dq, as torch's flash does)
    "scores beyond fp16": lambda q, k, v, dt: {"q": q * 300, "k": k * 300} if dt != torch.float32 else {},
    "tiny": lambda q, k, v, dt: {"q": q * 1e-30, "k": k * 1e-30, "v": v * 1e-30} if dt != torch.float16 else {},
    "bias +inf entry": lambda q, k, v, dt: {"bias": poked(torch.zeros(7, 7, dtype=dt), (2, 4), INF)},
    "bias nan entry": lambda q, k, v, dt: {"bias": poked(torch.zeros(7, 7, dtype=dt), (5, 0), NAN)},
    "bias -inf row": lambda q, k, v, dt: {"bias": _row_bias(-INF, dt)},
    "mask empties a row": lambda q, k, v, dt: {"mask": _row_bias(1.0, torch.float32) == 0},
}


def attention_case(name, dtype):
    q, k, v = _qkv(dtype)
    inputs = {"q": q, "k": k, "v": v, "bias": None, "mask": None}
    inputs.update(ATTENTION_EDGES[name](q, k, v, dtype))
    for key in ("q", "k", "v"):
        inputs[key] = inputs[key].to(dtype).requires_grad_()
    return inputs


def check_attention_edge(name, dtype, backend):
    def kernel(q, k, v, bias, mask):
        return bmkernels.attention(q, k, v, bias=bias, mask=mask, backend=backend)

    check_against_reference(kernel, sdpa_math, attention_case(name, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ATTENTION_EDGES))
def test_attention_edges(name, dtype):
    check_attention_edge(name, dtype, "cpu")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_nan_row_reaches_dv_on_every_isa(isa, monkeypatch):
    """A query row whose scores hold NaN makes P NaN there: dV of every key it sees is NaN, as in torch
    (the AVX exp clamped NaN to a finite value: dV came back finite)."""
    if not cpu_supports(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    check_attention_edge("q nan", torch.float32, "cpu")
    check_attention_edge("bias +inf entry", torch.float32, "cpu")


ACTIVATIONS = [None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu"]


def _conv_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 6, 5, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    b, r = torch.randn(4, generator=gen), torch.randn(2, 4, 6, 5, generator=gen)
    return x.to(dtype), w.to(dtype), b.to(dtype), r.to(dtype)


CONV_EDGES = {
    "x +inf": lambda x, w, b, r: {"x": poked(x, (0, 1, 2, 2), INF)},
    "x nan": lambda x, w, b, r: {"x": poked(x, (1, 0, 0, 4), NAN)},
    "weight -inf": lambda x, w, b, r: {"weight": poked(w, (2, 1, 1, 0), -INF)},
    "bias +-inf": lambda x, w, b, r: {"bias": torch.tensor([-INF, INF, 0.0, 1.0]).to(b.dtype)},
    "residual -inf": lambda x, w, b, r: {"residual": poked(r, (0, 3, 1, 1), -INF)},
    "residual nan": lambda x, w, b, r: {"residual": poked(r, (1, 2, 5, 4), NAN)},
    "depthwise weight -inf": lambda x, w, b, r: {
        "weight": poked(w[:3, :1], (1, 0, 2, 2), -INF),
        "bias": b[:3],
        "residual": r[:, :3],
        "groups": 3,
    },
    "huge": lambda x, w, b, r: {"x": x * 1e18, "weight": w * 1e18},
    "tiny": lambda x, w, b, r: {"x": x * 1e-20, "weight": w * 1e-18, "bias": b * 1e-38},
}


def check_conv_edge(name, activation, dtype, backend):
    x, w, b, r = _conv_inputs(dtype)
    inputs = {"x": x, "weight": w, "bias": b, "residual": r}
    inputs.update(CONV_EDGES[name](x, w, b, r))
    groups = inputs.pop("groups", 1)
    inputs = {key: t.to(dtype).requires_grad_() for key, t in inputs.items()}
    options = {"padding": 1, "groups": groups, "activation": activation}

    def kernel(x, weight, bias, residual):
        return bmkernels.conv2d(x, weight, bias, **options, residual=residual, backend=backend)

    def ref(x, weight, bias, residual):
        return reference.conv.conv2d(x, weight, bias, **options, residual=residual)

    check_against_reference(kernel, ref, inputs, dtype)


# every activation where the edge reaches it in float32; else (and in bfloat16) the cheap and the fragile one
THROUGH_ACTIVATION = ("x +inf", "x nan", "residual -inf", "residual nan", "huge")
CONV_CASES = [
    (name, activation, dtype)
    for name in CONV_EDGES
    for dtype in (torch.float32, torch.bfloat16)
    for activation in (ACTIVATIONS if name in THROUGH_ACTIVATION and dtype == torch.float32 else ("relu", "gelu_tanh"))
    if dtype == torch.float32 or name in THROUGH_ACTIVATION
]


@pytest.mark.parametrize("name,activation,dtype", [pytest.param(*c, id="-".join(map(str, c))) for c in CONV_CASES])
def test_conv_edges(name, activation, dtype, monkeypatch):
    # our kernel (auto may pick ATen's by timing: that is torch's own conv, whose oneDNN kernels spread
    # NaN and inf beyond the receptive field in float32 and bfloat16, so it is not held to float64's)
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")
    check_conv_edge(name, activation, dtype, "cpu")


# Each CPU conv path with padding (x shape, weight shape, groups, padding, dilation): torch (float64's
# im2col) multiplies the zero padding by every weight, so an infinite or NaN weight makes NaN on the
# border, and a NaN dz there reaches every weight tap's gradient.
CONV_PATHS = {
    "depthwise": ((2, 8, 6, 5), (8, 1, 3, 3), 8, 1, 1),
    "depthwise dilated": ((1, 4, 5, 5), (4, 1, 3, 3), 4, 3, 2),
    "depthwise 1x1, pixels of padding only": ((1, 4, 4, 4), (4, 1, 1, 1), 4, 2, 1),
    "im2col": ((2, 3, 6, 5), (4, 3, 3, 3), 1, 1, 1),
    "direct": ((1, 32, 4, 30), (8, 32, 3, 3), 1, 1, 1),
    "input grad by phases": ((1, 16, 6, 6), (8, 16, 3, 3), 1, 1, 1),
    "1x1 padded": ((1, 4, 4, 4), (4, 4, 1, 1), 1, 1, 1),
    "grouped": ((1, 8, 6, 6), (8, 2, 3, 3), 4, 2, 1),
}


def check_conv_path_edge(path, edge, activation, dtype):
    x_shape, w_shape, groups, padding, dilation = CONV_PATHS[path]
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(x_shape, generator=gen), torch.randn(w_shape, generator=gen), torch.randn(w_shape[0])
    options = {"padding": padding, "groups": groups, "dilation": dilation, "activation": activation}
    r = torch.randn(reference.conv.conv2d(x, w, b, **options).shape, generator=gen)
    tap = (min(1, w_shape[2] - 1), min(2, w_shape[3] - 1))
    inputs = {
        "weight -inf": {"x": x, "weight": poked(w, (1, 0, *tap), -INF)},
        "weight nan": {"x": x, "weight": poked(w, (0, 0, 0, 0), NAN)},
        "x nan": {"x": poked(x, (0, 1, 0, 2), NAN), "weight": w},
        # NaN in the corner output only: its dz reaches the padding taps' weight gradient alone (gelu_tanh)
        "residual nan corner": {"x": x, "weight": w, "residual": poked(r, (0, 1, 0, 0), NAN)},
    }[edge]
    inputs = {key: t.to(dtype).requires_grad_() for key, t in {**inputs, "bias": b}.items()}
    check_against_reference(
        lambda x, weight, bias, residual=None: bmkernels.conv2d(
            x, weight, bias, **options, residual=residual, backend="cpu"
        ),
        lambda x, weight, bias, residual=None: reference.conv.conv2d(x, weight, bias, **options, residual=residual),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("edge", ["weight -inf", "weight nan", "x nan", "residual nan corner"])
@pytest.mark.parametrize("path", list(CONV_PATHS))
def test_conv_paths_padding_times_nonfinite(path, edge, activation, monkeypatch):
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")
    check_conv_path_edge(path, edge, activation, torch.float32)


@pytest.mark.parametrize("edge", ["weight -inf", "weight nan", "x nan"])
@pytest.mark.parametrize("path", ["im2col", "direct", "1x1 padded"])
def test_conv_aten_engine_relu_grad_at_nan(path, edge, monkeypatch):
    """The ATen engine's epilogue: relu's gradient passes at a NaN pre-activation, as torch's threshold_backward
    (float64: ATen's float32 conv is oneDNN's, which skips the padding as torch's own float32 conv does)."""
    monkeypatch.setenv("BMK_CONV_ENGINE", "aten")
    check_conv_path_edge(path, edge, "relu", torch.float64)


GRU_EDGES = {
    "saturated x": {"x_scale": 1e30},
    "saturated weights": {"w_scale": 1e20},
    "x 1e4": {"x_scale": 1e4},
    "x +inf": {"poke": ((1, 0, 2), INF)},
    "x nan": {"poke": ((2, 1, 0), NAN)},
    "tiny": {"x_scale": 1e-38, "w_scale": 1e-10},
}


def check_gru_edge(name, dtype, backend, num_layers=2):
    edge = GRU_EDGES[name]
    gen = torch.Generator().manual_seed(2)
    module = torch.nn.GRU(4, 6, num_layers=num_layers)
    x = torch.randn(5, 3, 4, generator=gen) * edge.get("x_scale", 1.0)
    if "poke" in edge:
        x = poked(x, *edge["poke"])
    inputs = {"x": x, "h0": torch.randn(num_layers, 3, 6, generator=gen)}
    for i, p in enumerate(module._flat_weights):
        inputs[f"w{i}"] = p.detach() * edge.get("w_scale", 1.0)
    inputs = {key: t.to(dtype).requires_grad_() for key, t in inputs.items()}
    options = {"num_layers": num_layers, "bidirectional": False, "batch_first": False, "dropout": 0.0}

    def kernel(x, h0, **w):  # output and h_n as one tensor (a pair would read as (out, lse))
        out, h_n = bmkernels.gru(x, h0, list(w.values()), **options, training=False, backend=backend)
        return torch.cat([out.flatten(), h_n.flatten()])

    def ref(x, h0, **w):
        out, h_n = reference.gru.gru(x, h0, list(w.values()), **options, training=False)
        return torch.cat([out.flatten(), h_n.flatten()])

    check_against_reference(kernel, ref, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(GRU_EDGES))
def test_gru_edges(name, dtype):
    check_gru_edge(name, dtype, "cpu")


def test_gru_reference_is_torch_on_the_edges():
    """The GRU reference the cases use agrees with torch's own GRU there (NaN/inf at the same places)."""
    torch.manual_seed(3)
    module = torch.nn.GRU(4, 6, num_layers=2)
    x = poked(torch.randn(5, 3, 4) * 1e30, (2, 1, 0), NAN)
    got, h_n = reference.gru.gru(
        x, None, module._flat_weights, num_layers=2, bidirectional=False, batch_first=False, dropout=0.0, training=False
    )
    want, want_h = module(x)
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(h_n, want_h, equal_nan=True)
