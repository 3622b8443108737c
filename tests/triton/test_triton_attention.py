"""The Triton attention kernels (bmkernels/triton/attention.py) against the reference: forward and
every gradient for every feature, dropout masks bit-identical to the CPU kernel's, backend routing,
determinism, non-contiguous and empty inputs, bad inputs. Tolerance rule: tests/conftest.py.

Where it runs:
- no GPU (CI): under the Triton interpreter on CPU tensors, small awkward shapes, float32 and
  float16 (the interpreter cannot do bfloat16 arithmetic). triton decides at import time whether
  it interprets: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, and an
  autouse fixture here keeps it set for these tests.
- a CUDA GPU: the same tests on CUDA tensors with larger shapes and bfloat16 too, plus
  torch.compile(fullgraph=True) and opcheck, which cannot run under the interpreter (fake-tensor
  tracing touches storage the interpreter copies).
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
triton_attention = pytest.importorskip("bmkernels.triton.attention", reason="triton is not installed")

import bmkernels  # noqa: E402
from bmkernels import _backend, _extension  # noqa: E402
from bmkernels.reference import attention as reference  # noqa: E402
from bmkernels.testing import check_against_reference, make_qkv  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = (
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.gpu(
            reason="the Triton interpreter cannot compute in bfloat16 (test_interpreter_refuses_bfloat16)"
        ),
    ),
)
INTERPRETER_ONLY_SKIP = pytest.mark.skipif(ON_GPU, reason="checks the interpreter set-up")
GPU_ONLY = pytest.mark.gpu(reason="needs a CUDA GPU: large shapes are too slow for the Triton interpreter")
# lengths and head dims: small awkward ones under the interpreter, GPU-sized ones on a GPU
SIZE = {"short": 97 if ON_GPU else 17, "mid": 333 if ON_GPU else 33, "long": 1029 if ON_GPU else 97}


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_fn(**options):
    return lambda q, k, v, **tensors: bmkernels.attention(q, k, v, backend="triton", **options, **tensors)


def reference_fn(**options):
    return lambda q, k, v, **tensors: reference.attention(q, k, v, **options, **tensors)


def qkv(dtype=torch.float32, **shape):
    return [t.detach().to(DEVICE).requires_grad_() for t in make_qkv(dtype=dtype, **shape)]


def rand(*shape, dtype=torch.float32, seed=7, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE).requires_grad_(requires_grad)


def bool_mask(*shape, keep=0.7, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=gen) < keep).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# Every feature, forward and backward, against the float64 reference.

S, M, L = SIZE["short"], SIZE["mid"], SIZE["long"]
FEATURES = {
    # name: (shape of make_qkv, options, extra tensors (built from the shape), lse gradient)
    "plain": ({"q_len": M, "head_dim": 40}, {}, {}, False),
    "lq_ne_lk": ({"q_len": S, "k_len": L, "head_dim": 16}, {}, {}, False),
    "causal": ({"q_len": L, "head_dim": 16}, {"causal": True}, {}, False),
    "causal_bottom_right": (
        {"q_len": S, "k_len": M, "head_dim": 40},
        {"causal": True, "causal_alignment": "bottom_right"},
        {},
        False,
    ),
    "causal_top_left_lq_gt_lk": ({"q_len": M, "k_len": S, "head_dim": 16}, {"causal": True}, {}, False),
    "window": ({"q_len": L, "head_dim": 16}, {"window": (9, 4)}, {}, False),
    "window_narrow": ({"q_len": L, "k_len": M + 2, "head_dim": 16}, {"window": (1, 1)}, {}, False),  # band edges
    "window_causal_bottom_right": (
        {"q_len": M, "k_len": L, "head_dim": 16},
        {"window": (21, -1), "causal": True, "causal_alignment": "bottom_right"},
        {},
        False,
    ),
    "softcap": ({"q_len": M, "head_dim": 64}, {"softcap": 2.0}, {}, False),
    "alibi": (
        {"q_len": M, "head_dim": 16, "q_heads": 4, "kv_heads": 2},
        {"alibi_slopes": "heads", "causal": True},
        {},
        False,
    ),
    "alibi_per_batch": ({"q_len": S, "k_len": M, "head_dim": 16}, {"alibi_slopes": "batch_heads"}, {}, False),
    "bias_grad": ({"q_len": S, "k_len": M, "head_dim": 40}, {}, {"bias": "full"}, False),
    "bias_broadcast_grad": ({"q_len": M, "head_dim": 16}, {"causal": True}, {"bias": "broadcast"}, False),
    "mask": ({"q_len": M, "k_len": S, "head_dim": 16}, {}, {"mask": "broadcast"}, False),
    "key_padding_mask": ({"q_len": S, "k_len": M, "head_dim": 16}, {}, {"key_padding_mask": True}, False),
    "gqa": ({"q_len": M, "head_dim": 40, "q_heads": 6, "kv_heads": 2}, {"causal": True}, {}, False),
    "mqa_bias": ({"q_len": S, "k_len": M, "head_dim": 16, "q_heads": 3, "kv_heads": 1}, {}, {"bias": "full"}, False),
    "v_head_dim": ({"q_len": S, "k_len": M, "head_dim": 40, "v_head_dim": 24}, {}, {}, False),
    "lse_grad": ({"q_len": M, "head_dim": 16}, {"window": (5, 5), "return_lse": True}, {}, True),
    "empty_rows": ({"q_len": S, "head_dim": 16}, {"return_lse": True}, {"mask": "empty_rows"}, False),
    "everything": (
        {"q_len": M, "k_len": L, "head_dim": 40, "v_head_dim": 16, "q_heads": 4, "kv_heads": 2},
        {
            "causal": True,
            "causal_alignment": "bottom_right",
            "window": (40, -1),
            "softcap": 3.0,
            "alibi_slopes": "heads",
            "scale": 0.3,
            "return_lse": True,
        },
        {"bias": "broadcast", "mask": "broadcast", "key_padding_mask": True},
        True,
    ),
}


def build_case(shape, options, extras, dtype):
    q, k, v = qkv(dtype, **shape)
    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    options = dict(options)
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = torch.linspace(0.05, 0.5, q_heads, device=DEVICE)
    elif options.get("alibi_slopes") == "batch_heads":
        options["alibi_slopes"] = torch.rand(batch, q_heads, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    tensors = {"q": q, "k": k, "v": v}
    bias = extras.get("bias")
    if bias == "full":
        tensors["bias"] = rand(batch, q_heads, q_len, k_len, dtype=dtype, requires_grad=True)
    elif bias == "broadcast":
        tensors["bias"] = rand(1, q_heads, q_len, 1, dtype=dtype, requires_grad=True)
    mask = extras.get("mask")
    if mask == "broadcast":
        tensors["mask"] = bool_mask(batch, 1, q_len, k_len)
    elif mask == "empty_rows":
        m = bool_mask(batch, q_heads, q_len, k_len)
        m[:, :, ::3] = False  # every third query sees no key: zeros, lse = -inf
        tensors["mask"] = m
    if extras.get("key_padding_mask"):
        kpm = torch.zeros(batch, k_len, dtype=torch.bool, device=DEVICE)
        kpm[0, k_len // 2 :] = True
        tensors["key_padding_mask"] = kpm
    return options, tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.slow
def test_feature_matches_reference(feature, dtype):
    shape, options, extras, lse_grad = FEATURES[feature]
    options, tensors = build_case(shape, options, extras, dtype)
    check_against_reference(triton_fn(**options), reference_fn(**options), tensors, dtype, lse_grad=lse_grad)


@pytest.mark.parametrize("head_dim,v_head_dim", [(16, 16), (40, 40), (64, 64), (100, 72), (256, 256)])
def test_head_dims(head_dim, v_head_dim):
    """Non-powers of two are padded inside the kernel; 256 is the largest."""
    q, k, v = qkv(q_len=S, k_len=M, head_dim=head_dim, v_head_dim=v_head_dim, q_heads=1)
    options = {"causal": True, "causal_alignment": "bottom_right"}
    check_against_reference(triton_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_inputs(layout):
    q, k, v = qkv(q_len=M, k_len=S, head_dim=16, layout=layout)
    bias = rand(2, 2, S, M, requires_grad=True).transpose(-2, -1)  # (B, H, Lq, Lk) view, strided
    tensors = {"q": q, "k": k, "v": v, "bias": bias}
    check_against_reference(triton_fn(causal=True), reference_fn(causal=True), tensors, torch.float32)


# ------------------------------------------------------------------------------------------------
# Dropout: the Triton kernel draws the CPU kernel's Philox mask, bit for bit.

needs_extension = pytest.mark.skipif(
    not _extension.loaded(), reason="the CPU dropout_keep_mask op needs the compiled extension"
)


def draw_seed(manual_seed):
    """The Philox seed bmkernels.attention draws after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)


