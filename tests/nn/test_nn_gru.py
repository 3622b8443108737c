"""bmkernels.nn.GRU and GRUCell (drop-ins for torch.nn.GRU / GRUCell): the same outputs, states and
gradients as torch's modules (float64 tight, float32 within the tolerance rule) for every
constructor option, PackedSequence in and out, unbatched input, optional h0; state_dict both ways."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

from bmkernels.nn import GRU, GRUCell
from bmkernels.testing import assert_within_rule, float64_tolerance, magnitude, max_abs_diff

I, H = 5, 7


def outputs_and_grads(module, x, h0, seed=3):
    """(output tensors, gradients of a random projection of them w.r.t. x, h0 and every parameter)."""
    leaves = [t for t in (x.data if hasattr(x, "batch_sizes") else x, h0) if t is not None and t.requires_grad]
    out = module(x) if h0 is None else module(x, h0)
    tensors = [o.data if hasattr(o, "batch_sizes") else o for o in (out if isinstance(out, tuple) else (out,))]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum() for t in tensors)
    grads = torch.autograd.grad(loss, [*leaves, *module.parameters()])
    return out, tensors, grads


def assert_same64(original, ours, x, h0=None):
    out_a, ta, ga = outputs_and_grads(original, x, h0)
    out_b, tb, gb = outputs_and_grads(ours, x, h0)
    for a, b in zip([*ta, *ga], [*tb, *gb], strict=True):
        assert max_abs_diff(b, a) <= float64_tolerance(magnitude(a))
    return out_a, out_b


def _twins(cls, torch_cls, *args, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    original = torch_cls(*args, dtype=dtype, **kwargs)
    return original, cls.from_torch(copy.deepcopy(original))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_layers=2, bidirectional=True),
        dict(batch_first=True, bias=False),
        dict(num_layers=3, batch_first=True, bidirectional=True, dropout=0.3),
    ],
)
def test_gru_matches_torch_float64(kwargs):
    original, ours = _twins(GRU, torch.nn.GRU, I, H, **kwargs)
    original.eval()
    ours.eval()
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn((3, 6, I) if kwargs.get("batch_first") else (6, 3, I), dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 3, H, dtype=torch.float64, requires_grad=True)
    assert_same64(original, ours, x, h0)
    assert_same64(original, ours, x)  # h0 omitted: zeros
    assert_same64(original, ours, x[0].detach().requires_grad_(), h0[:, 0].detach().requires_grad_())  # unbatched


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_gru_packed_sequence_in_and_out(enforce_sorted):
    original, ours = _twins(GRU, torch.nn.GRU, I, H, num_layers=2, bidirectional=True, batch_first=True)
    lengths = [6, 4, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    seqs = [torch.randn(n, I, dtype=torch.float64) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    packed.data.requires_grad_(True)
    h0 = torch.randn(4, len(lengths), H, dtype=torch.float64, requires_grad=True)
    (out_a, h_a), (out_b, h_b) = assert_same64(original, ours, packed, h0)
    assert torch.equal(out_b.batch_sizes, out_a.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out_a, name), getattr(out_b, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    padded = torch.zeros(len(lengths), max(lengths), I, dtype=torch.float64)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    repacked = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True, enforce_sorted=enforce_sorted)
    assert_same64(original, ours, repacked)


def test_gru_float32_within_rule_and_training_dropout():
    truth, _ = _twins(GRU, torch.nn.GRU, I, H, num_layers=2)
    same = copy.deepcopy(truth).float()
    ours = GRU.from_torch(copy.deepcopy(truth).float())
    x = torch.randn(9, 4, I, dtype=torch.float64, requires_grad=True)
    _, t_out, t_grads = outputs_and_grads(truth, x, None)
    _, s_out, s_grads = outputs_and_grads(same, x.detach().float().requires_grad_(), None)
    _, o_out, o_grads = outputs_and_grads(ours, x.detach().float().requires_grad_(), None)
    for i, (o, t, s) in enumerate(zip([*o_out, *o_grads], [*t_out, *t_grads], [*s_out, *s_grads], strict=True)):
        assert_within_rule(f"tensor {i}", o, t, s, torch.float32)
    dropped = GRU(I, H, 2, dropout=0.5).train()
    x = torch.randn(5, 2, I)
    torch.manual_seed(7)
    a = dropped(x)[0]
    torch.manual_seed(7)
    assert torch.equal(dropped(x)[0], a), "dropout reproducible under torch.manual_seed"
    assert not torch.allclose(dropped.eval()(x)[0], a), "dropout active in training"


def test_gru_state_dict_repr_flatten_and_twin():
    original, ours = _twins(GRU, torch.nn.GRU, I, H, num_layers=2, bidirectional=True)
    assert isinstance(ours, torch.nn.GRU) and list(ours.state_dict()) == list(original.state_dict())
    shared = GRU.from_torch(original)
    assert all(a is b for a, b in zip(shared.parameters(), original.parameters(), strict=True))
    ours.flatten_parameters()
    assert repr(ours) == "GRU(5, 7, num_layers=2, bidirectional=True, backend=cpu)"
    built = GRU(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    built.load_state_dict(original.state_dict())
    x = torch.randn(4, 2, I, dtype=torch.float64)
    assert max_abs_diff(built(x)[0], original(x)[0]) <= 1e-12
    twin = shared.to_torch()
    assert type(twin) is torch.nn.GRU and twin.weight_hh_l1_reverse is original.weight_hh_l1_reverse
    assert max_abs_diff(twin(x)[1], original(x)[1]) == 0
    with pytest.raises(ValueError, match="x must be"):
        ours(torch.randn(1, 2, 3, I, dtype=torch.float64))
    with pytest.raises(ValueError, match="h0 must have shape"):
        ours(x, torch.zeros(4, 3, H, dtype=torch.float64))


def test_gru_cell_matches_torch():
    for bias in (True, False):
        original, ours = _twins(GRUCell, torch.nn.GRUCell, I, H, bias=bias)
        x = torch.randn(3, I, dtype=torch.float64, requires_grad=True)
        h = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
        assert_same64(original, ours, x, h)
        assert_same64(original, ours, x)
        assert_same64(original, ours, x[0].detach().requires_grad_(), h[0].detach().requires_grad_())
    assert isinstance(ours, torch.nn.GRUCell) and list(ours.state_dict()) == ["weight_ih", "weight_hh"]
    assert repr(ours) == "GRUCell(5, 7, bias=False, backend=cpu)"
    assert type(ours.to_torch()) is torch.nn.GRUCell
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D"):
        ours(torch.randn(2, 3, I, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected hidden to be 2D"):
        ours(torch.randn(2, I, dtype=torch.float64), torch.randn(H, dtype=torch.float64))


def test_gru_under_torch_compile():
    """Dynamo refuses to trace any nn.GRU instance (so a subclass too) unless allow_rnn is set: by
    default the GRU runs eagerly inside a compiled model (a graph break); with allow_rnn it
    compiles with fullgraph=True."""
    original, ours = _twins(GRU, torch.nn.GRU, I, H, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, I, dtype=torch.float64)
    ref_out, ref_h = original(x)
    torch._dynamo.reset()
    out, h = torch.compile(ours)(x)
    assert max_abs_diff(out, ref_out) <= 1e-12 and max_abs_diff(h, ref_h) <= 1e-12
    with torch._dynamo.config.patch(allow_rnn=True):
        out, h = torch.compile(ours, fullgraph=True)(x)
    assert max_abs_diff(out, ref_out) <= 1e-12 and max_abs_diff(h, ref_h) <= 1e-12
