"""bmkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights:
outputs, attention weights and every gradient (inputs and parameters), float64 (tight) and float32
(the project's tolerance rule: error vs the float64 run <= 2x torch's own float32 error + floor)."""

import pytest
import torch

import bmkernels
import bmkernels.nn.attention as nn_attention
from bmkernels.nn import MultiheadAttention
from bmkernels.testing import assert_within_rule, float64_tolerance, magnitude, max_abs_diff

E, H = 12, 3

# torch's own warnings for inputs these tests pass on purpose (mixed mask types, nested tensors)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
]


def make_pair(dtype=torch.float64, seed=0, **kwargs):
    """(torch module, bmkernels module) with identical weights (biases made non-zero)."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiheadAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(
    batch_first,
    self_attention,
    kdim=None,
    vdim=None,
    batch=2,
    q_len=5,
    k_len=7,
    batched=True,
    dtype=torch.float64,
    seed=1,
):
    gen = torch.Generator().manual_seed(seed)

    def one(length, dim):
        shape = (length, dim) if not batched else ((batch, length, dim) if batch_first else (length, batch, dim))
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    q = one(q_len, E)
    if self_attention:
        return {"query": q, "key": q, "value": q}
    return {"query": q, "key": one(k_len, kdim or E), "value": one(k_len, vdim or E)}


def run(module, inputs, kwargs, dtype, seed=7):
    """out, weights and the gradients of sum(out * g) + sum(weights * gw) w.r.t. the inputs and
    every parameter. Inputs that are one tensor (self-attention) stay one tensor."""
    leaves = {}
    call = {}
    for name, t in inputs.items():
        same = next((n for n in leaves if inputs[n] is t), None)
        if same is None:
            leaves[name] = t.detach().to(dtype).requires_grad_(True)
        call[name] = leaves[same or name]
    call.update({k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()})
    out, weights = module(**call)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(leaves.values()) + list(params.values()))
    names = [f"grad {n}" for n in leaves] + [f"grad {n}" for n in params]
    return out, weights, dict(zip(names, grads, strict=True))


def check_pair(kwargs_ctor, inputs, kwargs_fwd, dtype):
    """ours in `dtype` vs torch in float64 (the truth) and torch in `dtype`."""
    ref64, _ = make_pair(torch.float64, **kwargs_ctor)
    ref, ours = make_pair(dtype, **kwargs_ctor)
    truth = run(ref64, inputs, kwargs_fwd, torch.float64)
    same = run(ref, inputs, kwargs_fwd, dtype)
    got = run(ours, inputs, kwargs_fwd, dtype)
    assert (got[1] is None) == (truth[1] is None)
    pairs = [("out", got[0], truth[0], same[0])]
    if truth[1] is not None:
        pairs.append(("weights", got[1], truth[1], same[1]))
    pairs += [(n, got[2][n], truth[2][n], same[2][n]) for n in truth[2]]
    for what, g, t, s in pairs:
        assert g.dtype == dtype, f"{what} dtype {g.dtype}"
        assert_within_rule(what, g, t, s, dtype)
    return got


CASES = {
    "self": (dict(), dict(self_attention=True)),
    "cross": (dict(), dict(self_attention=False)),
    "kdim_vdim": (dict(kdim=5, vdim=7), dict(self_attention=False, kdim=5, vdim=7)),
    "no_bias": (dict(bias=False), dict(self_attention=True)),
    "bias_kv": (dict(add_bias_kv=True), dict(self_attention=False)),
    "zero_attn": (dict(add_zero_attn=True), dict(self_attention=True)),
    "bias_kv_zero_attn": (
        dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7),
        dict(self_attention=False, kdim=5, vdim=7),
    ),
}


def masks(kind, batch=2, q_len=5, k_len=7, batched=True):
    """attn_mask / key_padding_mask variants; never a fully masked query row (torch gives NaN there)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.rand(q_len, k_len, generator=gen) < 0.4
    hidden[:, 0] = False
    pad = torch.zeros(batch, k_len, dtype=torch.bool)
    pad[-1, k_len - 2 :] = True
    if not batched:
        pad = pad[0]
    if kind == "none":
        return {}
    if kind == "bool2d":
        return {"attn_mask": hidden}
    if kind == "float2d":
        return {"attn_mask": torch.randn(q_len, k_len, generator=gen, dtype=torch.float64)}
    if kind == "bool3d":
        b = batch if batched else 1
        m = torch.rand(b * H, q_len, k_len, generator=gen) < 0.4
        m[..., 0] = False
        return {"attn_mask": m}
    if kind == "float3d_kpm_bool":
        b = batch if batched else 1
        return {
            "attn_mask": torch.randn(b * H, q_len, k_len, generator=gen, dtype=torch.float64),
            "key_padding_mask": pad,
        }
    if kind == "kpm_bool":
        return {"key_padding_mask": pad}
    if kind == "kpm_float":
        return {"key_padding_mask": torch.randn(pad.shape, generator=gen, dtype=torch.float64)}
    if kind == "both_bool":
        return {"attn_mask": hidden, "key_padding_mask": pad}
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_layouts(case, batch_first, dtype):
    ctor, inp = CASES[case]
    inputs = make_inputs(batch_first, **inp)
    check_pair({**ctor, "batch_first": batch_first}, inputs, {"need_weights": False}, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "mask", ["none", "bool2d", "float2d", "bool3d", "float3d_kpm_bool", "kpm_bool", "kpm_float", "both_bool"]
)
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_matches_torch_masks_and_weights(mask, need_weights, average, dtype):
    inputs = make_inputs(True, self_attention=False)
    kwargs = {**masks(mask), "need_weights": need_weights, "average_attn_weights": average}
    check_pair({"batch_first": True, "add_zero_attn": mask == "both_bool"}, inputs, kwargs, dtype)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool3d", "kpm_bool"])