@needs_extension
@pytest.mark.parametrize("manual_seed,p", [(0, 0.5), (123, 0.1), (77, 0.875)])
def test_dropout_mask_is_the_cpu_kernels(manual_seed, p):
    """With scale 0 every probability is 1/Lk and v = I gives out = keep / (Lk (1 - p)): the Triton
    kernel's keep-mask read off exactly, compared with the CPU op's for the same seed."""
    batch, heads, q_len, k_len = 2, 3, S, 45
    q = torch.zeros(batch, heads, q_len, 16, device=DEVICE)
    k = torch.zeros(batch, heads, k_len, 16, device=DEVICE)
    v = torch.eye(k_len, device=DEVICE).expand(batch, heads, k_len, k_len)
    torch.manual_seed(manual_seed)
    out = bmkernels.attention(q, k, v, dropout_p=p, scale=0.0, backend="triton")
    keep = bmkernels.dropout_keep_mask(draw_seed(manual_seed), batch, heads, q_len, k_len, p)
    assert torch.equal(out.cpu() != 0, keep)
    assert 0 < keep.float().mean().item() < 1


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_forward_backward(dtype):
    p = 0.25
    q, k, v = qkv(dtype, q_len=M, k_len=S, head_dim=16, q_heads=4, kv_heads=2)
    bias = rand(1, 4, M, S, dtype=dtype, requires_grad=True)
    keep = bmkernels.dropout_keep_mask(draw_seed(5), 2, 4, M, S, p).to(DEVICE)

    def kern(q, k, v, bias):
        torch.manual_seed(5)
        return bmkernels.attention(q, k, v, bias=bias, causal=True, dropout_p=p, return_lse=True, backend="triton")

    def ref(q, k, v, bias):
        return reference.attention(q, k, v, bias=bias, causal=True, dropout_p=p, dropout_mask=keep, return_lse=True)

    check_against_reference(kern, ref, {"q": q, "k": k, "v": v, "bias": bias}, dtype)


