"""The CNNs users have, swapped (and fused) against the originals in float64: torchvision ResNet-18/50 and
MobileNetV2, timm resnet18 / efficientnet_b0 / convnext_atto (random weights, random BatchNorm
statistics), NCHW and channels_last (model and input converted), three SGD steps in training mode, each
from the original's state (outputs, every gradient, the updated parameters and BatchNorm buffers equal),
then eval (BatchNorm
folded; outputs and gradients equal). The fusion report says what was fused. The big models are slow."""

import copy

import pytest
import torch

import bmkernels
from bmkernels.testing import float64_tolerance, magnitude, max_abs_diff, random_batchnorm_statistics

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

# name -> (builder, (batch, image size), fused entries the report must hold, slow). EfficientNet's and
# MobileNet's training steps amplify rounding differences ~30x a step at batch 2 (BatchNorm over 2x2 maps)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 40), 12, False),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None, num_classes=10), (2, 40), 21, True),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), (4, 64), 62, True),
    "timm_resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), (2, 40), 12, False),
    "timm_efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10),
        (4, 64),
        17,
        True,
    ),
    "timm_convnext_atto": (
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
        (2, 40),
        0,
        True,
    ),
}
FAST = {("resnet18", "nchw"), ("timm_resnet18", "cl"), ("timm_efficientnet_b0", "nchw")}


def _params():
    for name, (_, _, _, slow) in MODELS.items():
        for layout in ("nchw", "cl"):
            marks = [pytest.mark.slow] + ([pytest.mark.exhaustive] if slow and (name, layout) not in FAST else [])
            yield pytest.param(name, layout, marks=marks, id=f"{name}-{layout}")


def build(name, layout):
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    random_batchnorm_statistics(model)
    return model.to(memory_format=torch.channels_last) if layout == "cl" else model


def step(model, optimizer, x, seed):
    x = x.detach().clone().requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * g).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    optimizer.step()
    return out.detach(), grads


def assert_close(name, got, want):
    assert got.shape == want.shape, name
    assert max_abs_diff(got, want) <= float64_tolerance(magnitude(want)), name


@pytest.mark.parametrize("name,layout", list(_params()))
def test_swapped_model_equals_original(name, layout):
    original = build(name, layout)
    swapped = copy.deepcopy(original)
    report = bmkernels.swap_modules(swapped)
    assert not report.left and len(report.swapped) == sum(type(m) is torch.nn.Conv2d for m in original.modules())
    assert len(report.fused) == MODELS[name][2], str(report)
    assert list(swapped.state_dict()) == list(original.state_dict())
    batch, size = MODELS[name][1]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for m in (original, swapped)]
    for mode in ("train", "train", "train", "eval"):
        original.train(mode == "train")
        swapped.train(mode == "train")
        # each step from the original's state: small-batch BatchNorm (8 values per channel at the last
        # stage) amplifies float64 rounding differences ~30-100x a step, so unsynchronised models would
        # test that chaos, not the step
        swapped.load_state_dict(original.state_dict())
        optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))  # not sharing the momentum
        (out_a, grads_a), (out_b, grads_b) = (
            step(m, o, x, 3) for m, o in zip((original, swapped), optimizers, strict=True)
        )
        assert_close(f"{mode} output", out_b, out_a)
        for key in grads_a:
            assert (grads_a[key] is None) == (grads_b[key] is None), key
            if grads_a[key] is not None:
                assert_close(f"{mode} grad {key}", grads_b[key], grads_a[key])
        state_a = original.state_dict()
        for key, value in swapped.state_dict().items():  # parameters after the step, BatchNorm statistics
            assert_close(f"{mode} state {key}", value, state_a[key])
