"""swap_modules on timm models built with random weights (no hub): ViT's timm.layers.Attention gets
bmkernels' drop-in (same parameters, state_dict and module tree), ResNet-18 and EfficientNet-B0 get
the conv drop-ins; outputs and every parameter gradient match the unpatched model under the
tolerance rule (truth: the unpatched model in float64); subclasses of timm's Attention are left and
reported; unswap restores timm's class."""

import copy

import pytest
import torch

from bmkernels.testing import assert_within_rule

timm = pytest.importorskip("timm")

import bmkernels  # noqa: E402
from bmkernels.integrations import timm as bmk_timm  # noqa: E402

MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    "resnet18": ("resnet18", {}, 64),
    "efficientnet_b0": ("efficientnet_b0", {}, 64),
}


def build(name):
    arch, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).eval()


def images(name):
    size = MODELS[name][2]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x.to(next(model.parameters()).dtype))
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_swapped_model_matches_unpatched(name):
    x = images(name)
    truth_model, torch_model, bmk_model = build(name).double(), build(name), build(name)
    report = bmkernels.swap_modules(bmk_model)
    assert report.swapped, str(report)
    truth, truth_grads = run(truth_model, x)
    same, same_grads = run(torch_model, x)
    got, got_grads = run(bmk_model, x)
    assert_within_rule("output", got, truth, same, torch.float32)
    assert set(got_grads) == set(truth_grads)
    for param in truth_grads:
        assert_within_rule(f"grad {param}", got_grads[param], truth_grads[param], same_grads[param], torch.float32)


def test_vit_attention_is_swapped_in_place():
    model = build("vit")
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    report = bmkernels.swap_modules(model)
    attention = [(n, src, dst) for n, src, dst in report.swapped if n.endswith(".attn")]
    assert len(attention) == len(model.blocks)
    assert attention[0][1] == "timm.layers.attention.Attention"
    assert attention[0][2] == "bmkernels.integrations.timm.Attention"
    assert all(
        isinstance(b.attn, bmk_timm.Attention) and isinstance(b.attn, timm.layers.Attention) for b in model.blocks
    )
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.profiler.profile() as prof, torch.no_grad():
        model(images("vit"))
    names = {e.key for e in prof.key_averages()}
    assert "bmkernels::attention_fwd" in names and not any("scaled_dot_product" in n for n in names)
    bmkernels.unswap(model)
    assert all(type(b.attn) is timm.layers.Attention for b in model.blocks)


def test_vit_training_with_attention_dropout():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, attn_drop_rate=0.1)
    bmkernels.swap_modules(model)
    model.train()
    out = model(images("vit"))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and torch.isfinite(out).all()


def test_attention_subclass_is_left_and_reported():
    class MyAttention(timm.layers.Attention):
        pass

    model = torch.nn.Sequential(MyAttention(32, num_heads=4))
    report = bmkernels.swap_modules(model)
    assert report.swapped == []
    ((name, cls, why),) = report.left
    assert (name, cls) == ("0", "MyAttention") and "subclasses timm.layers.Attention" in why and "sdpa_mode" in why


def test_other_attention_modules_are_reported_not_silent():
    class CrossAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), CrossAttention())
    report = bmkernels.swap_modules(model)
    ((name, cls, why),) = report.left
    assert (name, cls) == ("1", "CrossAttention") and "sdpa_mode()" in why
    assert "left    1 (CrossAttention)" in str(report)


def test_swapped_vit_deepcopies_and_loads_state():
    model = build("vit")
    bmkernels.swap_modules(model)
    clone = copy.deepcopy(model)
    clone.load_state_dict(build("vit").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clone(images("vit")), model(images("vit")))
