"""What the build reports (bmkernels.build_info()) and the run-time CPU ISA choice (BMK_CPU_ISA)."""

import importlib.util
import json

import pytest
import torch

import bmkernels
from bmkernels import _backend
from bmkernels.testing import cpu_supports, make_qkv

ISAS = ("scalar", "avx2", "avx512")
KEYS = {
    "version",
    "extension_loaded",
    "cpu_isas",
    "active_cpu_isa",
    "cuda_archs",
    "cuda_kernels",
    "cuda_verified",
    "cuda_emulated_kernels",
    "triton_available",
    "triton_kernels",
    "torch",
    "torch_cuda",
    "cuda_device_available",
}


def test_build_info_keys_and_values():
    info = bmkernels.build_info()
    assert set(info) == KEYS
    assert info["version"] == bmkernels.__version__
    assert info["extension_loaded"] is True, "the compiled extension bmkernels._C did not load"
    assert set(ISAS) <= set(info["cpu_isas"]), info["cpu_isas"]
    assert info["active_cpu_isa"] in info["cpu_isas"]
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) and a for a in info["cuda_archs"])
    assert set(info["cuda_kernels"]) <= {"attention", "conv2d", "gru"}
    if not info["cuda_archs"]:
        assert info["cuda_kernels"] == [], "CUDA kernels reported without any compiled CUDA arch"
    assert set(info["cuda_verified"]) <= set(info["cuda_kernels"]) | {"attention", "conv2d", "gru"}
    assert set(info["cuda_emulated_kernels"]) <= {"attention", "conv2d", "gru"}
    assert info["triton_available"] is (importlib.util.find_spec("triton") is not None)
    assert info["triton_kernels"] == sorted(_backend.triton_ops())
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cuda_device_available"] is torch.cuda.is_available()
    json.dumps(info)  # plain data: pasteable into a bug report


def test_ops_registered():
    for op in ("attention_fwd", "attention_bwd", "attention_dropout_mask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bmkernels::{op}", "CPU"), op
    # the fake kernel gives shapes without computing (here on the meta device)
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = torch.empty(2, 2, 7, 8, device="meta")
    v = torch.empty(2, 2, 7, 3, device="meta")
    out, lse = torch.ops.bmkernels.attention_fwd(q, k, v, None, None, None, None, 0.5, 0.0, -1, -1, 0, 0.0)
    assert out.shape == (2, 4, 5, 3) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_default_isa_is_best_supported():
    best = next(isa for isa in reversed(ISAS) if cpu_supports(isa))
    assert bmkernels.build_info()["active_cpu_isa"] == best


@pytest.mark.parametrize("isa", ISAS)
def test_active_isa_follows_env(isa, monkeypatch):
    monkeypatch.setenv("BMK_CPU_ISA", isa)
    if cpu_supports(isa):
        assert bmkernels.build_info()["active_cpu_isa"] == isa
    else:
        with pytest.raises(RuntimeError, match=f"BMK_CPU_ISA={isa} but this CPU does not support {isa}"):
            bmkernels.build_info()
    monkeypatch.setenv("BMK_CPU_ISA", "")  # empty = not set
    assert bmkernels.build_info()["active_cpu_isa"] == next(i for i in reversed(ISAS) if cpu_supports(i))


@pytest.mark.parametrize("value", ("sse2", "AVX2", "avx512 ", "native"))
def test_invalid_isa_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("BMK_CPU_ISA", value)
    match = f"BMK_CPU_ISA must be one of scalar, avx2, avx512; got '{value}'"
    with pytest.raises(RuntimeError, match=match):
        bmkernels.build_info()
    q, k, v = make_qkv(requires_grad=False)
    with pytest.raises(RuntimeError, match=match):
        bmkernels.attention(q, k, v)
    # the reference does not care
    assert bmkernels.attention(q, k, v, backend="reference").shape == q.shape
