"""bmkernels.swap_modules / unswap: the swapped model computes what the original did (outputs and
gradients; float64 tight, float32 within the tolerance rule), in train and eval, with and without
grad, keeps its parameters, mode and optimizer, and goes back."""

import copy
import io

import pytest
import torch

import bmkernels
import bmkernels.nn.attention as nn_attention
from bmkernels.nn import MultiheadAttention
from bmkernels.testing import assert_within_rule, float64_tolerance, magnitude, max_abs_diff

D, HEADS = 16, 4

# torch's own warnings: its nested-tensor fast path (which the original encoder takes on purpose)
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True, but self.use_nested_tensor is False"),
]


def encoder(dtype=torch.float64, batch_first=True, norm_first=False, layers=2):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        D, HEADS, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=dtype
    )
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)


def forward_backward(model, x, seed=3, **kwargs):
    """output and the gradients (input and every parameter) of sum(output * g)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params.values()])
    return out, dict(zip(["input", *params], grads, strict=True))


def assert_close64(got, expected, what):
    assert max_abs_diff(got, expected) <= float64_tolerance(magnitude(expected)), what


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the swapped modules ran the bmkernels attention op."""
    calls = []
    real = nn_attention.attention
    monkeypatch.setattr(nn_attention, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_encoder_outputs_and_grads_float64(batch_first, norm_first, kernel_calls):
    original = encoder(batch_first=batch_first, norm_first=norm_first)
    swapped = copy.deepcopy(original)
    report = bmkernels.swap_modules(swapped)
    assert [name for name, _, _ in report.swapped] == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn((3, 9, D) if batch_first else (9, 3, D), dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    for kwargs in ({}, {"src_key_padding_mask": pad}, {"mask": mask, "is_causal": True}):
        out_a, grads_a = forward_backward(original, x, **kwargs)
        kernel_calls.clear()
        out_b, grads_b = forward_backward(swapped, x, **kwargs)
        assert len(kernel_calls) == 2
        assert_close64(out_b, out_a, "output")
        for name in grads_a:
            assert_close64(grads_b[name], grads_a[name], f"grad {name}")


def test_encoder_float32_within_tolerance():
    truth_model = encoder(torch.float64)
    original = encoder(torch.float32)
    swapped = bmkernels.swap_modules(copy.deepcopy(original)).model
    x = torch.randn(2, 33, D, dtype=torch.float64)
    truth, truth_grads = forward_backward(truth_model, x)
    same, same_grads = forward_backward(original, x.float())
    got, got_grads = forward_backward(swapped, x.float())
    assert_within_rule("output", got, truth, same, torch.float32)
    for name in truth_grads:
        assert_within_rule(f"grad {name}", got_grads[name], truth_grads[name], same_grads[name], torch.float32)


def test_encoder_eval_no_grad_runs_bmkernels(kernel_calls):
    """torch's inference fast paths (fused encoder layer, nested tensors) would bypass the swapped
    attention: the swap keeps them off, and the output still matches the original's (which takes
    them) on every non-padding position (torch's nested path writes 0 at padding positions)."""
    original = encoder().eval()
    swapped = copy.deepcopy(original)
    report = bmkernels.swap_modules(swapped)
    assert not swapped.use_nested_tensor and any("use_nested_tensor" in note for note in report.notes)
    assert report.other == {"Linear": 4, "Dropout": 6, "LayerNorm": 4}
    assert "other   Linear x4, Dropout x6, LayerNorm x4 (no bmkernels kernel" in str(report)
    x = torch.randn(3, 9, D, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        for model_a, model_b, calls in ((original, swapped, 2), (original.layers[0], swapped.layers[0], 1)):
            for kwargs in ({}, {"src_key_padding_mask": pad}):
                expected = model_a(x, **kwargs)
                kernel_calls.clear()
                got = model_b(x, **kwargs)
                assert len(kernel_calls) == calls
                assert_close64(got[~pad], expected[~pad], f"eval output {type(model_a).__name__} {list(kwargs)}")


def test_decoder_layer():
    torch.manual_seed(1)
    original = torch.nn.TransformerDecoderLayer(D, HEADS, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
    swapped = copy.deepcopy(original)
    report = bmkernels.swap_modules(swapped)
    assert sorted(name for name, _, _ in report.swapped) == ["multihead_attn", "self_attn"]
    x, memory = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 11, D, dtype=torch.float64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    kwargs = {
        "tgt_mask": torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64),
        "tgt_is_causal": True,
        "memory_key_padding_mask": pad,
    }
    a = original(x, memory, **kwargs)
    b = swapped(x, memory, **kwargs)
    assert_close64(b, a, "decoder output")
    ga = torch.autograd.grad(a.square().sum(), list(original.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(swapped.parameters()))
    for name, u, v in zip([n for n, _ in original.named_parameters()], ga, gb, strict=True):
        assert_close64(v, u, f"grad {name}")


class UserAttention(torch.nn.MultiheadAttention):
    pass


class UserModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, D)
        self.blocks = torch.nn.ModuleDict({"a": torch.nn.MultiheadAttention(D, HEADS), "b": UserAttention(D, HEADS)})

    def forward(self, x):
        h = self.proj(x)
        return self.blocks["a"](h, h, h)[0] + self.blocks["b"](h, h, h)[0]


def test_user_model_report_and_unswap():
    model = UserModel().double().eval()
    params_before = list(model.parameters())
    x = torch.randn(5, 2, D, dtype=torch.float64)
    expected = model(x)
    report = bmkernels.swap_modules(model)
    assert report.model is model
    assert [n for n, _, _ in report.swapped] == ["blocks.a"]
    assert type(model.blocks["a"]) is MultiheadAttention and not model.blocks["a"].training
    assert report.left == [("blocks.b", "UserAttention", report.left[0][2])]
    assert "subclasses nn.MultiheadAttention" in report.left[0][2]
    assert report.other == {"Linear": 1}, "the kept UserAttention's out_proj is part of it, not counted"
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert_close64(model(x), expected, "swapped user model")
    text = str(report)
    assert (
        "swapped blocks.a: torch.nn.modules.activation.MultiheadAttention -> bmkernels.nn.attention.MultiheadAttention"
        in text
        and "left    blocks.b (UserAttention)" in text
    )
    assert bmkernels.unswap(model) is model
    assert type(model.blocks["a"]) is torch.nn.MultiheadAttention
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert torch.equal(model(x), expected)


def test_shared_module_is_replaced_everywhere():
    shared = torch.nn.MultiheadAttention(D, HEADS)
    model = torch.nn.ModuleDict({"first": shared, "second": torch.nn.Sequential(shared)})
    report = bmkernels.swap_modules(model)
    assert [n for n, _, _ in report.swapped] == ["first"]
    assert model["first"] is model["second"][0] and type(model["first"]) is MultiheadAttention
    bmkernels.unswap(model)
    assert model["first"] is model["second"][0] and type(model["first"]) is torch.nn.MultiheadAttention


def test_family_flag_and_top_level_module():
    mha = torch.nn.MultiheadAttention(D, HEADS)
    report = bmkernels.swap_modules(mha, attention=False)
    assert report.model is mha and not report.swapped and report.left == [("", "MultiheadAttention", "attention=False")]
    report = bmkernels.swap_modules(mha)
    assert type(report.model) is MultiheadAttention and report.swapped[0][0] == ""
    assert type(bmkernels.to_torch(report.model)) is torch.nn.MultiheadAttention
    again = bmkernels.swap_modules(report.model)
    assert not again.swapped and not again.left, "a drop-in is not swapped twice"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bmkernels.swap_modules("model")


def test_dtype_mode_and_optimizer_survive_and_training_stays_together():
    """A few AdamW steps of the original and of a swapped copy (whose optimizer was built before the
    swap) stay together in float64."""
    original = encoder(layers=1).train()
    swapped = copy.deepcopy(original)
    opt_a = torch.optim.AdamW(original.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(swapped.parameters(), lr=1e-2)
    bmkernels.swap_modules(swapped)
    assert swapped.training and swapped.layers[0].self_attn.in_proj_weight.dtype == torch.float64
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(4, 10, D, generator=gen, dtype=torch.float64)
        for model, opt in ((original, opt_a), (swapped, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(original.named_parameters(), swapped.parameters(), strict=True):
        assert max_abs_diff(b, a) <= 1e-9, name


def test_state_dict_round_trips_through_torch_save_and_originals():
    original = encoder(layers=1)
    swapped = bmkernels.swap_modules(copy.deepcopy(original)).model
    buffer = io.BytesIO()
    torch.save(swapped.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert list(loaded) == list(original.state_dict())
    fresh_torch = encoder(layers=1)
    for p in fresh_torch.parameters():
        torch.nn.init.zeros_(p)
    fresh_torch.load_state_dict(loaded)
    fresh_swapped = bmkernels.swap_modules(encoder(layers=1)).model
    fresh_swapped.load_state_dict(original.state_dict())
    x = torch.randn(2, 6, D, dtype=torch.float64)
    assert_close64(fresh_torch(x), original(x), "torch model from the swapped state_dict")
    assert_close64(fresh_swapped(x), original(x), "swapped model from the torch state_dict")
    whole = io.BytesIO()
    torch.save(swapped, whole)
    whole.seek(0)
    assert_close64(torch.load(whole, weights_only=False)(x), original(x), "pickled swapped model")


def test_unswap_restores_encoder_flags():
    model = encoder()
    assert model.use_nested_tensor
    bmkernels.swap_modules(model)
    assert not model.use_nested_tensor
    bmkernels.unswap(model)
    assert model.use_nested_tensor and type(model.layers[0].self_attn) is torch.nn.MultiheadAttention


def test_swapped_encoder_compiles_fullgraph():
    original = encoder(torch.float32, layers=1).eval()
    swapped = bmkernels.swap_modules(copy.deepcopy(original)).model
    compiled = torch.compile(swapped, fullgraph=True)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        assert (compiled(x) - original(x)).abs().max().item() < 1e-5
