"""The persistent GRU forward (csrc/cuda/gru_persistent.cu: W_hh resident in shared memory, one cooperative launch,
a grid barrier per step), selected by BMK_CUDA_GRU_ENGINE=persistent, against the float64 reference: the layer
cases of the per-step tests in float32, float16 and bfloat16, outputs and every gradient (the backward is the
per-step one, on the workspace this kernel writes), lengths; run by the SIMT emulator's cooperative mode (4 "SMs":
layers split into several CTAs per direction; the race detector checks every launch) and by the GPU where there is
one. Also the plans (csrc/cuda/gru.h) and the fallback to the per-step kernels."""

import pytest
import torch

from bmkernels.reference import gru as reference

# the per-step file's layer tests and opcheck, collected here again and run with this module's engine fixture
from tests.cuda.test_cuda_emulator_gru import layers, needs_emulator
from tests.cuda.test_cuda_emulator_gru import test_gru_lengths_match_reference as test_gru_lengths_match_reference
from tests.cuda.test_cuda_emulator_gru import test_gru_matches_reference as test_gru_matches_reference
from tests.cuda.test_cuda_emulator_gru import test_opcheck_emulated_layer as test_opcheck_emulated_layer
from tests.ops.test_gru import gru_fn, gru_weights, rand


@pytest.fixture(autouse=True)
def persistent_engine(monkeypatch):
    monkeypatch.setenv("BMK_CUDA_GRU_ENGINE", "persistent")


def _both_engines(monkeypatch, *tensors, bi):
    outs = []
    for engine in ("steps", "persistent"):
        monkeypatch.setenv("BMK_CUDA_GRU_ENGINE", engine)
        outs.append(layers("cuda_emulated", 1, bi)(*tensors))
    return outs


@needs_emulator
def test_persistent_runs_and_keeps_w_hh_h_in_float32(monkeypatch):
    """float16: the per-step path rounds W_hh h to float16 (the GEMM's output), the persistent kernel keeps it in
    float32: different bits, and closer to float64."""
    gen = torch.Generator().manual_seed(5)
    x, h0 = rand(5, 3, 4, dtype=torch.float16, gen=gen), rand(2, 3, 24, dtype=torch.float16, gen=gen)
    weights = gru_weights(4, 24, 1, True, dtype=torch.float16)
    (steps_out, _), (persistent_out, _) = _both_engines(monkeypatch, x, h0, *weights, bi=True)
    exact, _ = gru_fn(reference.gru, 1, True, False)(x.double(), h0.double(), *[w.double() for w in weights])
    assert not torch.equal(steps_out, persistent_out)
    assert (persistent_out.double() - exact).abs().mean() < (steps_out.double() - exact).abs().mean()


@needs_emulator
def test_falls_back_where_w_hh_does_not_fit(monkeypatch):
    """H = 200 in float32 over 4 emulated SMs: 100 units' W_hh rows and the state need 240800 bytes > 227 KB:
    the per-step kernels run it, bit for bit as with BMK_CUDA_GRU_ENGINE=steps."""
    with pytest.raises(RuntimeError, match="need 240800 bytes of shared memory per CTA; the device allows 232448"):
        torch.ops.bmkernels.gru_persistent_cuda_plan(2, 1, 200, 4, 4, 227 * 1024)
    gen = torch.Generator().manual_seed(2)
    x, h0 = rand(1, 1, 2, gen=gen), rand(2, 1, 200, gen=gen)
    a, b = _both_engines(monkeypatch, x, h0, *gru_weights(2, 200, 1, True), bi=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@needs_emulator
def test_engine_name_is_checked(monkeypatch):
    monkeypatch.setenv("BMK_CUDA_GRU_ENGINE", "cudnn")
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(RuntimeError, match="BMK_CUDA_GRU_ENGINE must be steps or persistent; got 'cudnn'"):
        layers("cuda_emulated", 1, False)(rand(2, 1, 3, gen=gen), rand(1, 1, 4, gen=gen), *gru_weights(3, 4))


def test_plans_split_every_layer():
    keys = ("threads", "slices", "units", "blocks", "weight_bytes", "shared")
    for directions in (1, 2):
        for sms in (2, 4, 132):
            for hidden in (1, 3, 17, 64, 65, 1000):
                for batch, elem in ((1, 2), (8, 4)):
                    try:
                        plan = torch.ops.bmkernels.gru_persistent_cuda_plan(
                            directions, batch, hidden, elem, sms, 227 * 1024
                        )
                    except RuntimeError as e:
                        assert "bytes of shared memory per CTA" in str(e)
                        assert 3 * -(-hidden // (sms // directions)) * hidden * elem > 200 * 1024
                        continue
                    p = dict(zip(keys, plan, strict=True))
                    assert p["threads"] == 256 and p["blocks"] == directions * p["slices"] <= sms
                    # every unit in exactly one CTA, none empty, as wide as the SMs allow
                    assert p["slices"] * p["units"] >= hidden > (p["slices"] - 1) * p["units"]
                    assert p["slices"] <= sms // directions
                    assert p["units"] == -(-hidden // min(sms // directions, hidden))
                    assert p["weight_bytes"] % 16 == 0 and p["weight_bytes"] >= 3 * p["units"] * hidden * elem
                    assert p["shared"] == p["weight_bytes"] + batch * hidden * 4 <= 227 * 1024
    with pytest.raises(RuntimeError, match="sms >= directions"):
        torch.ops.bmkernels.gru_persistent_cuda_plan(2, 1, 4, 2, 1, 1 << 20)
