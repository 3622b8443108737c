"""bmkernels.nn.Conv2d (drop-in for torch.nn.Conv2d) and the fused conv blocks (bmkernels.nn.fused):
the same outputs, gradients, state_dict and BatchNorm statistics as torch's modules, in train and eval."""

import copy

import pytest
import torch

import bmkernels
from bmkernels.nn import Conv2d, ConvBNAct, conv_bn_act
from bmkernels.nn import conv as nn_conv
from bmkernels.nn import fused as nn_fused
from bmkernels.testing import assert_within_rule, float64_tolerance, magnitude, max_abs_diff


def forward_backward(model, x, seed=3, **kwargs):
    """output and the gradients (input and every parameter) of sum(output * g)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    params = {name.removeprefix("_orig_mod."): p for name, p in model.named_parameters()}  # compiled too
    grads = torch.autograd.grad((out * g).sum(), [x, *params.values()])
    return out, dict(zip(["input", *params], grads, strict=True))


def assert_same64(model_a, model_b, x, **kwargs):
    out_a, grads_a = forward_backward(model_a, x, **kwargs)
    out_b, grads_b = forward_backward(model_b, x, **kwargs)
    assert max_abs_diff(out_b, out_a) <= float64_tolerance(magnitude(out_a)), "output"
    for name in grads_a:
        assert max_abs_diff(grads_b[name], grads_a[name]) <= float64_tolerance(magnitude(grads_a[name])), name


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=1),
        dict(padding=2, padding_mode="reflect"),
        dict(padding=(1, 2), padding_mode="replicate"),
        dict(padding=1, padding_mode="circular", stride=2),
        dict(padding="same", padding_mode="reflect", dilation=2),
        dict(padding="same"),
        dict(padding="valid", bias=False, groups=3),
        dict(padding=1, stride=(2, 1), groups=3),
    ],
)
def test_conv2d_matches_torch_float64(kwargs):
    torch.manual_seed(0)
    original = torch.nn.Conv2d(6, 9, 3, dtype=torch.float64, **kwargs)
    swapped = Conv2d.from_torch(copy.deepcopy(original))
    built = Conv2d(6, 9, 3, dtype=torch.float64, **kwargs)
    built.load_state_dict(original.state_dict())
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    assert_same64(original, swapped, x)
    assert_same64(original, built, x)
    assert_same64(original, built, x[0])  # unbatched


def test_conv2d_float32_within_rule_and_channels_last():
    torch.manual_seed(0)
    truth = torch.nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    same = copy.deepcopy(truth).float()
    ours = Conv2d.from_torch(copy.deepcopy(truth).float())
    x = torch.randn(3, 8, 17, 15, dtype=torch.float64)
    t_out, t_grads = forward_backward(truth, x)
    s_out, s_grads = forward_backward(same, x.float())
    for layout in (torch.contiguous_format, torch.channels_last):
        o_out, o_grads = forward_backward(ours, x.float().contiguous(memory_format=layout))
        assert_within_rule("output", o_out, t_out, s_out, torch.float32)
        for name in t_grads:
            assert_within_rule(f"grad {name}", o_grads[name], t_grads[name], s_grads[name], torch.float32)


def test_conv2d_activation_state_dict_repr_and_twin():
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, padding=1, dtype=torch.float64, activation="silu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    plain = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    plain.load_state_dict(conv.state_dict())
    assert torch.allclose(conv(x), torch.nn.functional.silu(plain(x)), atol=1e-12)
    assert isinstance(conv, torch.nn.Conv2d) and list(conv.state_dict()) == ["weight", "bias"]
    assert repr(conv) == (
        "Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), activation='silu', backend=cpu)"
    )
    with pytest.raises(ValueError, match="has no torch.nn.Conv2d twin"):
        conv.to_torch()
    swapped = Conv2d.from_torch(plain)
    twin = swapped.to_torch()
    assert type(twin) is torch.nn.Conv2d and twin.weight is plain.weight and twin.bias is plain.bias
    with pytest.raises(ValueError, match="activation must be one of"):
        Conv2d(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="padding_mode"):
        Conv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="x must be 4-D"):
        conv(torch.randn(3, dtype=torch.float64))


def _conv_bn(dtype=torch.float64, bias=False, affine=True, momentum=0.1):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=bias, dtype=dtype)
    bn = torch.nn.BatchNorm2d(7, affine=affine, momentum=momentum, dtype=dtype)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


class _Unfused(torch.nn.Module):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x, residual=None):
        out = self.bn(self.conv(x))
        return self.act(out if residual is None else out + residual)


class _Fused(_Unfused):
    def forward(self, x, residual=None):
        return conv_bn_act(self.conv, self.bn, x, nn_fused.kernel_activation(self.act), residual, self.act)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "act,bias,affine,momentum", [(torch.nn.ReLU(), False, True, 0.1), (torch.nn.SiLU(), True, False, None)]
)
def test_conv_bn_act_equals_torch_in_train_and_eval(training, act, bias, affine, momentum):
    """Outputs, every gradient and the BatchNorm statistics after the step (train mode: batch
    statistics, running averages updated, momentum=None included; eval: the folded path)."""
    conv, bn = _conv_bn(bias=bias, affine=affine, momentum=momentum)
    original = _Unfused(conv, bn, act).train(training)
    fused = _Fused(Conv2d.from_torch(copy.deepcopy(conv)), copy.deepcopy(bn), act).train(training)
    x = torch.randn(4, 5, 9, 8, dtype=torch.float64)
    residual = torch.randn(4, 7, 5, 4, dtype=torch.float64)
    for kwargs in ({}, {"residual": residual}):
        assert_same64(original, fused, x, **kwargs)
    for name, buffer in original.bn.named_buffers():
        assert torch.allclose(fused.bn.get_buffer(name), buffer, rtol=0, atol=1e-12), name
    with torch.no_grad():
        assert max_abs_diff(fused(x), original(x)) <= 1e-12


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "act,size,fused_kernel",
    [
        (torch.nn.ReLU(), (4, 64, 64), True),  # 4 * 32 * 32 values per channel: the fused kernel
        (torch.nn.ReLU6(), (4, 64, 64), True),
        (torch.nn.ReLU(), (4, 9, 8), None),  # 4 * 5 * 4 values per channel: torch's BatchNorm in NCHW only
        (torch.nn.SiLU(), (4, 64, 64), False),  # an exp per element: torch's BatchNorm + SiLU
        (torch.nn.GELU(), (4, 64, 64), False),
    ],
    ids=["relu-big", "relu6-big", "relu-small", "silu", "gelu"],
)
def test_training_batch_norm_kernel_only_where_it_wins(act, size, fused_kernel, channels_last, monkeypatch):
    """In training, conv_bn_act runs bmkernels.batch_norm_act where it is the faster (ReLU-like activations,
    channels_last or >= 1024 values per channel) and torch's BatchNorm + activation elsewhere; both equal
    torch's modules (outputs, gradients, running statistics), with and without the residual."""
    if fused_kernel is None:
        fused_kernel = channels_last
    calls = []
    real = nn_fused.batch_norm_act
    monkeypatch.setattr(nn_fused, "batch_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv, bn = _conv_bn()
    original = _Unfused(conv, bn, act).train()
    fused = _Fused(Conv2d.from_torch(copy.deepcopy(conv)), copy.deepcopy(bn), act).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(size[0], 5, *size[1:], dtype=torch.float64).contiguous(memory_format=fmt)
    out_shape = (size[0], 7, (size[1] + 1) // 2, (size[2] + 1) // 2)
    residual = torch.randn(out_shape, dtype=torch.float64).contiguous(memory_format=fmt)
    for kwargs in ({}, {"residual": residual}):
        assert_same64(original, fused, x, **kwargs)
    assert bool(calls) == fused_kernel
    for name, buffer in original.bn.named_buffers():
        assert torch.allclose(fused.bn.get_buffer(name), buffer, rtol=0, atol=1e-12), name


@pytest.mark.parametrize(
    "channels_last,engine", [(False, "auto"), (False, "bmkernels"), (True, "auto")], ids=["nchw", "nchw-own", "cl"]
)
def test_swapped_resnet_block_three_sgd_steps(channels_last, engine, monkeypatch):
    """A swapped torchvision BasicBlock with a downsample (the fused Conv-BN-ReLU training path, with and
    without the residual) against torch's in float64: the output, every parameter's gradient and the
    BatchNorm statistics (running mean, unbiased running variance, num_batches_tracked) after each of
    three SGD steps with momentum."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("BMK_CONV_ENGINE", engine)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 1, stride=2, bias=False), torch.nn.BatchNorm2d(24))
    original = torchvision.models.resnet.BasicBlock(16, 24, stride=2, downsample=downsample)
    original = original.double().to(memory_format=fmt).train()
    swapped = copy.deepcopy(original)
    report = bmkernels.swap_modules(swapped)
    assert report.fused, "the block's conv/bn/relu runs were fused"
    models = (original, swapped)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for step in range(3):
        x = torch.randn(2, 16, 7, 9, dtype=torch.float64).contiguous(memory_format=fmt)
        outs = []
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            out = model(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            optimizer.step()
            outs.append(out)
        assert outs[1].is_contiguous(memory_format=fmt)
        assert max_abs_diff(outs[1], outs[0]) <= float64_tolerance(magnitude(outs[0])), f"output, step {step}"
        for (name, p_a), p_b in zip(original.named_parameters(), swapped.parameters(), strict=True):
            tol = float64_tolerance(magnitude(p_a.grad))
            assert max_abs_diff(p_b.grad, p_a.grad) <= tol, f"{name}.grad, step {step}"
            assert max_abs_diff(p_b, p_a) <= float64_tolerance(magnitude(p_a)), f"{name}, step {step}"
        for (name, b_a), b_b in zip(original.named_buffers(), swapped.buffers(), strict=True):
            if b_a.is_floating_point():
                assert max_abs_diff(b_b, b_a) <= float64_tolerance(magnitude(b_a)), f"{name}, step {step}"
            else:
                assert torch.equal(b_b, b_a), f"{name}, step {step}"


def test_eval_no_grad_uses_fold_batchnorm_and_refolds_after_updates(monkeypatch):
    conv, bn = _conv_bn()
    original = _Unfused(conv, bn, torch.nn.ReLU()).eval()
    fused = _Fused(Conv2d.from_torch(copy.deepcopy(conv)), copy.deepcopy(bn), torch.nn.ReLU()).eval()
    folds = []
    real = nn_conv.fold_batchnorm
    monkeypatch.setattr(nn_conv, "fold_batchnorm", lambda *a: folds.append(1) or real(*a))
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            assert max_abs_diff(fused(x), original(x)) <= 1e-12
        assert len(folds) == 1, "folded once while nothing changed"
        for model in (original, fused):  # an optimizer-like in-place update and a statistics update
            model.conv.weight.mul_(1.5)
            model.bn.running_var.add_(0.25)
        assert max_abs_diff(fused(x), original(x)) <= 1e-12 and len(folds) == 2
        x_cl = x.contiguous(memory_format=torch.channels_last)  # the cached weight follows x's layout
        assert max_abs_diff(fused(x_cl), original(x_cl)) <= 1e-12 and len(folds) == 3
        weight = fused.conv.__dict__["_bmkernels_eval_cache"][1]
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _sgd_step(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def _load_state_dict(assign):
    def mutate(model):
        state = {k: v * 1.25 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=assign)

    return mutate


def _statistics_from_a_training_step(model):
    model.train()
    model(torch.randn(4, 5, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    model.eval()


def _set_data(model):
    model.conv.weight.data = model.conv.weight.data * 2  # same Parameter object, new storage
    model.bn.running_mean.data = model.bn.running_mean.data + 0.5


def _new_parameter(model):
    model.conv.weight = torch.nn.Parameter(model.conv.weight.detach() * -1)


_MUTATIONS = {
    "sgd step": _sgd_step,
    "load_state_dict": _load_state_dict(assign=False),
    "load_state_dict assign": _load_state_dict(assign=True),
    "running stats from train forward": _statistics_from_a_training_step,
    "running_var in place": lambda m: m.bn.running_var.mul_(3),
    "bn affine in place": lambda m: (m.bn.weight.add_(0.5), m.bn.bias.sub_(0.25)),
    ".data assignment": _set_data,
    "new Parameter": _new_parameter,
    "bn eps": lambda m: setattr(m.bn, "eps", 0.5),
    "dtype float32": lambda m: m.float(),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mutation", list(_MUTATIONS))
def test_eval_cache_is_invalidated_by(mutation, layout):
    """Each way a weight or statistic changes between eval calls: the cached folded weight would give
    the old output (each mutation changes it), the fresh fold gives torch's."""
    conv, bn = _conv_bn()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    original = _Unfused(conv, bn, torch.nn.ReLU()).eval()
    fused = _Fused(Conv2d.from_torch(copy.deepcopy(conv)), copy.deepcopy(bn), torch.nn.ReLU()).eval()
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        before = fused(x)  # fills the cache
        assert max_abs_diff(before, original(x)) <= 1e-12
    for model in (original, fused):
        with torch.no_grad():
            _MUTATIONS[mutation](model)
    x = x.to(original.conv.weight.dtype)
    with torch.no_grad():
        want, got = original(x), fused(x)
    if mutation != "dtype float32":  # a stale float64 weight shows in the output's dtype instead
        assert max_abs_diff(want.double(), before) > 1e-3, "the mutation changes the output"
    assert got.dtype == want.dtype
    assert max_abs_diff(got.double(), want.double()) <= (1e-12 if want.dtype == torch.float64 else 1e-5)
    fused.train()  # train mode never reads the eval cache: batch statistics, as torch
    original.train()
    assert max_abs_diff(fused(x).double(), original(x).double()) <= (1e-12 if want.dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("mutation", ["sgd step", "load_state_dict", ".data assignment", "new Parameter"])
def test_conv2d_channels_last_weight_cache_is_invalidated_by(mutation):
    """Conv2d alone (no BatchNorm) caches a channels_last copy of its weight for channels_last input."""
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, dtype=torch.float64)
    ours = Conv2d.from_torch(copy.deepcopy(conv))
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = ours(x)
        assert "_bmkernels_eval_cache" in ours.__dict__, "the cached path is the one under test"
    holder = torch.nn.Module()
    for c in (conv, ours):
        holder.conv = c
        with torch.no_grad():
            if mutation == ".data assignment":
                c.weight.data = c.weight.data * 2
            else:
                _MUTATIONS[mutation](holder)
    with torch.no_grad():
        want, got = conv(x), ours(x)
    assert max_abs_diff(want, before) > 1e-3
    assert max_abs_diff(got, want) <= 1e-12


def test_conv_bn_act_float32_within_rule():
    conv, bn = _conv_bn()
    truth = _Unfused(conv, bn, torch.nn.SiLU()).eval()
    same = copy.deepcopy(truth).float()
    ours = _Fused(Conv2d.from_torch(copy.deepcopy(conv).float()), copy.deepcopy(bn).float(), torch.nn.SiLU()).eval()
    x = torch.randn(3, 5, 16, 16, dtype=torch.float64)
    t_out, t_grads = forward_backward(truth, x)
    s_out, s_grads = forward_backward(same, x.float())
    o_out, o_grads = forward_backward(ours, x.float())
    assert_within_rule("output", o_out, t_out, s_out, torch.float32)
    for name in t_grads:
        assert_within_rule(f"grad {name}", o_grads[name], t_grads[name], s_grads[name], torch.float32)


def test_conv_bn_act_module_kernels_and_compile():
    torch.manual_seed(0)
    ours = ConvBNAct(4, 6, 3, activation="relu", dtype=torch.float64)
    torch.manual_seed(0)
    ref = ConvBNAct(4, 6, 3, activation="relu", kernels="torch", dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    residual = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    compiled = torch.compile(ours, fullgraph=True)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        assert_same64(ref, ours, x, residual=residual)
        assert_same64(ref, compiled, x, residual=residual)
    with pytest.raises(ValueError, match="kernels must be"):
        ConvBNAct(4, 6, kernels="cuda")
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvBNAct(4, 6, activation="tanh")


def test_fold_matches_bmkernels_fold_batchnorm():
    conv, bn = _conv_bn(bias=True)
    bn.eval()
    weight, bias = nn_fused._folded_with_grad(conv, bn)
    reference = bmkernels.fold_batchnorm(conv, bn)
    assert torch.equal(weight, reference.weight) and torch.equal(bias, reference.bias)


def test_conv2d_sees_a_bmk_backend_change_after_caching(monkeypatch):
    """The per-module backend cache reads BMK_BACKEND on every call: a change takes effect at once."""
    ours = Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    calls = []
    real = nn_conv.conv2d
    monkeypatch.setattr(nn_conv, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = torch.nn.functional.conv2d(x, ours.weight, ours.bias, padding=1)
    assert max_abs_diff(ours(x), want) <= 1e-12 and not calls, "the CPU operator, directly"
    monkeypatch.setenv("BMK_BACKEND", "reference")
    assert max_abs_diff(ours(x), want) <= 1e-12 and calls, "through bmkernels.conv2d's backend choice"
    monkeypatch.delenv("BMK_BACKEND")
    calls.clear()
    ours(x)
    assert not calls
