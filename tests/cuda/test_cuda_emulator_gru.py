"""The CUDA GRU kernels (the GEMMs through ATen, our fused gate kernel per step, csrc/cuda/gru_kernels.cu)
against the float64 reference: the CPU op's cell and layer cases (tests/ops/test_gru.py; multi-layer,
bidirectional, lengths, batch_first) in float32, float16 and bfloat16, outputs and every gradient, run by
the SIMT emulator on CPU tensors (backend "cuda_emulated"; every launch checked by its race detector) and,
where there is a GPU, by the GPU (backend "cuda", the same tests). Also the launch plan (csrc/cuda/gru.h)."""

import pytest
import torch

import bmkernels
from bmkernels import _extension
from bmkernels.reference import gru as reference
from tests.ops.test_gru import CELL_SHAPES, GRU_CASES, _layer_args, check_rule, gru_fn, gru_weights, nn_gru, rand

EMULATED = "gru" in _extension.emulated_kernels()
needs_emulator = pytest.mark.skipif(not EMULATED, reason="built without BMK_CUDA_EMULATOR=1")
ON_GPU = torch.cuda.is_available() and "gru" in _extension.cuda_kernels()
RUNNERS = [
    pytest.param("cuda_emulated", marks=needs_emulator),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="no CUDA build")]),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the CPU cases that size the CPU kernel's thread partition (1400 rows, 2^24 multiply-adds a step) are left out:
# the CUDA kernels take one thread per unit at any size, and the emulator runs one fiber per thread
LAYER_CASES = [case for case in GRU_CASES if case not in ("batch_blocks", "library_steps")]


def on(backend, fn):
    """fn (of tensors) on `backend`: its arguments moved to the GPU and its results back for "cuda"."""
    if backend == "cuda_emulated":
        return fn

    def moved(*tensors):
        result = fn(*[t.cuda() for t in tensors])
        return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()

    return moved


def cell(backend):
    return on(backend, lambda *tensors: bmkernels.gru_cell(*tensors, backend=backend))


