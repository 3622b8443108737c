"""Backend selection (bmkernels/_backend.py): backend= argument > BMK_BACKEND > auto; 'reference'
always works and matches the kernel; unknown names and unavailable backends raise errors that name
them; nothing silently falls back."""

import sys
import types

import pytest
import torch

import bmkernels
from bmkernels import _backend, _extension
from bmkernels.ops import attention as ops_attention
from bmkernels.reference import attention as reference
from bmkernels.testing import make_qkv

CPU = torch.device("cpu")


@pytest.fixture
def ran(monkeypatch):
    """Records which backend ran each attention call: 'cpu' (the registered op) or 'reference'."""
    calls = []
    kernel, ref = torch.ops.bmkernels.attention_fwd, reference.attention
    monkeypatch.setattr(torch.ops.bmkernels, "attention_fwd", lambda *a, **kw: calls.append("cpu") or kernel(*a, **kw))
    monkeypatch.setattr(
        ops_attention.reference, "attention", lambda *a, **kw: calls.append("reference") or ref(*a, **kw)
    )
    return calls


@pytest.mark.parametrize(
    "argument,env,expected",
    [
        (None, None, "cpu"),  # auto: CPU tensors -> the CPU kernel
        (None, "", "cpu"),  # an empty BMK_BACKEND is unset
        (None, "auto", "cpu"),
        (None, "reference", "reference"),
        (None, "cpu", "cpu"),
        ("reference", None, "reference"),
        ("reference", "cpu", "reference"),  # the argument beats the environment
        ("cpu", "reference", "cpu"),
        ("auto", "reference", "cpu"),
        ("cpu", "no-such-backend", "cpu"),  # the environment is not even read when the argument is given
        ("reference", "triton", "reference"),
    ],
)
def test_precedence(argument, env, expected, monkeypatch, ran):
    if env is not None:
        monkeypatch.setenv("BMK_BACKEND", env)
    assert _backend.choose("attention", CPU, argument) == expected
    q, k, v = make_qkv(requires_grad=False)
    bmkernels.attention(q, k, v, backend=argument)
    bmkernels.scaled_dot_product_attention(q, k, v, backend=argument)
    assert ran == [expected, expected]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize(
    "options,tensors",
    [
        ({}, {}),
        (
            {
                "causal": True,
                "causal_alignment": "bottom_right",
                "window": (5, 1),
                "softcap": 2.0,
                "scale": 0.4,
                "return_lse": True,
            },
            {"bias": True, "mask": True, "key_padding_mask": True, "alibi_slopes": True},
        ),
    ],
    ids=("plain", "all_features"),
)
def test_reference_backend_matches_kernel(options, tensors, dtype):
    q, k, v = make_qkv(q_heads=4, kv_heads=2, q_len=13, k_len=19, head_dim=8, dtype=dtype)
    extra = {}
    if tensors:
        extra["bias"] = torch.randn(2, 1, 13, 19, dtype=dtype, requires_grad=True)
        extra["mask"] = torch.rand(13, 19, generator=torch.Generator().manual_seed(1)) < 0.8
        extra["key_padding_mask"] = torch.zeros(2, 19, dtype=torch.bool)
        extra["key_padding_mask"][1, -4:] = True
        extra["alibi_slopes"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    leaves = [q, k, v] + ([extra["bias"]] if "bias" in extra else [])
    results = {}
    for backend in ("reference", "cpu"):
        result = bmkernels.attention(q, k, v, backend=backend, **options, **extra)
        outs = result if isinstance(result, tuple) else (result,)
        weight = torch.linspace(-1, 1, outs[0].numel(), dtype=dtype).view(outs[0].shape)
        results[backend] = outs + torch.autograd.grad((outs[0] * weight).sum(), leaves)
    tol = {"rtol": 0, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 2e-5}
    for got, want in zip(results["cpu"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_reference_backend_dropout():
    """The reference backend draws its own (torch.rand) mask: reproducible under torch.manual_seed."""
    q, k, v = make_qkv(q_len=9, k_len=11, dtype=torch.float64, requires_grad=False)
    torch.manual_seed(3)
    out = bmkernels.attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(3)
    keep = torch.rand(2, 2, 9, 11) >= 0.3
    torch.testing.assert_close(out, reference.attention(q, k, v, dropout_p=0.3, dropout_mask=keep), rtol=0, atol=0)


def test_reference_backend_works_anywhere():
    """'reference' needs neither the extension nor a CPU tensor (here: the meta device)."""
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = v = torch.empty(2, 2, 7, 8, device="meta")
    out, lse = bmkernels.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5)


def test_unknown_backend_argument():
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'cpp'"):
        bmkernels.attention(q, k, v, backend="cpp")
    with pytest.raises(ValueError, match="'CPU'"):
        bmkernels.scaled_dot_product_attention(q, k, v, backend="CPU")


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("BMK_BACKEND", "fast")
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(ValueError, match=r"BMK_BACKEND must be one of .*; got 'fast'"):
        bmkernels.attention(q, k, v)


@pytest.mark.parametrize("via", ("argument", "env"))
def test_cuda_backend_on_cpu_tensors(via, monkeypatch, ran):
    q, k, v = make_qkv(requires_grad=False)
    kwargs = {"backend": "cuda"} if via == "argument" else {}
    if via == "env":
        monkeypatch.setenv("BMK_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors; got cpu"):
        bmkernels.attention(q, k, v, **kwargs)
    assert ran == []  # nothing ran instead


@pytest.mark.parametrize("via", ("argument", "env"))
def test_triton_backend_on_cpu_needs_the_interpreter(via, monkeypatch, ran):
    """The Triton kernels take CPU tensors only under TRITON_INTERPRET=1: otherwise an error, never a
    fallback (tests/triton/test_triton_attention.py runs them under the interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(requires_grad=False)
    kwargs = {"backend": "triton"} if via == "argument" else {}
    if via == "env":
        monkeypatch.setenv("BMK_BACKEND", "triton")
    match = "runs only under the Triton interpreter" if _backend.triton_available() else "triton is not installed"
    with pytest.raises(RuntimeError, match=match):
        bmkernels.attention(q, k, v, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        bmkernels.scaled_dot_product_attention(q, k, v, **kwargs)
    assert ran == []


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
def test_triton_kernels_listed(monkeypatch):
    assert {"attention", "conv2d"} <= _backend.triton_ops()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "triton_ops", lambda: frozenset({"attention"}))
    with pytest.raises(RuntimeError, match="has no Triton kernel for conv2d yet"):
        _backend.choose("conv2d", CPU, "triton")


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
def test_auto_on_cuda_is_triton_until_the_cuda_kernel_is_gpu_verified(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_kernels", lambda: [])
    assert _backend.choose("attention", torch.device("cuda")) == "triton"
    monkeypatch.setattr(_extension, "cuda_kernels", lambda: ["attention"])
    assert _backend.choose("attention", torch.device("cuda")) == "triton"  # compiled, not yet verified on a GPU
    monkeypatch.setattr(_backend, "CUDA_VERIFIED", frozenset({"attention"}))
    assert _backend.choose("attention", torch.device("cuda")) == "cuda"


def test_cuda_emulated_backend_is_checked(monkeypatch):
    monkeypatch.setattr(_extension, "emulated_kernels", lambda: ["attention"])
    assert _backend.choose("attention", CPU, "cuda_emulated") == "cuda_emulated"
    monkeypatch.setenv("BMK_BACKEND", "cuda_emulated")
    assert _backend.choose("attention", CPU) == "cuda_emulated"
    with pytest.raises(RuntimeError, match="no emulated CUDA kernel for conv2d"):
        _backend.choose("conv2d", CPU, "cuda_emulated")
    with pytest.raises(RuntimeError, match="'cuda_emulated' needs CPU tensors"):
        _backend.choose("attention", torch.device("cuda"), "cuda_emulated")


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("backend", [None, "triton"])
def test_choice_for_cuda_traces_without_graph_break(backend):
    """torch.compile(fullgraph=True) of an op on CUDA tensors traces the backend choice (it broke the
    graph on a GPU: find_spec and the dispatcher query cannot be traced); checkable without a GPU."""

    def f(x):
        name = _backend.choose("attention", torch.device("cuda"), backend)
        return x + len(name)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)), f(torch.zeros(2)))


@pytest.mark.skipif(not _backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("op,module", [("attention", "attention"), ("conv2d", "conv")])
def test_triton_kernels_compiled_before_the_interpreter_was_asked_for(op, module, monkeypatch):
    """TRITON_INTERPRET=1 set after the kernels were built for the GPU: a clear error, not a crash."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, f"bmkernels.triton.{module}", types.SimpleNamespace(INTERPRETED=False))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after the Triton kernels were compiled"):
        _backend.choose(op, CPU, "triton")


def test_no_fallback_for_other_devices(ran):
    q = torch.empty(1, 2, 3, 8, device="meta")
    with pytest.raises(RuntimeError, match="no backend for meta tensors; use backend='reference'"):
        bmkernels.attention(q, q, q)
    with pytest.raises(RuntimeError, match="backend 'cpu' needs CPU tensors; got meta"):
        bmkernels.attention(q, q, q, backend="cpu")
    assert ran == []


def test_missing_extension_is_a_clear_error(monkeypatch):
    """Without the compiled extension the CPU backend says how to build it; 'reference' still works."""
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", ImportError("libc10.so: cannot open shared object file"))
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(RuntimeError, match=r"needs the compiled bmkernels extension.*pip install"):
        bmkernels.attention(q, k, v)
    with pytest.raises(RuntimeError, match="dropout_keep_mask needs the compiled bmkernels extension"):
        bmkernels.dropout_keep_mask(torch.tensor([1]), 1, 1, 2, 2, 0.5)
    torch.testing.assert_close(bmkernels.attention(q, k, v, backend="reference"), reference.attention(q, k, v))
    info = bmkernels.build_info()
    assert info["extension_loaded"] is False and info["cpu_isas"] == [] and info["active_cpu_isa"] is None
