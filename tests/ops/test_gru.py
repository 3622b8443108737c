"""Tests of bmkernels.gru_cell and bmkernels.gru (CPU kernels): against the float64 reference with the
tolerance rule of tests/conftest.py, against torch.nn.GRU / torch.nn.GRUCell with the same weights,
packed sequences, dropout, gradcheck, opcheck, torch.compile, each ISA path, non-contiguous and bad inputs."""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bmkernels
from bmkernels.reference import gru as reference
from bmkernels.testing import assert_within_rule, cpu_supports, magnitude

ISAS = ("scalar", "avx2", "avx512")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def rand(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def gru_weights(input_size, hidden, num_layers=1, bidirectional=False, bias=True, dtype=torch.float32, seed=0):
    """Weights in torch.nn.GRU._flat_weights order, drawn like nn.GRU's init (uniform +-1/sqrt(H))."""
    gen = torch.Generator().manual_seed(seed)
    bound = hidden**-0.5
    weights = []
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else hidden * (2 if bidirectional else 1)
        for _ in range(2 if bidirectional else 1):
            shapes = [(3 * hidden, layer_input), (3 * hidden, hidden)] + ([(3 * hidden,)] * 2 if bias else [])
            weights += [((torch.rand(s, generator=gen) * 2 - 1) * bound).to(dtype) for s in shapes]
    return weights


def leaves(tensors, dtype=None):
    """Fresh leaves requiring grad (cast to dtype if given), same strides as the originals."""
    return [(t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_(True) for t in tensors]


def outputs_and_grads(fn, tensors, grad_outs):
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * g.to(o.device, o.dtype)).sum() for o, g in zip(outs, grad_outs, strict=True))
    return list(outs) + list(torch.autograd.grad(loss, tensors))


def check_rule(kernel_fn, reference_fn, tensors, dtype, seed=7):
    """Outputs and every gradient of kernel_fn(*tensors) within the tolerance rule against reference_fn
    in float64 (PyTorch's own error: reference_fn in dtype). Returns the kernel's results."""
    probe = kernel_fn(*[t.detach() for t in tensors])
    probe = probe if isinstance(probe, tuple) else (probe,)
    gen = torch.Generator().manual_seed(seed)
    grad_outs = [rand(*o.shape, dtype=dtype, gen=gen) for o in probe]
    got = outputs_and_grads(kernel_fn, leaves(tensors), grad_outs)
    truth = outputs_and_grads(reference_fn, leaves(tensors, torch.float64), grad_outs)
    same = outputs_and_grads(reference_fn, leaves(tensors), grad_outs)
    scale = max([1.0] + [magnitude(t) for t in truth])
    for i, (g, t, s) in enumerate(zip(got, truth, same, strict=True)):
        assert g.dtype == dtype, f"result {i} has dtype {g.dtype}"
        assert_within_rule(f"result {i}", g, t, s, dtype, scale)
    return got


def gru_fn(impl, num_layers, bidirectional, batch_first=False, n_weights=None, **kw):
    """(x, h0, *weights) -> (output, h_n) through impl (bmkernels.gru or reference.gru)."""

    def fn(x, h0, *weights):
        return impl(
            x,
            h0,
            list(weights),
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=batch_first,
            dropout=kw.get("dropout", 0.0),
            training=kw.get("training", False),
            lengths=kw.get("lengths"),
        )

    return fn


def nn_gru(input_size, hidden, num_layers, bidirectional, bias, weights, batch_first=False, dtype=torch.float32):
    module = torch.nn.GRU(
        input_size, hidden, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    ).to(dtype)
    with torch.no_grad():
        for p, w in zip(module._flat_weights, weights, strict=True):
            p.copy_(w)
    return module


# ------------------------------------------------------------------------------------------------
# GRU cell


CELL_SHAPES = ((1, 5, 3), (3, 7, 17), (2, 4, 1), (33, 6, 9))  # (B, I, H); B = 33 takes the GEMM path