# ------------------------------------------------------------------------------------------------
# Determinism, empty inputs, selection, errors.


def test_backward_is_deterministic():
    """No atomics: dK/dV sum a GQA group's heads in order and dQ has its own pass."""
    q, k, v = qkv(q_len=M, k_len=S, head_dim=16, q_heads=4, kv_heads=1)
    bias = rand(2, 4, M, S, requires_grad=True)
    runs = []
    for _ in range(2):
        out = bmkernels.attention(q, k, v, bias=bias, softcap=4.0, backend="triton")
        runs.append(torch.autograd.grad(out.square().sum(), (q, k, v, bias)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 2, 5, 3), (2, 2, 0, 3), (2, 2, 5, 0)], ids=["batch0", "lq0", "lk0"])
def test_empty_inputs(shape):
    batch, heads, q_len, k_len = shape
    q = torch.randn(batch, heads, q_len, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(batch, heads, k_len, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(batch, heads, k_len, 8, device=DEVICE, requires_grad=True)
    out, lse = bmkernels.attention(q, k, v, return_lse=True, backend="triton")
    want, want_lse = reference.attention(q, k, v, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse.float())
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("via", ["argument", "env"])
def test_sdpa_runs_the_triton_kernel(via, monkeypatch):
    calls = []
    kernel = triton_attention.attention_fwd
    monkeypatch.setattr(triton_attention, "attention_fwd", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    kwargs = {"backend": "triton"} if via == "argument" else {}
    if via == "env":
        monkeypatch.setenv("BMK_BACKEND", "triton")
    q, k, v = qkv(q_len=S, k_len=M, head_dim=16, q_heads=4, kv_heads=2)
    mask = bool_mask(S, M)
    out = bmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, **kwargs)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_build_info_lists_the_kernel():
    assert "attention" in bmkernels.build_info()["triton_kernels"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU auto picks the CUDA C++ kernel if compiled, else Triton")
def test_auto_on_cpu_is_the_cpu_kernel():
    assert _backend.choose("attention", torch.device("cpu")) == "cpu"


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(RuntimeError, match="runs only under the Triton interpreter"):
        bmkernels.attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "what,make,error,match",
    [
        ("float64", lambda: make_qkv(dtype=torch.float64), TypeError, "float64 runs on backend='cpu'"),
        ("head_dim", lambda: make_qkv(head_dim=264), ValueError, "head dims must be <= 256"),
        ("v_head_dim", lambda: make_qkv(head_dim=8, v_head_dim=300), ValueError, "head dims must be <= 256"),
    ],
)
def test_unsupported_inputs(what, make, error, match):
    q, k, v = (t.detach().to(DEVICE) for t in make())
    with pytest.raises(error, match=match):
        bmkernels.attention(q, k, v, backend="triton")


@INTERPRETER_ONLY_SKIP
def test_interpreter_refuses_bfloat16():
    q, k, v = make_qkv(dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(TypeError, match="interpreter .* cannot compute in bfloat16"):
        bmkernels.attention(q, k, v, backend="triton")


def test_argument_errors_are_the_ops():
    """Argument checks are shared with the CPU backend (bmkernels/ops/attention.py)."""
    q, k, v = qkv(head_dim=16)
    with pytest.raises(ValueError, match="window bounds must be >= -1"):
        bmkernels.attention(q, k, v, window=(-2, 0), backend="triton")


@INTERPRETER_ONLY_SKIP
def test_interpreter_uses_one_small_config():
    assert triton_attention.INTERPRETED
    for kernel in (triton_attention._fwd_kernel, triton_attention._bwd_dkdv_kernel, triton_attention._bwd_dq_kernel):
        assert len(kernel.configs) == 1


# ------------------------------------------------------------------------------------------------
# Without a GPU, the GPU path is at least compiled: triton lowers each kernel to a cubin for a GPU
# target (no device needed), in a subprocess because this one interprets.

_COMPILE_FOR_GPU = textwrap.dedent("""
    import inspect, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bmkernels.triton import attention as ta

    dtype, arch, block_d, block_dv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pointer_types = {"Lse": "*fp32", "Delta": "*fp32", "dBias": "*fp32", "Slopes": "*fp32", "Mask": "*u8",
                     "MaskTiles": "*u8",
                     "Seed": "*i64", "KeyRange": "*i64", "Segments": "*i64", "Tiles": "*i32"}
    data_pointers = ("Q", "K", "V", "Bias", "Out", "dO", "dK", "dV", "dQ")
    floats = ("scale", "softcap", "dropout_p", "dropout_scale")
    flags = {"HAS_BIAS": True, "HAS_MASK": True, "HAS_ALIBI": True, "HAS_SOFTCAP": True, "HAS_DROPOUT": True,
             "HAS_KEY_RANGE": True, "HAS_SEGMENTS": True, "COUNT_TILES": False, "BIAS_GRAD": True,
             "BLOCK_D": block_d, "BLOCK_DV": block_dv}
    report = {}
    for kernel in (ta._fwd_kernel, ta._bwd_dkdv_kernel, ta._bwd_dq_kernel):
        config = kernel.configs[0]  # the first A100/H100 autotune config (the only one when untuned)
        constexprs = {**flags, **config.kwargs}
        signature, consts = {}, {}
        for name in inspect.signature(kernel.fn.fn).parameters:
            if name in constexprs:
                signature[name], consts[name] = "constexpr", constexprs[name]
            elif name in pointer_types or name in data_pointers:
                signature[name] = pointer_types.get(name, "*" + dtype)
            else:
                signature[name] = "fp32" if name in floats else "i32"
        compiled = triton.compile(ASTSource(fn=kernel.fn, signature=signature, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        report[kernel.fn.__name__] = {"cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}
    print(json.dumps(report))
""")


# H100/H200 shared memory per block (the limit in triton's OutOfResources message there)
SHARED_MEMORY_LIMIT = 232448


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run")
@pytest.mark.parametrize(
    "dtype,block_d,block_dv,autotune",
    [("bf16", 128, 64, "1"), ("fp32", 256, 256, "0")],
    ids=["first-config-bf16-d128", "untuned-fp32-d256"],
)
@pytest.mark.slow
def test_kernels_compile_for_gpu(dtype, block_d, block_dv, autotune):
    """Every kernel, every feature on, lowered to an sm_90 cubin that fits shared memory: the first
    autotune config in bfloat16, and the config used without tuning (BMK_TRITON_AUTOTUNE=0) at the
    largest tiles, float32 head dim 256 (the first autotune config needs 426 KB there: on an H200 it
    failed with OutOfResources)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"BMK_TRITON_AUTOTUNE": autotune}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_GPU, dtype, "90", str(block_d), str(block_dv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for name, kernel in report.items():
        assert kernel["cubin_bytes"] > 0 and 0 < kernel["shared"] <= SHARED_MEMORY_LIMIT, (name, kernel)


def test_autotune_switch(monkeypatch):
    blocks = [(128, 64, 4, 3), (64, 32, 4, 2)]
    assert triton_attention.tuned(blocks) == blocks
    monkeypatch.setenv("BMK_TRITON_AUTOTUNE", "0")
    assert triton_attention.tuned(blocks) == [blocks[0]]
    assert triton_attention.tuned(blocks, untuned=(16, 32, 4, 1)) == [(16, 32, 4, 1)]


# ------------------------------------------------------------------------------------------------
# torch.compile and opcheck; GPU only: large shapes.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compile_fullgraph(dtype):
    """Dynamo traces the triton_op without a graph break. Under the interpreter only with the 'eager'
    backend: AOT autograd and inductor functionalize the kernel call on fake tensors, which the
    interpreter cannot run; on a GPU the default inductor backend compiles into the kernel."""
    q, k, v = qkv(dtype, q_len=M, k_len=L, head_dim=64 if ON_GPU else 16, q_heads=4, kv_heads=2)
    bias = rand(1, 4, M, L, dtype=dtype, requires_grad=True)

    options = {"causal": True, "softcap": 5.0, "return_lse": True}
    compiled = torch.compile(triton_fn(**options), fullgraph=True, backend="inductor" if ON_GPU else "eager")
    check_against_reference(
        compiled, reference_fn(**options), {"q": q, "k": k, "v": v, "bias": bias}, dtype, lse_grad=True
    )


# the interpreter cannot run the kernels inside AOT dispatch's functionalized fake tracing
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ()
)


@pytest.mark.parametrize("what", ["fwd", "bwd"])
def test_opcheck(what):
    q, k, v = (t.detach().requires_grad_() for t in qkv(q_len=M, k_len=S, head_dim=40, q_heads=4, kv_heads=2))
    bias = rand(1, 4, M, S, requires_grad=True)
    params = (0.2, 3.0, -1, -1, 0, 0.0)
    if what == "fwd":
        op, args = torch.ops.bmkernels.attention_triton_fwd.default, (q, k, v, bias, None, None, None, *params)
    else:
        out, lse = torch.ops.bmkernels.attention_triton_fwd(q, k, v, bias, None, None, None, *params)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        op = torch.ops.bmkernels.attention_triton_bwd.default
        args = tuple(t.detach() for t in (grad_out, q, k, v, out, lse, grad_lse, bias)) + (
            None,
            None,
            None,
            *params,
            True,
        )
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


@GPU_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_causal_gqa(dtype):
    q, k, v = qkv(dtype, batch=2, q_len=2048, head_dim=128, q_heads=8, kv_heads=2)
    options = {"causal": True, "return_lse": True}
    check_against_reference(
        triton_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v}, dtype, lse_grad=True
    )


# ------------------------------------------------------------------------------------------------
# Padding as key ranges: whole key blocks outside a batch's range are skipped (tiles counted).


@pytest.mark.parametrize("options", ({}, {"causal": True, "causal_alignment": "bottom_right"}, {"window": (20, 4)}))
def test_key_range_matches_reference(options):
    n = SIZE["long"]
    q, k, v = qkv(batch=3, q_heads=2, kv_heads=1, q_len=SIZE["mid"], k_len=n, head_dim=16)
    key_range = torch.tensor([[0, n], [0, n // 2], [n // 3, n]], device=DEVICE)
    check_against_reference(
        triton_fn(**options), reference_fn(**options), {"q": q, "k": k, "v": v, "key_range": key_range}, q.dtype
    )


def test_key_range_skips_whole_key_blocks():
    """Under the interpreter every block is 32 wide: a batch whose keys are [64, 96) of 128 visits one
    key block per query block in the forward and dQ passes instead of four, and the dK/dV pass visits
    query tiles only for that key block."""
    q, k, v = qkv(batch=2, q_heads=1, q_len=64, k_len=128, head_dim=16)
    key_range = torch.tensor([[0, 128], [64, 96]], device=DEVICE)
    counts = {}
    for name, kr in (("all", None), ("range", key_range)):
        with triton_attention.counting_tiles(DEVICE) as tiles:
            bmkernels.attention(q, k, v, key_range=kr, backend="triton").sum().backward()
        counts[name] = tiles.tolist()
    block = 32 if not ON_GPU else None
    if block:
        # forward / dQ: 2 query blocks x (4 key blocks for batch 0 + 4 or 1 for batch 1)
        assert counts["all"][0] == counts["all"][2] == 2 * (4 + 4)
        assert counts["range"][0] == counts["range"][2] == 2 * (4 + 1)
        # dK/dV: 4 key blocks x 2 query blocks for batch 0, 1 key block x 2 query blocks for batch 1
        assert counts["all"][1] == 4 * 2 + 4 * 2 and counts["range"][1] == 4 * 2 + 1 * 2
    assert all(r < a for r, a in zip(counts["range"], counts["all"], strict=True))


@pytest.mark.slow
def test_mask_tiles_with_nothing_kept_are_skipped():
    """A bool mask is analysed per tile (a table of 16 x 16 granules): the three kernels visit exactly the
    tiles where the mask keeps something (a 4-document mask: the block diagonal), and give the reference's
    results there; a tile the mask keeps entirely skips the mask loads (same results as no mask)."""
    length, block = 100, 32
    q, k, v = qkv(batch=2, q_heads=2, q_len=length, k_len=length, head_dim=16)
    docs = torch.arange(length) * 4 // length
    masks = {"documents": docs[:, None] == docs[None, :], "nothing": torch.zeros(length, length, dtype=torch.bool)}
    for name, mask in masks.items():
        with triton_attention.counting_tiles(DEVICE) as tiles:
            out = bmkernels.attention(q, k, v, mask=mask.to(DEVICE), backend="triton")
            out.sum().backward()
        if not ON_GPU:  # interpreter blocks are 32 x 32: count the blocks holding a kept entry
            n = -(-length // block)
            padded = torch.zeros(n * block, n * block, dtype=torch.bool)
            padded[:length, :length] = mask
            visited = int(padded.view(n, block, n, block).any(3).any(1).sum()) * 2 * 2  # x batch x heads
            assert tiles.tolist() == [visited] * 3, (name, tiles.tolist(), visited)
        expected = bmkernels.attention(q, k, v, mask=mask.to(DEVICE), backend="reference")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    kept = torch.ones(length, length, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(
        bmkernels.attention(q, k, v, mask=kept, backend="triton"), bmkernels.attention(q, k, v, backend="triton")
    )


_LOWER_FORWARD = textwrap.dedent("""
    import inspect, json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bmkernels.triton import attention as ta

    dtype = sys.argv[1]
    block_dv = ta._value_block(24, {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    flags = {"HAS_BIAS": False, "HAS_MASK": False, "HAS_ALIBI": False, "HAS_SOFTCAP": False, "HAS_DROPOUT": False,
             "HAS_KEY_RANGE": False, "HAS_SEGMENTS": False, "COUNT_TILES": False, "BLOCK_D": 64,
             "BLOCK_DV": block_dv, "BLOCK_M": 128, "BLOCK_N": 64}
    pointers = {"Lse": "*fp32", "Slopes": "*fp32", "Mask": "*u8", "MaskTiles": "*u8", "Seed": "*i64",
                "KeyRange": "*i64", "Segments": "*i64", "Tiles": "*i32"}
    signature, consts = {}, {}
    for name in inspect.signature(ta._fwd_kernel.fn.fn).parameters:
        if name in flags:
            signature[name], consts[name] = "constexpr", flags[name]
        elif name in pointers or name in ("Q", "K", "V", "Bias", "Out"):
            signature[name] = pointers.get(name, "*" + dtype)
        else:
            signature[name] = "fp32" if name in ("scale", "softcap", "dropout_p", "dropout_scale") else "i32"
    compiled = triton.compile(ASTSource(fn=ta._fwd_kernel.fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    print(json.dumps([line for line in compiled.asm["ttgir"].splitlines() if "#ttg.nvidia_mma<" in line]))
""")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run (test_value_head_dim_below_key_head_dim_every_config)")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.slow
def test_forward_lowering_avoids_the_narrow_value_wgmma(dtype):
    """The H200 failure (fp16/bf16, D = 40, Dv = 24, 128 x 64 tiles, 4 warps, 3 stages) had the P @ V
    product on a 16x32x16 wgmma; with the value block at 64 every wgmma of the forward is 16x64x16."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    result = subprocess.run(
        [sys.executable, "-c", _LOWER_FORWARD, dtype], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    layouts = json.loads(result.stdout.strip().splitlines()[-1])
    assert layouts and all("instrShape = [16, 64, 16]" in line for line in layouts), layouts


@pytest.mark.gpu(reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_value_head_dim_below_key_head_dim_every_config(dtype):
    """The shape that failed on an H200, run with each forward autotune config in turn."""
    q, k, v = qkv(dtype, q_len=97, k_len=333, head_dim=40, q_heads=2, kv_heads=2)
    v = rand(*v.shape[:3], 24, dtype=dtype)
    expected = bmkernels.attention(q.double(), k.double(), v.double(), backend="reference")
    kernel = triton_attention._fwd_kernel
    configs = list(kernel.configs)
    try:
        for config in configs:
            kernel.configs, kernel.cache = [config], {}
            out = bmkernels.attention(q, k, v, backend="triton")
            err = (out.double() - expected).abs().max().item()
            assert err < 2e-2, (config, err)
    finally:
        kernel.configs, kernel.cache = configs, {}
