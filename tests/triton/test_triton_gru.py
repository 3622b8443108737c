"""The Triton GRU kernels (bmkernels/triton/gru.py) against the reference: cell and layer forward and
every gradient on small awkward sizes (hidden 1, 3, 17; T = 1 and 7; batch 1, 3 and 20; 1-2 layers;
bidirectional; no bias; lengths), each through the persistent and the per-step kernels; backend
routing, torch.compile, opcheck, bad inputs. Tolerance rule: tests/conftest.py.

Where it runs:
- no GPU (CI): under the Triton interpreter on CPU tensors, float32 through bmkernels.gru /
  gru_cell and float16 through the Triton operators themselves (the public GRU API accepts float32,
  float64 and bfloat16, and the interpreter cannot do bfloat16 arithmetic). TRITON_INTERPRET is set
  by tests/conftest.py before anything imports triton.
- a CUDA GPU: the same tests on CUDA tensors plus larger shapes and bfloat16.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# Without a GPU, tests/conftest.py switched the Triton interpreter on before anything imported triton.
triton_gru = pytest.importorskip("bmkernels.triton.gru", reason="triton is not installed")

import bmkernels  # noqa: E402
from bmkernels import _backend, _extension  # noqa: E402
from bmkernels.reference import gru as reference  # noqa: E402
from tests.ops.test_gru import check_rule, gru_fn, gru_weights, rand  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
GPU_ONLY = pytest.mark.gpu(reason="needs a CUDA GPU: large shapes and bfloat16 are beyond the Triton interpreter")
INTERPRETER_ONLY = pytest.mark.skipif(ON_GPU, reason="checks the interpreter set-up")


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=("persistent", "per_step"))
def kernel_path(request, monkeypatch):
    """The test runs through the persistent kernels (a loop over time inside the kernel) and through
    the per-step kernels (one launch per step)."""
    monkeypatch.setattr(triton_gru, "PERSISTENT_MAX_HIDDEN", 1 << 30 if request.param == "persistent" else 0)


def on_device(tensors):
    return [t if t is None else t.to(DEVICE) for t in tensors]


def sequence(steps, batch, input_size, hidden, layers=1, directions=1, seed=1, dtype=torch.float32):
    """x (T, B, I) and h0 (L*D, B, H) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    return on_device(
        [
            rand(steps, batch, input_size, dtype=dtype, gen=gen),
            rand(layers * directions, batch, hidden, dtype=dtype, gen=gen),
        ]
    )


# ------------------------------------------------------------------------------------------------
# Cell


CELL_SHAPES = ((1, 5, 1), (3, 4, 3), (3, 7, 17), (20, 6, 17))  # (B, I, H): 17 and 20 cross 16-wide tiles


@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=str)
def test_cell_matches_reference(shape, bias, kernel_path):
    batch, input_size, hidden = shape
    x, h = sequence(1, batch, input_size, hidden)
    weights = on_device(gru_weights(input_size, hidden, bias=bias, seed=3))
    check_rule(
        lambda *t: bmkernels.gru_cell(*t, backend="triton"), reference.gru_cell, [x[0], h[0], *weights], torch.float32
    )


def test_cell_unbatched_and_default_state():
    x, h = sequence(1, 1, 5, 3)
    weights = on_device(gru_weights(5, 3, seed=4))
    got = bmkernels.gru_cell(x[0, 0], None, *weights, backend="triton")
    torch.testing.assert_close(got, reference.gru_cell(x[0], torch.zeros_like(h[0]), *weights)[0])


# ------------------------------------------------------------------------------------------------
# Whole sequence


