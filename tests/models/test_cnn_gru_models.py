"""Reference CNN, ConvAutoencoder and GRULM: bmkernels and torch kernels build the same parameters
from one seed and compute the same outputs and gradients (float64, train and eval); state_dicts move
between them; each works under torch.compile."""

import pytest
import torch

from bmkernels.models import CNN, GRULM, ConvAutoencoder
from bmkernels.nn import GRU, Conv2d
from bmkernels.testing import float64_tolerance, magnitude, max_abs_diff


def images():
    return torch.rand(3, 1, 8, 8, dtype=torch.float64)


MODELS = {
    "cnn": (lambda k: CNN(10, 1, (8, 16), 1, kernels=k), images),
    "autoencoder": (lambda k: ConvAutoencoder(1, (8, 16), kernels=k), images),
    "gru": (lambda k: GRULM(50, 8, 12, 2, kernels=k), lambda: torch.randint(0, 50, (3, 7))),
}


def build(name, kernels):
    torch.manual_seed(0)
    return MODELS[name][0](kernels).double()


def output_and_grads(model, x):
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    params = {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters()}
    return out, dict(zip(params, torch.autograd.grad((out * g).sum(), list(params.values())), strict=True))


def assert_same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert max_abs_diff(out_b, out_a) <= float64_tolerance(magnitude(out_a))
    for name, g in grads_a.items():
        assert max_abs_diff(grads_b[name], g) <= float64_tolerance(magnitude(g)), name


@pytest.mark.parametrize("name", list(MODELS))
def test_bmkernels_and_torch_kernels_agree(name):
    ours, ref = build(name, "bmkernels"), build(name, "torch")
    assert any(isinstance(m, (Conv2d, GRU)) for m in ours.modules())
    assert not any(isinstance(m, (Conv2d, GRU)) for m in ref.modules())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
    x = MODELS[name][1]()
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        assert_same(output_and_grads(ref, x), output_and_grads(ours, x))
    ref.load_state_dict(ours.state_dict())  # running statistics after the train-mode step included


# inductor for two of them; the autoencoder (the same fused blocks as the CNN) through Dynamo and
# AOTAutograd only, which is where a model breaks under compile, at a fraction of inductor's time
@pytest.mark.parametrize("name,backend", [("cnn", "inductor"), ("autoencoder", "aot_eager"), ("gru", "inductor")])
def test_models_under_torch_compile(name, backend):
    model = build(name, "bmkernels").eval()
    x = MODELS[name][1]()
    torch._dynamo.reset()
    assert_same(output_and_grads(model, x), output_and_grads(torch.compile(model, backend=backend), x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernels must be one of"):
        CNN(kernels="cuda")
    with pytest.raises(ValueError, match="kernels must be one of"):
        GRULM(kernels="cudnn")
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvAutoencoder(1, (8, 16))(torch.rand(1, 1, 6, 6))
    with pytest.raises(ValueError, match=r"x must be \(batch, channels"):
        CNN()(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match=r"idx must be \(batch, length\)"):
        GRULM()(torch.zeros(5, dtype=torch.long))