def layers(backend, num_layers, bidirectional, batch_first=False, **kw):
    if "lengths" in kw and backend == "cuda":
        kw["lengths"] = kw["lengths"].cuda()
    return on(
        backend,
        gru_fn(lambda *a, **k: bmkernels.gru(*a, **k, backend=backend), num_layers, bidirectional, batch_first, **kw),
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cell_matches_reference(backend, dtype, shape, bias):
    batch, input_size, hidden = shape
    gen = torch.Generator().manual_seed(batch * 100 + hidden)
    w_ih, w_hh, *biases = gru_weights(input_size, hidden, bias=bias, dtype=dtype, seed=hidden)
    tensors = [rand(batch, input_size, dtype=dtype, gen=gen), rand(batch, hidden, dtype=dtype, gen=gen), w_ih, w_hh]
    check_rule(cell(backend), reference.gru_cell, [*tensors, *biases], dtype)


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_gru_matches_reference(backend, case, dtype):
    steps, batch, input_size, hidden, num_layers, bi, bias, batch_first = GRU_CASES[case]
    gen = torch.Generator().manual_seed(steps * 31 + hidden)
    x = rand(*((batch, steps) if batch_first else (steps, batch)), input_size, dtype=dtype, gen=gen)
    h0 = rand(num_layers * (2 if bi else 1), batch, hidden, dtype=dtype, gen=gen)
    weights = gru_weights(input_size, hidden, num_layers, bi, bias, dtype=dtype)
    check_rule(
        layers(backend, num_layers, bi, batch_first),
        gru_fn(reference.gru, num_layers, bi, batch_first),
        [x, h0, *weights],
        dtype,
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_layers", (1, 2))
def test_gru_lengths_match_reference(backend, dtype, num_layers):
    """Unsorted lengths (a PackedSequence's), bidirectional: past-the-end steps keep the state, output 0,
    pass the state's gradient through; the backward direction starts at each row's own end."""
    gen = torch.Generator().manual_seed(3)
    x, h0 = rand(6, 4, 3, dtype=dtype, gen=gen), rand(2 * num_layers, 4, 9, dtype=dtype, gen=gen)
    weights = gru_weights(3, 9, num_layers, True, dtype=dtype)
    lengths = torch.tensor([6, 2, 4, 1])
    check_rule(
        layers(backend, num_layers, True, lengths=lengths),
        gru_fn(reference.gru, num_layers, True, lengths=lengths),
        [x, h0, *weights],
        dtype,
    )


@pytest.mark.parametrize("backend", RUNNERS)
@pytest.mark.parametrize("bi", (False, True), ids=("uni", "bi"))
def test_gru_matches_nn_gru(backend, bi):
    weights = gru_weights(4, 6, 2, bi, True)
    module = nn_gru(4, 6, 2, bi, True, weights)
    x, h0 = torch.randn(5, 3, 4, requires_grad=True), torch.randn(4 if bi else 2, 3, 6, requires_grad=True)
    got = layers(backend, 2, bi)(x, h0, *module._flat_weights)
    want = module(x, h0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    params = [x, h0, *module.parameters()]
    loss = sum(o.square().sum() for o in got)
    for a, b in zip(
        torch.autograd.grad(loss, params), torch.autograd.grad(sum(o.square().sum() for o in want), params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", RUNNERS)
def test_non_contiguous_inputs_and_empty_batch(backend):
    gen = torch.Generator().manual_seed(6)
    x = rand(3, 8, 2 * 5, gen=gen)[:, :, ::2]  # strided feature dim
    h0 = rand(3, 2, 4, gen=gen).transpose(0, 1)  # (2, 3, 4), transposed storage
    weights = [w.t().contiguous().t() if w.dim() == 2 else w for w in gru_weights(5, 4, 1, True)]
    check_rule(
        layers(backend, 1, True), gru_fn(reference.gru, 1, True), [x.transpose(0, 1), h0, *weights], torch.float32
    )
    tensors = [rand(5, 2 * 5, gen=gen)[:, ::2], rand(4, 5, gen=gen).t(), *weights[:4]]
    check_rule(cell(backend), reference.gru_cell, tensors, torch.float32)
    x0, h00 = torch.zeros(4, 0, 5, requires_grad=True), torch.zeros(2, 0, 4, requires_grad=True)
    leaves = [w.detach().requires_grad_() for w in weights]
    out, h_n = layers(backend, 1, True)(x0, h00, *leaves)
    assert out.shape == (4, 0, 8) and h_n.shape == (2, 0, 4)
    grads = torch.autograd.grad(out.sum() + h_n.sum(), leaves)
    assert all(not g.any() for g in grads)


@needs_emulator
def test_dropout_between_layers_matches_reference():
    """dropout on each layer's output but the last, the mask from torch's generator as the reference draws it."""
    weights = gru_weights(4, 6, 3, True)
    x, h0 = torch.randn(5, 2, 4), torch.randn(6, 2, 6)
    kwargs = dict(num_layers=3, bidirectional=True, batch_first=False, dropout=0.4, training=True)
    torch.manual_seed(11)
    got = bmkernels.gru(x, h0, weights, **kwargs, backend="cuda_emulated")
    torch.manual_seed(11)
    want = reference.gru(x, h0, weights, **kwargs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", RUNNERS)
def test_backward_is_deterministic(backend):
    """Two backward runs give bit-identical gradients (no atomics; the GEMMs as torch's flags make them)."""
    weights = [w.requires_grad_() for w in gru_weights(5, 12, 1, True, dtype=torch.float16)]
    x = torch.randn(7, 6, 5).half().requires_grad_()
    h0 = torch.randn(2, 6, 12).half().requires_grad_()
    fn = layers(backend, 1, True, lengths=torch.tensor([7, 1, 3, 5, 7, 2]))
    runs = [torch.autograd.grad(fn(x, h0, *weights)[0].float().square().sum(), [x, h0, *weights]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@needs_emulator
def test_dtypes_by_backend():
    weights = gru_weights(3, 4, dtype=torch.float64)
    kwargs = dict(num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=False)
    with pytest.raises(TypeError, match="backend 'cuda_emulated' takes float16, bfloat16 or float32"):
        bmkernels.gru(torch.randn(2, 1, 3, dtype=torch.float64), None, weights, **kwargs, backend="cuda_emulated")
    half = [w.half() for w in weights]
    with pytest.raises(TypeError, match="float16 runs on backend 'cuda', 'cuda_emulated' or 'triton'"):
        bmkernels.gru(torch.randn(2, 1, 3).half(), None, half, **kwargs, backend="cpu")
    with pytest.raises(RuntimeError, match=r"gru \(CUDA kernel, emulated\): x must be float16"):
        torch.ops.bmkernels.gru_cell_emulated_fwd(
            torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64), *weights, False
        )


@needs_emulator
@pytest.mark.parametrize("variant", ("bias", "nobias_lengths", "one_direction_nosave"))
def test_opcheck_emulated_layer(variant):
    """Schema, fake kernels, autograd registration of the emulated operators (torch.compile traces them)."""
    nosave = variant == "one_direction_nosave"
    args = _layer_args(
        bias=variant == "bias", lengths="lengths" in variant, directions=1 if nosave else 2, save=not nosave
    )
    for i in range(6):
        if args[i] is not None and args[7]:
            args[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.bmkernels.gru_layer_emulated_fwd.default, args)
    with torch.no_grad():
        out, h_n, ws = torch.ops.bmkernels.gru_layer_emulated_fwd(*args[:7], True)
    bwd_args = [
        torch.randn_like(out),
        torch.randn_like(h_n),
        *[a.detach() for a in args[:4]],
        args[6],
        ws,
        args[4] is not None,
    ]
    torch.library.opcheck(torch.ops.bmkernels.gru_layer_emulated_bwd.default, bwd_args)
    cell_args = [rand(3, 5), rand(3, 7), *gru_weights(5, 7)]
    torch.library.opcheck(
        torch.ops.bmkernels.gru_cell_emulated_fwd.default, [a.requires_grad_(True) for a in cell_args] + [True]
    )


def test_plans():
    for directions in (1, 2):
        for batch in (0, 1, 7, 300):
            for hidden in (1, 17, 256, 1000):
                threads, blocks = torch.ops.bmkernels.gru_cuda_plan(directions, batch, hidden)
                assert threads == 256 and blocks == -(-directions * batch * hidden // 256)
    with pytest.raises(RuntimeError, match="hidden size must be >= 1"):
        torch.ops.bmkernels.gru_cuda_plan(1, 1, 0)
    with pytest.raises(RuntimeError, match="exceed 2"):
        torch.ops.bmkernels.gru_cuda_plan(2, 2**31, 2**10)