SEQ_CASES = {
    # name: (T, B, I, H, layers, bidirectional, bias, lengths)
    "one_step": (1, 3, 4, 3, 1, False, True, None),
    "hidden1": (7, 3, 2, 1, 1, False, True, None),
    "batch1_h17": (7, 1, 5, 17, 1, False, True, None),
    "bidirectional": (7, 3, 5, 17, 1, True, True, None),
    "two_layers_bi_nobias": (7, 3, 4, 3, 2, True, False, None),
    "two_layers_lengths": (7, 3, 5, 17, 2, False, True, [7, 2, 5]),
    "bi_lengths_batch20": (5, 20, 3, 17, 1, True, True, [5, 1, 3, 4, 2] * 4),
}


def seq_case(name, dtype=torch.float32):
    steps, batch, input_size, hidden, layers, bi, bias, lengths = SEQ_CASES[name]
    x, h0 = sequence(steps, batch, input_size, hidden, layers, 2 if bi else 1, dtype=dtype)
    weights = on_device(gru_weights(input_size, hidden, layers, bi, bias, dtype=dtype, seed=5))
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    return x, h0, weights, layers, bi, lengths


@pytest.mark.parametrize("case", list(SEQ_CASES))
@pytest.mark.slow
def test_gru_matches_reference(case, kernel_path):
    x, h0, weights, layers, bi, lengths = seq_case(case)
    check_rule(
        gru_fn(lambda *a, **k: bmkernels.gru(*a, **k, backend="triton"), layers, bi, lengths=lengths),
        gru_fn(reference.gru, layers, bi, lengths=lengths),
        [x, h0, *weights],
        torch.float32,
    )


def test_gru_batch_first_unbatched_dropout():
    """The layout and dropout handling of bmkernels/ops/gru.py around the Triton layer."""
    x, h0 = sequence(4, 2, 3, 5, layers=2)
    weights = on_device(gru_weights(3, 5, 2, seed=6))
    options = {"num_layers": 2, "bidirectional": False, "dropout": 0.3, "training": True}
    torch.manual_seed(0)
    got = bmkernels.gru(x.transpose(0, 1), h0, weights, batch_first=True, backend="triton", **options)
    torch.manual_seed(0)
    want = reference.gru(x.transpose(0, 1), h0, weights, batch_first=True, **options)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    got = bmkernels.gru(x[:, 0], h0[:, 0], weights, batch_first=False, backend="triton", **options | {"dropout": 0})
    want = reference.gru(x[:, 0], h0[:, 0], weights, batch_first=False, **options | {"dropout": 0})
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_non_contiguous_inputs():
    x, h0 = sequence(5, 3, 4, 6, directions=2)
    weights = on_device(gru_weights(4, 6, 1, True, seed=8))
    strided = [w.t().contiguous().t() if w.dim() == 2 else w for w in weights]  # column-major weights
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    options = {"num_layers": 1, "bidirectional": True, "batch_first": False, "dropout": 0.0, "training": False}
    got = bmkernels.gru(x_strided, h0, strided, backend="triton", **options)
    want = bmkernels.gru(x, h0, weights, backend="reference", **options)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# float16 through the operators (the public GRU API takes float32, float64, bfloat16)


def layer_op_fn(bias):
    def fn(x, h0, w_ih, w_hh, *biases):
        b_ih, b_hh = (b.unsqueeze(0) for b in biases) if bias else (None, None)
        out, h_n, _ = torch.ops.bmkernels.gru_triton_layer_fwd(
            x, h0, w_ih.unsqueeze(0), w_hh.unsqueeze(0), b_ih, b_hh, None, True
        )
        return out, h_n

    return fn


@pytest.mark.parametrize("dtype", (torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)), ids=str)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.slow
def test_layer_op_low_precision(dtype, bias, kernel_path):
    x, h0 = sequence(7, 3, 5, 17, dtype=dtype)
    weights = on_device(gru_weights(5, 17, bias=bias, dtype=dtype, seed=9))
    check_rule(layer_op_fn(bias), gru_fn(reference.gru, 1, False), [x, h0, *weights], dtype)