@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cell_matches_reference(dtype, shape, bias):
    batch, input_size, hidden = shape
    gen = torch.Generator().manual_seed(batch * 100 + hidden)
    w_ih, w_hh, *biases = gru_weights(input_size, hidden, bias=bias, dtype=dtype, seed=hidden)
    tensors = [
        rand(batch, input_size, dtype=dtype, gen=gen),
        rand(batch, hidden, dtype=dtype, gen=gen),
        w_ih,
        w_hh,
        *biases,
    ]
    check_rule(bmkernels.gru_cell, reference.gru_cell, tensors, dtype)


@pytest.mark.parametrize("batch", (1, 12))
def test_cell_matches_nn_grucell(batch):
    cell = torch.nn.GRUCell(10, 20)
    x, h = torch.randn(batch, 10, requires_grad=True), torch.randn(batch, 20, requires_grad=True)
    params = list(cell.parameters())
    got = bmkernels.gru_cell(x, h, *params)
    want = cell(x, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, [x, h] + params, g), torch.autograd.grad(want, [x, h] + params, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cell_unbatched_and_default_state():
    cell = torch.nn.GRUCell(6, 5)
    x = torch.randn(6)
    torch.testing.assert_close(bmkernels.gru_cell(x, None, *cell.parameters()), cell(x), rtol=1e-5, atol=1e-6)
    h = torch.randn(5)
    torch.testing.assert_close(bmkernels.gru_cell(x, h, *cell.parameters()), cell(x, h), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# GRU layers


GRU_CASES = {  # (T, B, I, H, num_layers, bidirectional, bias, batch_first)
    "1layer": (7, 3, 5, 17, 1, False, True, False),
    "hidden1": (4, 2, 3, 1, 2, True, True, False),
    "hidden3_T1": (1, 4, 2, 3, 1, False, False, True),
    "batch1_bi": (9, 1, 4, 6, 1, True, True, True),
    "3layers_bi_nobias": (5, 2, 3, 4, 3, True, False, False),
    "thread_per_direction": (6, 5, 8, 70, 1, True, True, False),  # two hidden blocks per direction
    "hidden_blocks": (4, 6, 5, 80, 1, False, True, False),  # threads split one direction's hidden units
    "batch_blocks": (2, 1400, 3, 5, 1, False, True, False),  # one hidden block: the batch is split
    # >= 2^24 multiply-adds per step: the backward's dh_prev runs as one library GEMM per direction
    "library_steps": (3, 224, 6, 160, 1, True, True, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRU_CASES)
def test_gru_matches_reference(case, dtype):
    steps, batch, input_size, hidden, layers, bi, bias, batch_first = GRU_CASES[case]
    gen = torch.Generator().manual_seed(steps * 31 + hidden)
    x = rand(*((batch, steps) if batch_first else (steps, batch)), input_size, dtype=dtype, gen=gen)
    h0 = rand(layers * (2 if bi else 1), batch, hidden, dtype=dtype, gen=gen)
    weights = gru_weights(input_size, hidden, layers, bi, bias, dtype=dtype)
    check_rule(
        gru_fn(bmkernels.gru, layers, bi, batch_first),
        gru_fn(reference.gru, layers, bi, batch_first),
        [x, h0, *weights],
        dtype,
    )


@pytest.mark.parametrize("layers", (1, 2, 3))
@pytest.mark.parametrize("bi", (False, True), ids=("uni", "bi"))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
def test_gru_matches_nn_gru(layers, bi, bias):
    steps, batch, input_size, hidden = 6, 3, 5, 7
    weights = gru_weights(input_size, hidden, layers, bi, bias, seed=layers)
    module = nn_gru(input_size, hidden, layers, bi, bias, weights, batch_first=True)
    x = torch.randn(batch, steps, input_size, requires_grad=True)
    h0 = torch.randn(layers * (2 if bi else 1), batch, hidden, requires_grad=True)
    got = bmkernels.gru(
        x, h0, module._flat_weights, num_layers=layers, bidirectional=bi, batch_first=True, dropout=0.0, training=True
    )
    want = module(x, h0)
    grads = [torch.randn_like(t) for t in want]
    inputs = [x, h0] + module._flat_weights
    for a, b in zip(
        list(got) + list(torch.autograd.grad(got, inputs, grads)),
        list(want) + list(torch.autograd.grad(want, inputs, grads)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gru_unbatched_and_default_state():
    weights = gru_weights(4, 5, 2, True)
    module = nn_gru(4, 5, 2, True, True, weights)
    x = torch.randn(6, 4)
    for h0 in (None, torch.randn(4, 5)):
        got = bmkernels.gru(
            x, h0, weights, num_layers=2, bidirectional=True, batch_first=False, dropout=0.0, training=False
        )
        for a, b in zip(got, module(x, h0), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bi", (False, True), ids=("uni", "bi"))
def test_empty_batch(bi):
    """Batch 0 gives nn.GRU's (empty) shapes and zero weight gradients, forward and backward (it once
    divided by zero in the work split)."""
    weights = [w.requires_grad_() for w in gru_weights(4, 5, 2, bi)]
    module = nn_gru(4, 5, 2, bi, True, weights)
    x = torch.randn(3, 0, 4, requires_grad=True)
    out, h_n = bmkernels.gru(
        x, None, weights, num_layers=2, bidirectional=bi, batch_first=False, dropout=0.0, training=False
    )
    ref_out, ref_h_n = module(x)
    assert out.shape == ref_out.shape and h_n.shape == ref_h_n.shape
    grads = torch.autograd.grad(out.sum() + h_n.sum(), [x, *weights])
    assert grads[0].shape == x.shape
    assert all(g.shape == w.shape and not g.any() for g, w in zip(grads[1:], weights, strict=True))
    cell_x, cell_h = torch.randn(0, 4, requires_grad=True), torch.randn(0, 5)
    h_next = bmkernels.gru_cell(cell_x, cell_h, *weights[:4])
    assert h_next.shape == (0, 5)
    assert not torch.autograd.grad(h_next.sum(), weights[0])[0].any()


@pytest.mark.parametrize("bi", (False, True), ids=("uni", "bi"))
def test_gru_packed_unsorted_lengths_match_nn_gru(bi):
    """lengths as a PackedSequence carries them, unsorted: equals nn.GRU on the packed sequence (outputs
    past a sequence's end are 0, h_n is each sequence's last state) and so do all gradients."""
    steps, batch, input_size, hidden, layers = 7, 5, 3, 6, 2
    lengths = torch.tensor([3, 7, 1, 5, 7])
    weights = gru_weights(input_size, hidden, layers, bi)
    module = nn_gru(input_size, hidden, layers, bi, True, weights, batch_first=True)
    x = torch.randn(batch, steps, input_size, requires_grad=True)
    h0 = torch.randn(layers * (2 if bi else 1), batch, hidden, requires_grad=True)
    out, h_n = bmkernels.gru(
        x,
        h0,
        module._flat_weights,
        num_layers=layers,
        bidirectional=bi,
        batch_first=True,
        dropout=0.0,
        training=False,
        lengths=lengths,
    )
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    packed_out, want_h_n = module(packed, h0)
    want_out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=steps)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, want_h_n, rtol=1e-5, atol=1e-6)
    g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
    inputs = [x, h0] + module._flat_weights
    got = torch.autograd.grad((out * g_out).sum() + (h_n * g_h).sum(), inputs)
    want = torch.autograd.grad((want_out * g_out).sum() + (want_h_n * g_h).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gru_lengths_match_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    x, h0 = rand(6, 4, 3, dtype=dtype, gen=gen), rand(2, 4, 9, dtype=dtype, gen=gen)
    weights = gru_weights(3, 9, 1, True, dtype=dtype)
    lengths = torch.tensor([6, 2, 4, 1])
    check_rule(
        gru_fn(bmkernels.gru, 1, True, lengths=lengths),
        gru_fn(reference.gru, 1, True, lengths=lengths),
        [x, h0, *weights],
        dtype,
    )


def test_gru_lengths_library_steps():
    """Past-the-end rows on the backward's library-GEMM path (steps of >= 2^24 multiply-adds)."""
    gen = torch.Generator().manual_seed(5)
    x, h0 = rand(4, 224, 6, gen=gen), rand(2, 224, 160, gen=gen)
    weights = gru_weights(6, 160, 1, True)
    lengths = torch.randint(1, 5, (224,), generator=gen)
    check_rule(
        gru_fn(bmkernels.gru, 1, True, lengths=lengths),
        gru_fn(reference.gru, 1, True, lengths=lengths),
        [x, h0, *weights],
        torch.float32,
    )


def test_gru_dropout_reproducible_and_matches_reference():
    weights = gru_weights(4, 6, 3, True)
    x, h0 = torch.randn(5, 2, 4), torch.randn(6, 2, 6)
    kwargs = dict(num_layers=3, bidirectional=True, batch_first=False, dropout=0.4)

    def run(impl, training, seed=11):
        torch.manual_seed(seed)
        return impl(x, h0, weights, training=training, **kwargs)

    first, again = run(bmkernels.gru, True), run(bmkernels.gru, True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, run(reference.gru, True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    other = run(bmkernels.gru, True, seed=12)
    assert not torch.equal(first[0], other[0])
    eval_out = run(bmkernels.gru, False)
    assert not torch.equal(first[0], eval_out[0])
    no_dropout = bmkernels.gru(x, h0, weights, **{**kwargs, "dropout": 0.0}, training=True)
    for a, b in zip(eval_out, no_dropout, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, ISA paths, non-contiguous inputs


def test_gradcheck_cell():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        rand(2, 3, dtype=torch.float64, gen=gen),
        rand(2, 4, dtype=torch.float64, gen=gen),
        *gru_weights(3, 4, dtype=torch.float64),
    ]
    assert torch.autograd.gradcheck(bmkernels.gru_cell, leaves(tensors))


def test_gradcheck_gru_bidirectional_lengths():
    gen = torch.Generator().manual_seed(1)
    tensors = [
        rand(4, 3, 2, dtype=torch.float64, gen=gen),
        rand(4, 3, 3, dtype=torch.float64, gen=gen),
        *gru_weights(2, 3, 2, True, dtype=torch.float64),
    ]
    fn = gru_fn(bmkernels.gru, 2, True, lengths=torch.tensor([4, 1, 3]))
    assert torch.autograd.gradcheck(fn, leaves(tensors))


def _layer_args(bias=True, lengths=False, directions=2, save=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    steps, batch, input_size, hidden = 4, 3, 5, 6
    args = [
        rand(steps, batch, input_size, dtype=dtype, gen=gen),
        rand(directions, batch, hidden, dtype=dtype, gen=gen),
        rand(directions, 3 * hidden, input_size, dtype=dtype, gen=gen),
        rand(directions, 3 * hidden, hidden, dtype=dtype, gen=gen, scale=0.3),
    ]
    args += [rand(directions, 3 * hidden, dtype=dtype, gen=gen) for _ in range(2)] if bias else [None, None]
    args += [torch.tensor([4, 2, 3]) if lengths else None, save]
    return args


@pytest.mark.parametrize("variant", ("bias", "nobias_lengths", "one_direction_nosave"))
def test_opcheck_layer(variant):
    nosave = variant == "one_direction_nosave"
    args = _layer_args(
        bias=variant == "bias", lengths="lengths" in variant, directions=1 if nosave else 2, save=not nosave
    )
    for i in range(6):
        if args[i] is not None and args[7]:  # without a saved workspace there is no backward
            args[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.bmkernels.gru_layer_fwd.default, args)
    with torch.no_grad():
        out, h_n, ws = torch.ops.bmkernels.gru_layer_fwd(*args[:7], True)
    bwd_args = [
        torch.randn_like(out),
        torch.randn_like(h_n),
        *[a.detach() for a in args[:4]],
        args[6],
        ws,
        args[4] is not None,
    ]
    torch.library.opcheck(torch.ops.bmkernels.gru_layer_bwd.default, bwd_args)


@pytest.mark.parametrize("batch", (1, 20))
def test_opcheck_cell(batch):
    gen = torch.Generator().manual_seed(4)
    args = [rand(batch, 5, gen=gen), rand(batch, 7, gen=gen), *gru_weights(5, 7)]
    args = [a.requires_grad_(True) for a in args] + [True]
    torch.library.opcheck(torch.ops.bmkernels.gru_cell_fwd.default, args)
    torch.library.opcheck(torch.ops.bmkernels.gru_cell_fwd.default, [a.detach() for a in args[:6]] + [False])


class TinyGRUModel(torch.nn.Module):
    """Embedding -> 2-layer bidirectional GRU (bmkernels) -> GRU cell decoder step -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        # the weights of a torch.nn.GRU(4, 5, num_layers=2, bidirectional=True) in _flat_weights order
        # (dynamo refuses to trace an nn.GRU module itself)
        self.gru_weights = torch.nn.ParameterList(gru_weights(4, 5, 2, True))
        self.cell = torch.nn.GRUCell(10, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x, lengths):
        out, h_n = bmkernels.gru(
            self.embed(x),
            None,
            list(self.gru_weights),
            num_layers=2,
            bidirectional=True,
            batch_first=True,
            dropout=0.0,
            training=self.training,
            lengths=lengths,
        )
        h = bmkernels.gru_cell(out[:, -1], h_n[-1], *self.cell.parameters())
        return self.head(h), out


@pytest.mark.slow
def test_compile_fullgraph():
    """A GRU model compiles with torch.compile(fullgraph=True) -- no graph breaks -- and matches eager,
    forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGRUModel()
    x, lengths = torch.randn(3, 6, 3), torch.tensor([6, 2, 5])
    compiled = torch.compile(model, fullgraph=True)
    eager = model(x, lengths)
    got = compiled(x, lengths)
    grads = [torch.randn_like(t) for t in eager]
    params = list(model.parameters())
    for a, b in zip(
        list(got) + list(torch.autograd.grad(got, params, grads)),
        list(eager) + list(torch.autograd.grad(eager, params, grads)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_isa_paths(isa, dtype, monkeypatch):
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(5)
    cell_tensors = [
        rand(3, 21, dtype=dtype, gen=gen),
        rand(3, 19, dtype=dtype, gen=gen),
        *gru_weights(21, 19, dtype=dtype),
    ]
    if not cpu_supports(isa):
        with pytest.raises(RuntimeError, match="does not support"):
            bmkernels.gru_cell(*cell_tensors)
        return
    assert bmkernels.build_info()["active_cpu_isa"] == isa
    check_rule(bmkernels.gru_cell, reference.gru_cell, cell_tensors, dtype)
    x, h0 = rand(5, 6, 9, dtype=dtype, gen=gen), rand(2, 6, 70, dtype=dtype, gen=gen)
    lengths = torch.tensor([5, 3, 1, 5, 4, 2])
    check_rule(
        gru_fn(bmkernels.gru, 1, True, lengths=lengths),
        gru_fn(reference.gru, 1, True, lengths=lengths),
        [x, h0, *gru_weights(9, 70, 1, True, dtype=dtype)],
        dtype,
    )


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(6)
    x = rand(3, 8, 2 * 5, gen=gen)[:, :, ::2]  # strided feature dim
    h0 = rand(3, 2, 4, gen=gen).transpose(0, 1)  # (2, 3, 4), transposed storage
    weights = [w.t().contiguous().t() if w.dim() == 2 else w for w in gru_weights(5, 4, 1, True)]
    assert not x.is_contiguous() and not h0.is_contiguous() and not weights[0].is_contiguous()
    check_rule(
        gru_fn(bmkernels.gru, 1, True), gru_fn(reference.gru, 1, True), [x.transpose(0, 1), h0, *weights], torch.float32
    )
    cell = [rand(5, 2 * 5, gen=gen)[:, ::2], rand(4, 5, gen=gen).t(), *weights[:4]]
    check_rule(bmkernels.gru_cell, reference.gru_cell, cell, torch.float32)


def test_reference_backend():
    weights = gru_weights(3, 4)
    x, h0 = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    kwargs = dict(num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=False)
    got = bmkernels.gru(x, h0, weights, backend="reference", **kwargs)
    for a, b in zip(got, bmkernels.gru(x, h0, weights, **kwargs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        bmkernels.gru_cell(x[0], h0[0], *weights, backend="reference"),
        bmkernels.gru_cell(x[0], h0[0], *weights),
        rtol=1e-5,
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


def _gru_call(x=None, h0=None, weights=None, **overrides):
    kwargs = dict(num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=False)
    kwargs.update(overrides)
    x = torch.randn(4, 2, 3) if x is None else x
    weights = gru_weights(3, 5) if weights is None else weights
    return bmkernels.gru(x, h0, weights, **kwargs)


BAD_GRU = {
    "input size": (lambda: _gru_call(x=torch.randn(4, 2, 7)), ValueError, r"weights\[0\].*\(15, 7\)"),
    "h0 shape": (lambda: _gru_call(h0=torch.randn(2, 2, 5)), ValueError, r"h0 must have shape \(1, 2, 5\)"),
    "w_hh shape": (
        lambda: _gru_call(weights=gru_weights(3, 5)[:1] + [torch.randn(15, 4)] + gru_weights(3, 5)[2:]),
        ValueError,
        r"weights\[1\].*\(3H, H\)",
    ),
    "bias shape": (
        lambda: _gru_call(weights=gru_weights(3, 5)[:3] + [torch.randn(14)]),
        ValueError,
        r"weights\[3\] \(b_hh of layer 0\) must have shape \(15,\)",
    ),
    "weight count": (lambda: _gru_call(weights=gru_weights(3, 5)[:3]), ValueError, "list of 2 .* or 4"),
    "layer count": (lambda: _gru_call(num_layers=3), ValueError, "list of 6 .* or 12"),
    "T = 0": (lambda: _gru_call(x=torch.randn(0, 2, 3)), ValueError, "T must be >= 1"),
    "x dims": (lambda: _gru_call(x=torch.randn(4, 2, 3, 1)), ValueError, "x must be"),
    "mixed dtypes": (
        lambda: _gru_call(x=torch.randn(4, 2, 3, dtype=torch.float64)),
        TypeError,
        r"weights\[0\] must have the input's dtype torch.float64; got torch.float32",
    ),
    "int dtype": (lambda: _gru_call(x=torch.ones(4, 2, 3, dtype=torch.int64)), TypeError, "x must be float32"),
    "mixed devices": (
        lambda: _gru_call(h0=torch.randn(1, 2, 5, device="meta")),
        ValueError,
        "h0 must be on the input's device cpu; got meta",
    ),
    "lengths range": (lambda: _gru_call(lengths=torch.tensor([5, 2])), ValueError, r"lengths must be in \[1, T\]"),
    "lengths dtype": (lambda: _gru_call(lengths=torch.tensor([3.0, 2.0])), ValueError, "lengths must be int64"),
    "dropout": (lambda: _gru_call(dropout=1.5), ValueError, "dropout must be"),
    "not a tensor": (lambda: _gru_call(x=[1.0]), TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD_GRU)
def test_gru_bad_input(case):
    fn, error, match = BAD_GRU[case]
    with pytest.raises(error, match=match):
        fn()


BAD_CELL = {
    "input size": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 4), None, *w),
        ValueError,
        r"w_ih must have shape \(15, 4\)",
    ),
    "h shape": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), torch.randn(3, 5), *w),
        ValueError,
        r"h must have shape \(2, 5\)",
    ),
    "w_hh shape": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), None, w[0], torch.randn(15, 4)),
        ValueError,
        r"w_hh must have shape \(3H, H\)",
    ),
    "one bias": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), None, w[0], w[1], w[2]),
        ValueError,
        "both b_ih and b_hh",
    ),
    "mixed dtypes": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3).double(), None, *w),
        TypeError,
        "w_ih must have the input's dtype",
    ),
    "mixed devices": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), torch.randn(2, 5, device="meta"), *w),
        ValueError,
        "h must be on the input's device",
    ),
    "not a tensor": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), torch.randn(2, 5), w[0].tolist(), *w[1:]),
        TypeError,
        "w_ih must be a torch.Tensor",
    ),
    "hot path dtype": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), torch.randn(2, 5).double(), *w),
        TypeError,
        "h must have the input's dtype torch.float32; got torch.float64",
    ),
    "hot path bias shape": (
        lambda w: bmkernels.gru_cell(torch.randn(2, 3), torch.randn(2, 5), *w[:3], w[3][:7]),
        ValueError,
        r"b_hh must have shape \(15,\); got \(7,\)",
    ),
}


