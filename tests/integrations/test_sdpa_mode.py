"""bmkernels.sdpa_mode: F.scaled_dot_product_attention calls in its scope run bmkernels' kernel (the
profiler sees bmkernels::attention_fwd and no aten SDPA), with torch's results and gradients; calls
it cannot serve fall through to torch unchanged; as a context manager and as a decorator."""

import pytest
import torch
import torch.nn.functional as F

import bmkernels


class SelfAttention(torch.nn.Module):
    """A module that calls SDPA itself, as diffusers' and many custom models' attention does."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None, causal=False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def inputs():
    torch.manual_seed(0)
    return SelfAttention(), torch.randn(2, 9, 32, requires_grad=True)


def ops_seen(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize(
    "kwargs", ({}, {"causal": True}, {"mask": torch.rand(9, 9) > 0.3}), ids=("plain", "causal", "mask")
)
def test_routes_sdpa_to_bmkernels(kwargs):
    model, x = inputs()
    expected = model(x, **kwargs)
    (g_expected,) = torch.autograd.grad(expected.sum(), x)
    with bmkernels.sdpa_mode() as mode:
        got = model(x, **kwargs)
        names = ops_seen(lambda: model(x, **kwargs))
    (g_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-6)
    assert "bmkernels::attention_fwd" in names and not any("scaled_dot_product" in n for n in names)
    assert mode.served == 2 and mode.fell_through == 0


def test_outside_the_scope_torch_runs():
    model, x = inputs()
    with bmkernels.sdpa_mode():
        pass
    names = ops_seen(lambda: model(x))
    assert "bmkernels::attention_fwd" not in names


def test_as_a_decorator():
    model, x = inputs()

    @bmkernels.sdpa_mode()
    def forward(x):
        return model(x)

    names = ops_seen(lambda: forward(x))
    assert "bmkernels::attention_fwd" in names
    torch.testing.assert_close(forward(x), model(x), rtol=1e-5, atol=1e-6)


def test_calls_it_cannot_serve_fall_through():
    """float64 has no Triton kernel: with backend="triton" such a call runs torch's SDPA instead."""
    pytest.importorskip("triton")
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    with bmkernels.sdpa_mode(backend="triton") as mode:
        got = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, q, q))
    assert (mode.served, mode.fell_through) == (0, 1)


def test_broadcast_forms_are_served():
    """A 3-D query against 4-D key/value (torch broadcasts it): bmkernels serves it, with torch's result."""
    q = torch.randn(4, 5, 8)
    k = torch.randn(2, 4, 6, 8)
    with bmkernels.sdpa_mode() as mode:
        got = F.scaled_dot_product_attention(q, k, k)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, k), rtol=1e-5, atol=1e-6)
    assert (mode.served, mode.fell_through) == (1, 0)


def test_a_wrong_call_gets_torchs_error():
    q = torch.randn(1, 2, 5, 8)
    with bmkernels.sdpa_mode(), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, torch.randn(1, 2, 5, 7), q)  # key's head dim differs from query's


def test_other_torch_functions_are_untouched():
    with bmkernels.sdpa_mode():
        assert torch.add(torch.ones(2), 1).tolist() == [2.0, 2.0]


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        bmkernels.sdpa_mode(backend="tpu")


def test_compiles_inside_the_mode():
    torch._dynamo.reset()
    model, x = inputs()
    with bmkernels.sdpa_mode():
        expected = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
