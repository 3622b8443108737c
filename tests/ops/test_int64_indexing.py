"""Element offsets past 2^31: the CPU kernels index in int64 (csrc/cpu: every offset is a product of
int64_t sizes and strides; no int/int32 index arithmetic). In CI: shapes past 2^31 elements through the
fake kernels (meta tensors). Exhaustive: a decode-shaped attention whose expanded (stride-0) keys and
values hold more than 2^31 logical elements (each one is read: 2^33 flops), and a real tensor just over
2^31 elements (bf16, 4 GiB in and 4 GiB out)."""

import time

import pytest
import torch
import torch.nn.functional as F

import bmkernels

BIG = 2**31 + 2**20  # elements, just past what int32 indexes


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def test_attention_fakes_past_int32():
    q, k, v = _meta(2, 4, 2**15, 2**13), _meta(2, 2, 2**15, 2**13), _meta(2, 2, 2**15, 2**12)
    assert q.numel() > 2**31 - 1  # past the largest int32
    out, lse = torch.ops.bmkernels.attention_fwd(q, k, v, None, None, None, None, 0.1, 0.0, -1, -1, 0, 0.0)
    assert out.shape == (2, 4, 2**15, 2**12) and lse.shape == (2, 4, 2**15) and out.device.type == "meta"


def test_conv_fakes_past_int32():
    x, w = _meta(2, 64, 2**12, 2**12 + 3, dtype=torch.bfloat16), _meta(128, 64, 3, 3, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    out, preact = torch.ops.bmkernels.conv2d_fwd(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 5, 0.0, True)
    assert out.shape == (2, 128, 2**12, 2**12 + 3) and preact.shape == out.shape


def test_gru_fakes_past_int32():
    x, h0 = _meta(2**16, 2**8, 2**8), _meta(1, 2**8, 2**10)
    w_ih, w_hh = _meta(3 * 2**10, 2**8), _meta(3 * 2**10, 2**10)
    out, h_n, workspace = torch.ops.bmkernels.gru_layer_fwd(x, h0, w_ih, w_hh, None, None, None, True)
    assert out.numel() > 2**31 and out.shape == (2**16, 2**8, 2**10) and h_n.shape == (1, 2**8, 2**10)
    assert workspace.shape == (1, 2**16, 2**8, 5 * 2**10)


@pytest.mark.exhaustive  # 2^33 flops: ~10-20 s on 2 cores
def test_attention_expanded_kv_past_int32():
    """Keys and values of one head expanded (stride 0) to 64 heads: 2^31 + 2^20 logical elements each, read
    through their strides (no copy), one query per head (decoding)."""
    heads, d = 64, 64
    keys = BIG // (heads * d)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, d, generator=gen)
    k1, v1 = torch.randn(1, 1, keys, d, generator=gen), torch.randn(1, 1, keys, d, generator=gen)
    k, v = k1.expand(1, heads, keys, d), v1.expand(1, heads, keys, d)
    assert k.numel() >= BIG and k.stride(1) == 0
    out = bmkernels.attention(q, k, v, backend="cpu")
    want = torch.softmax((q[0, :, 0].double() @ k1[0, 0].double().T) / d**0.5, dim=-1) @ v1[0, 0].double()
    torch.testing.assert_close(out[0, :, 0].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.exhaustive
def test_conv_real_tensor_past_int32(monkeypatch):
    """A real bf16 image of 2^31 + 2^20 pixels (4 GiB; 8 GiB with the output) through the CPU conv: the last
    rows, whose offsets pass 2^31, against F.conv2d on the same rows."""
    monkeypatch.setenv("BMK_CONV_ENGINE", "bmkernels")  # our kernel, not a timed race with ATen's
    width = 2**15
    height = BIG // width
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(1, 1, height, width, dtype=torch.bfloat16)
    for r in range(0, height, 4096):  # filled in slices: no 8 GiB float32 temporary
        x[0, 0, r : r + 4096] = torch.randn(min(4096, height - r), width, generator=gen).bfloat16()
    w, b = torch.randn(1, 1, 3, 3, generator=gen).bfloat16(), torch.randn(1, generator=gen).bfloat16()
    start = time.perf_counter()
    out = bmkernels.conv2d(x, w, b, padding=1, activation="relu", backend="cpu")
    elapsed = time.perf_counter() - start
    for rows in (slice(0, 3), slice(height // 2 - 1, height // 2 + 2), slice(height - 3, height)):
        want = F.relu(F.conv2d(x[:, :, rows].float(), w.float(), b.float(), padding=(0, 1)))
        got = out[:, :, rows.start + 1 : rows.stop - 1].float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    print(f"conv2d on {x.numel()} bf16 elements: {elapsed:.1f} s")