@pytest.mark.parametrize("case", BAD_CELL)
def test_cell_bad_input(case):
    fn, error, match = BAD_CELL[case]
    with pytest.raises(error, match=match):
        fn(gru_weights(3, 5))


# ------------------------------------------------------------------------------------------------
# The CPU buffer pool (csrc/cpu/scratch.h) the GRU layer takes its workspace and temporaries from


def _train_step(weights, x, h0):
    out, h_n = bmkernels.gru(
        x, h0, weights, num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=True
    )
    return [out, h_n, *torch.autograd.grad(out.sum() + h_n.sum(), [x, *weights])]


def test_buffer_pool_reuses_blocks_and_empties():
    """Blocks of >= 4 MB (here the 5.2 MB workspace) go back to the pool when freed and serve the next call
    of the same size, with the same results; empty_cache() frees them."""
    gen = torch.Generator().manual_seed(0)
    x, h0 = rand(16, 64, 32, gen=gen).requires_grad_(), rand(1, 64, 256, gen=gen)
    weights = [w.requires_grad_() for w in gru_weights(32, 256, 1, False)]
    bmkernels.empty_cache()
    assert bmkernels.cpu_cache_bytes() == 0
    first = _train_step(weights, x, h0)
    held = bmkernels.cpu_cache_bytes()
    assert held >= 16 * 64 * 5 * 256 * 4, "the freed workspace is kept"
    second = _train_step(weights, x, h0)
    assert bmkernels.cpu_cache_bytes() == held, "the second call reused the blocks instead of adding new ones"
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    bmkernels.empty_cache()
    assert bmkernels.cpu_cache_bytes() == 0