@pytest.mark.parametrize("dtype", (torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)), ids=str)
def test_cell_op_low_precision(dtype):
    x, h = sequence(1, 3, 4, 17, dtype=dtype)
    weights = on_device(gru_weights(4, 17, dtype=dtype, seed=10))
    check_rule(
        lambda *t: torch.ops.bmkernels.gru_triton_cell_fwd(*t, True)[0],
        reference.gru_cell,
        [x[0], h[0], *weights],
        dtype,
    )


# ------------------------------------------------------------------------------------------------
# Routing, workspace, bad inputs


def test_inference_saves_no_workspace():
    x, h0 = sequence(3, 2, 4, 5)
    w = on_device(gru_weights(4, 5, seed=2))
    _, _, ws = torch.ops.bmkernels.gru_triton_layer_fwd(
        x, h0, w[0][None], w[1][None], w[2][None], w[3][None], None, False
    )
    assert ws.numel() == 0
    with pytest.raises(RuntimeError, match="workspace, which was not saved"):
        x.requires_grad_(True)
        out, _, _ = torch.ops.bmkernels.gru_triton_layer_fwd(
            x, h0, w[0][None], w[1][None], w[2][None], w[3][None], None, False
        )
        out.sum().backward()
    with pytest.raises(ValueError, match=r"workspace must be .* = \(1, 3, 2, 25\); got \(0,\)"):
        torch.ops.bmkernels.gru_triton_layer_bwd(
            torch.ones(3, 2, 5), torch.ones(1, 2, 5), x.detach(), h0, w[0][None], w[1][None], None, ws, True
        )


def test_empty_batch():
    """B = 0: empty outputs and zero gradients, no launch (a saved workspace of zero elements is still one)."""
    x, h0 = sequence(3, 0, 4, 5, directions=2)
    weights = [w.requires_grad_() for w in on_device(gru_weights(4, 5, 1, True))]
    out, h_n = bmkernels.gru(
        x.requires_grad_(),
        h0,
        weights,
        num_layers=1,
        bidirectional=True,
        batch_first=False,
        dropout=0.0,
        training=False,
        backend="triton",
    )
    assert out.shape == (3, 0, 10) and h_n.shape == (2, 0, 5)
    grads = torch.autograd.grad(out.sum(), [x, *weights])
    assert grads[0].shape == x.shape and all(not g.any() for g in grads[1:])
    assert bmkernels.gru_cell(x[0], h0[0], *weights[:4], backend="triton").shape == (0, 5)


def test_env_routes_to_triton(monkeypatch):
    """BMK_BACKEND=triton runs the Triton layer (its workspace is float32 (D, T, B, 5H), the operator
    called is the Triton one)."""
    calls = []
    real = triton_gru.gru_layer_fwd
    monkeypatch.setattr(triton_gru, "gru_layer_fwd", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("BMK_BACKEND", "triton")
    x, h0 = sequence(2, 2, 3, 4)
    bmkernels.gru(
        x,
        h0,
        on_device(gru_weights(3, 4)),
        num_layers=1,
        bidirectional=False,
        batch_first=False,
        dropout=0.0,
        training=False,
    )
    assert calls == [1]


def test_triton_ops_list_gru():
    assert "gru" in _backend.triton_ops()


@pytest.mark.skipif(ON_GPU, reason="on a GPU auto picks the CUDA C++ kernel if compiled, else Triton")
def test_auto_on_cpu_is_the_cpu_kernel():
    if _extension.loaded():
        assert _backend.choose("gru", torch.device("cpu")) == "cpu"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="only under the Triton interpreter"):
        _backend.choose("gru", torch.device("cpu"), "triton")


@INTERPRETER_ONLY
def test_interpreter_refuses_bfloat16():
    x, h0 = sequence(2, 2, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="cannot compute in bfloat16"):
        bmkernels.gru(
            x,
            h0,
            gru_weights(3, 4, dtype=torch.bfloat16),
            num_layers=1,
            bidirectional=False,
            batch_first=False,
            dropout=0.0,
            training=False,
            backend="triton",
        )