def test_unbatched(mask, need_weights):
    inputs = make_inputs(False, self_attention=False, batched=False)
    kwargs = {**masks(mask, batched=False), "need_weights": need_weights, "average_attn_weights": False}
    out, weights, _ = check_pair({"add_bias_kv": True}, inputs, kwargs, torch.float64)
    assert out.shape == (5, E)
    assert need_weights == (weights is not None) and (weights is None or weights.shape == (H, 5, 8))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_is_causal(need_weights, with_padding):
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    inputs = make_inputs(True, self_attention=True, k_len=5)
    kwargs = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    if with_padding:
        kwargs["key_padding_mask"] = masks("kpm_bool", k_len=5)["key_padding_mask"]
    check_pair({"batch_first": True}, inputs, kwargs, torch.float64)
    for dtype in (torch.float32,):
        check_pair({"batch_first": True}, inputs, kwargs, dtype)


def test_is_causal_runs_the_kernel_causally(monkeypatch):
    """With the is_causal hint and nothing needing the explicit mask, the kernel gets causal=True
    (no mask tensor), as torch hands it to SDPA."""
    seen = []
    real = nn_attention.attention
    monkeypatch.setattr(nn_attention, "attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    _, ours = make_pair(batch_first=True)
    x = make_inputs(True, self_attention=True, k_len=5)["query"]
    ours(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1), is_causal=True, need_weights=False)
    assert seen[-1]["causal"] is True and seen[-1]["mask"] is None and seen[-1]["bias"] is None