@pytest.mark.slow
def test_buffer_pool_can_be_turned_off():
    code = (
        "import torch, bmkernels; x = torch.randn(16, 64, 32, requires_grad=True); "
        "g = torch.nn.GRU(32, 256); out, _ = bmkernels.gru(x, None, g._flat_weights, num_layers=1, "
        "bidirectional=False, batch_first=False, dropout=0.0, training=True); out.sum().backward(); "
        "print(bmkernels.cpu_cache_bytes())"
    )
    env = {**os.environ, "BMK_CPU_CACHE_MB": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0"


def test_backward_allocates_no_zero_gradient_for_the_workspace():
    """The workspace output is non-differentiable and unused: autograd must not materialize a zero gradient
    for it (a (T, B, 5H) fill, 42 MB at T = B = 64, H = 512)."""
    steps, batch, hidden = 6, 8, 32
    x = torch.randn(steps, batch, 16, requires_grad=True)
    weights = [w.requires_grad_() for w in gru_weights(16, hidden, 1, False)]
    with torch.profiler.profile(record_shapes=True) as prof:
        out, _ = bmkernels.gru(
            x, None, weights, num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=True
        )
        out.sum().backward()
    workspace_shape = [1, steps, batch, 5 * hidden]
    fills = [
        e
        for e in prof.events()
        if e.name in ("aten::fill_", "aten::zero_", "aten::zeros_like")
        and e.input_shapes
        and list(e.input_shapes[0]) == workspace_shape
    ]
    assert not fills, [e.name for e in fills]


def test_inference_path_matches_the_recording_path():
    """Without anything to record (no_grad, or no input requiring grad) the autograd kernel calls the CPU
    kernel directly, without an autograd node; the results are those of the recording path."""
    gen = torch.Generator().manual_seed(11)
    x, h0 = rand(5, 3, 4, gen=gen).requires_grad_(), rand(1, 3, 6, gen=gen)
    weights = [w.requires_grad_() for w in gru_weights(4, 6, 1, False)]
    kwargs = dict(num_layers=1, bidirectional=False, batch_first=False, dropout=0.0, training=False)
    recorded = bmkernels.gru(x, h0, weights, **kwargs)
    cell_recorded = bmkernels.gru_cell(x[0], h0[0], *weights)
    assert recorded[0].grad_fn is not None and cell_recorded.grad_fn is not None
    with torch.no_grad():
        plain = bmkernels.gru(x, h0, weights, **kwargs)
        cell_plain = bmkernels.gru_cell(x[0], h0[0], *weights)
    detached = bmkernels.gru(x.detach(), h0, [w.detach() for w in weights], **kwargs)
    for got in (plain, detached):
        assert got[0].grad_fn is None and not got[0].requires_grad
        for a, b in zip(got, recorded, strict=True):
            assert torch.equal(a, b)
    assert cell_plain.grad_fn is None and torch.equal(cell_plain, cell_recorded)
