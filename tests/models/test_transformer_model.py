"""Reference models: kernels="bmkernels" and kernels="torch" have the same parameters and compute the
same thing (float64, outputs and gradients); causality, padding, weight tying, torch.compile,
state_dict round trips, and clear errors."""

import io

import pytest
import torch
import torch.nn.functional as F

import bmkernels
from bmkernels.models import TransformerClassifier, TransformerLM
from bmkernels.testing import float64_tolerance, magnitude, max_abs_diff

SMALL = dict(max_len=24, d_model=32, n_heads=4, n_layers=2)


def build(cls, kernels, seed=0, **kwargs):
    torch.manual_seed(seed)
    args = (3,) if cls is TransformerClassifier else ()
    return cls(*args, kernels=kernels, **{**SMALL, **kwargs})


def tokens(batch=3, length=20, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, idx, **kwargs):
    logits = model(idx, **kwargs)
    target = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(2))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    names, params = zip(*model.named_parameters(), strict=True)
    names = [n.removeprefix("_orig_mod.") for n in names]  # torch.compile's wrapper
    return logits, dict(zip(names, torch.autograd.grad(loss, params), strict=True))


@pytest.mark.parametrize("cls", [TransformerLM, TransformerClassifier])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_bmkernels_and_torch_kernels_agree(cls, positions):
    ours, ref = (build(cls, k, positions=positions).double() for k in ("bmkernels", "torch"))
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    assert all(torch.equal(sd_ours[k], sd_ref[k]) for k in sd_ref), "same seed, same initial weights"
    kwargs = {}
    if cls is TransformerClassifier:
        pad = torch.zeros(3, 20, dtype=torch.bool)
        pad[1, 15:] = True
        kwargs["key_padding_mask"] = pad
    logits_a, grads_a = loss_and_grads(ref, tokens(), **kwargs)
    logits_b, grads_b = loss_and_grads(ours, tokens(), **kwargs)
    assert max_abs_diff(logits_b, logits_a) <= float64_tolerance(magnitude(logits_a))
    for name in grads_a:
        assert max_abs_diff(grads_b[name], grads_a[name]) <= float64_tolerance(magnitude(grads_a[name])), name


def test_lm_is_causal_and_tied():
    model = build(TransformerLM, "bmkernels").double()
    assert model.head.weight is model.backbone.embed.weight
    idx = tokens()
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_classifier_ignores_padding():
    model = build(TransformerClassifier, "bmkernels").double()
    idx = tokens()
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[:, 14:] = True
    other = idx.clone()
    other[:, 14:] = 7
    a, b = model(idx, key_padding_mask=pad), model(other, key_padding_mask=pad)
    assert max_abs_diff(a, b) <= float64_tolerance(magnitude(a))
    assert max_abs_diff(a, model(idx[:, :14])) <= float64_tolerance(magnitude(a))


def test_lm_backbone_initialises_classifier():
    lm = build(TransformerLM, "bmkernels", seed=5)
    clf = build(TransformerClassifier, "torch", seed=6)
    backbone = {k: v for k, v in lm.state_dict().items() if k.startswith("backbone.")}
    result = clf.load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    assert torch.equal(clf.backbone.blocks[1].attn.in_proj_weight, lm.backbone.blocks[1].attn.in_proj_weight)


def test_state_dict_round_trip_across_kernels():
    ours = build(TransformerLM, "bmkernels", positions="learned", seed=3)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    ref = build(TransformerLM, "torch", positions="learned", seed=4)
    ref.load_state_dict(torch.load(buffer, weights_only=True))
    idx = tokens()
    assert (ours(idx) - ref(idx)).abs().max().item() < 1e-5
    assert ref.head.weight is ref.backbone.embed.weight, "loading keeps the tie"


def test_swap_turns_torch_model_into_bmkernels_model():
    ref = build(TransformerLM, "torch").double()
    ours = build(TransformerLM, "bmkernels").double()
    report = bmkernels.swap_modules(ref)
    assert len(report.swapped) == SMALL["n_layers"] and not report.left
    idx = tokens()
    assert max_abs_diff(ref(idx), ours(idx)) <= float64_tolerance(magnitude(ours(idx)))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    model = build(TransformerLM, "bmkernels", n_layers=1)
    compiled = torch.compile(model, fullgraph=True)
    idx = tokens()
    eager_logits, eager_grads = loss_and_grads(model, idx)
    logits, grads = loss_and_grads(compiled, idx)
    assert (logits - eager_logits).abs().max().item() < 1e-4
    for name in eager_grads:
        assert grads[name].allclose(eager_grads[name], atol=1e-5, rtol=1e-4), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernels must be one of bmkernels, torch; got 'triton'"):
        TransformerLM(kernels="triton")
    with pytest.raises(ValueError, match="positions must be one of sinusoidal, learned; got 'rope'"):
        TransformerLM(positions="rope")
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of n_heads \(4\)"):
        TransformerLM(d_model=30, n_heads=4)
    model = build(TransformerLM, "bmkernels")
    with pytest.raises(ValueError, match="sequence length 30 exceeds max_len 24"):
        model(tokens(length=30))
    with pytest.raises(ValueError, match=r"idx must be \(batch, length\) token ids"):
        model(torch.zeros(5, dtype=torch.long))