def test_is_causal_needs_attn_mask_like_torch():
    ref, ours = make_pair(batch_first=True)
    x = make_inputs(True, self_attention=True)["query"]
    for module in (ref, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
            module(x, x, x, is_causal=True)


def test_dropout_with_weights_matches_torch_exactly():
    """Training with dropout and need_weights: torch's math path, the same dropout draws."""
    ref, ours = make_pair(dropout=0.3, batch_first=True)
    ref.train(), ours.train()
    inputs = make_inputs(True, self_attention=False)
    torch.manual_seed(11)
    expected = run(ref, inputs, {"need_weights": True}, torch.float64)
    torch.manual_seed(11)
    got = run(ours, inputs, {"need_weights": True}, torch.float64)
    for a, b in zip([expected[0], expected[1], *expected[2].values()], [got[0], got[1], *got[2].values()], strict=True):
        assert max_abs_diff(b, a) <= float64_tolerance(magnitude(a))


def test_fused_dropout_is_seeded_and_unbiased():
    """need_weights=False in training: the kernel's own dropout. Reproducible under manual_seed,
    different from eval, and unbiased: the mean over many draws approaches the eval output."""
    _, ours = make_pair(dropout=0.5, batch_first=True)
    x = make_inputs(True, self_attention=True)["query"]
    ours.eval()
    expected = ours(x, x, x, need_weights=False)[0]
    ours.train()
    torch.manual_seed(5)
    first = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(5)
    assert torch.equal(first, ours(x, x, x, need_weights=False)[0])
    assert (first - expected).abs().max() > 1e-3
    with torch.no_grad():
        draws = torch.stack([ours(x, x, x, need_weights=False)[0] for _ in range(500)])
    # unscaled (biased) dropout would put the mean about half the spread away
    spread = (draws - expected).abs().max().item()
    assert (draws.mean(0) - expected).abs().max().item() < 0.1 * spread


def test_fully_masked_query_gives_zeros():
    """A query that sees no key: zero output (as torch's SDPA path gives; its need_weights path gives
    NaN there). The returned weights of that row are NaN, as torch's."""
    ref, ours = make_pair(batch_first=True, bias=False)
    x = make_inputs(True, self_attention=True, k_len=5)["query"]
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True
    out_ref = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
    out_ref_w, weights_ref = ref(x, x, x, attn_mask=mask, need_weights=True)
    for need_weights in (False, True):
        out, weights = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
        assert max_abs_diff(out, out_ref) <= float64_tolerance(magnitude(out_ref))
    assert out_ref_w[:, 2].isnan().all() and weights_ref[:, 2].isnan().all() and weights[:, 2].isnan().all()
    keep = torch.arange(5) != 2
    assert max_abs_diff(weights[:, keep], weights_ref[:, keep]) <= float64_tolerance(1.0)


def test_state_dict_both_ways_and_isinstance():
    ref, ours = make_pair(kdim=5, vdim=7, add_bias_kv=True, batch_first=True)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    assert all(sd_ref[k].shape == sd_ours[k].shape for k in sd_ref)
    fresh_torch = torch.nn.MultiheadAttention(
        E, H, kdim=5, vdim=7, add_bias_kv=True, batch_first=True, dtype=torch.float64
    )
    fresh_torch.load_state_dict(sd_ours)
    fresh_ours = MultiheadAttention(E, H, kdim=5, vdim=7, add_bias_kv=True, batch_first=True, dtype=torch.float64)
    fresh_ours.load_state_dict(sd_ref)
    inputs = make_inputs(True, self_attention=False, kdim=5, vdim=7)
    a = fresh_torch(**inputs, need_weights=False)[0]
    b = fresh_ours(**inputs, need_weights=False)[0]
    assert max_abs_diff(b, a) <= float64_tolerance(magnitude(a))


def test_from_torch_and_back_share_parameters():
    ref, _ = make_pair(batch_first=True)
    ref.eval()
    ours = MultiheadAttention.from_torch(ref)
    assert type(ours) is MultiheadAttention and not ours.training
    assert all(a is b for a, b in zip(ref.parameters(), ours.parameters(), strict=True))
    back = ours.to_torch()
    assert type(back) is torch.nn.MultiheadAttention
    assert all(a is b for a, b in zip(ref.parameters(), back.parameters(), strict=True))
    assert not back._forward_pre_hooks, "the drop-in's own hook must not leak into the torch module"


def test_repr_names_backend():
    _, ours = make_pair(batch_first=True, dropout=0.1)
    text = repr(ours)
    assert "embed_dim=12, num_heads=3, dropout=0.1, batch_first=True, backend=cpu" in text
    assert "out_proj" in text
    assert "backend=reference" in repr(MultiheadAttention(E, H, backend="reference"))


def test_backend_reference_agrees():
    _, ours = make_pair(batch_first=True)
    ref_backend = MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, backend="reference")
    ref_backend.load_state_dict(ours.state_dict())
    x = make_inputs(True, self_attention=True)["query"]
    a, b = ours(x, x, x, need_weights=False)[0], ref_backend(x, x, x, need_weights=False)[0]
    assert max_abs_diff(a, b) <= float64_tolerance(magnitude(b))


def test_gradcheck():
    _, ours = make_pair(batch_first=True, add_bias_kv=True)
    inputs = make_inputs(True, self_attention=False, batch=1, q_len=3, k_len=4)
    q, k, v = (t.requires_grad_() for t in inputs.values())
    pad = torch.tensor([[False, False, True, False]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: ours(q, k, v, key_padding_mask=pad, need_weights=False)[0], (q, k, v)
    )


def test_compile_fullgraph():
    _, ours = make_pair(dtype=torch.float32, batch_first=True)
    x = make_inputs(True, self_attention=True, dtype=torch.float32)["query"]
    compiled = torch.compile(ours, fullgraph=True)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    eager = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    got = compiled(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    assert (got - eager).abs().max().item() <= 1e-6


def test_bad_inputs():
    _, ours = make_pair(batch_first=True)
    x = make_inputs(True, self_attention=True)["query"]
    with pytest.raises(TypeError, match="only bool and floating types of attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="The shape of the 2D attn_mask is"):
        ours(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="The shape of the 3D attn_mask is"):
        ours(x, x, x, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query must have 12 features \(the last dim\); got shape \(2, 5, 8\)"):
        ours(x[..., :8], x, x)
    _, cross = make_pair(batch_first=True, kdim=5, vdim=7)
    with pytest.raises(ValueError, match="value must have 7 features"):
        cross(x, x[..., :5], x[..., :5])
    with pytest.raises(ValueError, match="backend must be one of"):
        MultiheadAttention(E, H, backend="gpu")
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(4, E)])
    with pytest.raises(ValueError, match="nested tensors are not supported"):
        ours(nested, nested, nested)


def test_public_exports():
    assert bmkernels.nn.MultiheadAttention is MultiheadAttention
    assert "swap_modules" in bmkernels.__all__