def test_float64_is_refused_with_the_way_out():
    x, h = sequence(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs on backend='cpu' or 'reference'"):
        bmkernels.gru_cell(x[0], h[0], *on_device(gru_weights(3, 4, dtype=torch.float64)), backend="triton")


def test_argument_errors_are_the_ops():
    """Argument checks are shared with the CPU backend (bmkernels/ops/gru.py)."""
    x, h0 = sequence(3, 2, 3, 4)
    with pytest.raises(ValueError, match="lengths must be in"):
        bmkernels.gru(
            x,
            h0,
            on_device(gru_weights(3, 4)),
            num_layers=1,
            bidirectional=False,
            batch_first=False,
            dropout=0.0,
            training=False,
            lengths=torch.tensor([4, 1], device=DEVICE),
            backend="triton",
        )


@INTERPRETER_ONLY
def test_interpreter_uses_one_small_config():
    assert triton_gru.INTERPRETED
    for kernel in (
        triton_gru._step_fwd_kernel,
        triton_gru._step_bwd_kernel,
        triton_gru._seq_fwd_kernel,
        triton_gru._seq_bwd_kernel,
    ):
        assert len(kernel.configs) == 1


# ------------------------------------------------------------------------------------------------
# torch.compile and opcheck


def test_compile_fullgraph(kernel_path):
    """Dynamo traces the Triton ops (a bidirectional layer with lengths and a cell) without a graph
    break. Under the interpreter only with the 'eager' backend (see tests/triton/test_triton_attention.py)."""
    torch._dynamo.reset()
    x, h0 = sequence(4, 3, 3, 5, directions=2)
    # the layer's 8 weights, then a cell's 4 taking the layer's output (2H = 10 features)
    weights = [w.requires_grad_() for w in on_device(gru_weights(3, 5, 1, True, seed=12) + gru_weights(10, 5))]
    lengths = torch.tensor([4, 2, 3], device=DEVICE)

    def fn(x, h0, *weights):
        out, h_n = bmkernels.gru(
            x,
            h0,
            list(weights[:8]),
            num_layers=1,
            bidirectional=True,
            batch_first=False,
            dropout=0.0,
            training=True,
            lengths=lengths,
            backend="triton",
        )
        return out, bmkernels.gru_cell(out[-1], h_n[0], *weights[8:], backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if ON_GPU else "eager")
    x.requires_grad_()
    got, want = compiled(x, h0, *weights), fn(x, h0, *weights)
    grads = [torch.randn_like(t) for t in want]
    for a, b in zip(
        list(got) + list(torch.autograd.grad(got, [x, *weights], grads)),
        list(want) + list(torch.autograd.grad(want, [x, *weights], grads)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


# the interpreter cannot run the kernels inside AOT dispatch's functionalized fake tracing
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ()
)


@pytest.mark.parametrize("variant", ("bias", "nobias_lengths"))
def test_opcheck_layer(variant):
    gen = torch.Generator().manual_seed(2)
    steps, batch, input_size, hidden, directions = 4, 3, 5, 6, 2
    bias = variant == "bias"
    args = on_device(
        [
            rand(steps, batch, input_size, gen=gen),
            rand(directions, batch, hidden, gen=gen),
            rand(directions, 3 * hidden, input_size, gen=gen),
            rand(directions, 3 * hidden, hidden, gen=gen, scale=0.3),
        ]
        + ([rand(directions, 3 * hidden, gen=gen) for _ in range(2)] if bias else [None, None])
    )
    args = [a if a is None else a.requires_grad_() for a in args]
    lengths = None if bias else torch.tensor([4, 2, 3], device=DEVICE)
    torch.library.opcheck(
        torch.ops.bmkernels.gru_triton_layer_fwd.default, [*args, lengths, True], test_utils=OPCHECK_UTILS
    )
    with torch.no_grad():
        out, h_n, ws = torch.ops.bmkernels.gru_triton_layer_fwd(*args, lengths, True)
    bwd_args = [torch.randn_like(out), torch.randn_like(h_n), *[a.detach() for a in args[:4]], lengths, ws, bias]
    torch.library.opcheck(torch.ops.bmkernels.gru_triton_layer_bwd.default, bwd_args, test_utils=OPCHECK_UTILS)


def test_opcheck_cell():
    gen = torch.Generator().manual_seed(4)
    args = on_device([rand(3, 5, gen=gen), rand(3, 7, gen=gen), *gru_weights(5, 7)])
    args = [a.requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.bmkernels.gru_triton_cell_fwd.default, [*args, True], test_utils=OPCHECK_UTILS)


# ------------------------------------------------------------------------------------------------
# Compiled for a GPU without one: the kernels lower to cubin for sm_80 and sm_90


# runs in a fresh process without TRITON_INTERPRET: triton.compile for an explicit target needs no GPU
AOT_COMPILE = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bmkernels.triton import gru

    dtype, arch = sys.argv[1], int(sys.argv[2])
    pointers = {"Lengths": "*i64", "State": "*fp32", "WS": "*fp32", "dState": "*fp32"}
    flags = {"HAS_BIAS": True, "HAS_LENGTHS": True, "SAVE": True}
    report = {}
    for kernel in (gru._seq_fwd_kernel, gru._step_fwd_kernel, gru._seq_bwd_kernel, gru._step_bwd_kernel):
        fn = kernel.fn
        # the autotune config with the largest tile: the one most likely to run out of registers or shared memory
        config = max(kernel.configs, key=lambda c: c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_K"])
        constexprs = {k: v for k, v in {**flags, **config.kwargs}.items() if k in fn.arg_names}
        signature = {n: "constexpr" if n in constexprs else "i32" if n in ("s", "T", "B", "H", "D")
                     else pointers.get(n, "*" + dtype) for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        report[fn.__name__] = {"cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}
    print(json.dumps(report))
""")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run")
@pytest.mark.parametrize("dtype, arch", (("fp32", 80), ("bf16", 90)))
@pytest.mark.slow
def test_kernels_compile_for_gpus(dtype, arch):
    """The interpreter does not type-check the GPU lowering (tl.dot operand dtypes and shapes, layouts):
    every kernel, every flag on, its largest autotune config, lowered to a cubin for A100 (sm_80) / H100
    (sm_90). bfloat16 on sm_90 must fit the H100's 227 KiB of shared memory; float32 tiles may exceed
    the A100's (the autotuner skips a config that does not fit the device)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE, dtype, str(arch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"_seq_fwd_kernel", "_step_fwd_kernel", "_seq_bwd_kernel", "_step_bwd_kernel"}
    for name, kernel in report.items():
        assert kernel["cubin_bytes"] > 0, name
        if arch == 90:
            assert kernel["shared"] <= 227 * 1024, (name, kernel)


# ------------------------------------------------------------------------------------------------
# GPU only: larger shapes, every dtype


@GPU_ONLY
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_large_bidirectional_lengths(dtype, kernel_path):
    steps, batch, input_size, hidden = 64, 37, 96, 257
    gen = torch.Generator().manual_seed(13)
    x = rand(steps, batch, input_size, gen=gen, dtype=dtype).to(DEVICE)
    h0 = rand(4, batch, hidden, gen=gen, dtype=dtype).to(DEVICE)
    weights = on_device(gru_weights(input_size, hidden, 2, True, dtype=dtype, seed=14))
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen).to(DEVICE)
    check_rule(
        gru_fn(lambda *a, **k: bmkernels.gru(*a, **k, backend="triton"), 2, True, lengths=lengths),
        gru_fn(reference.gru, 2, True, lengths=lengths),
        [x, h0, *weights],
        dtype,
    )
