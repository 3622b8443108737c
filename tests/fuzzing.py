"""Property-based fuzzing of the ops (hypothesis): the case strategies, the input layouts and the checks
shared by tests/ops/test_fuzz.py (CPU kernels), tests/triton/test_fuzz_triton.py (Triton interpreter)
and tests/cuda/test_fuzz_cuda_emulated.py (the SIMT emulator).

A case is a plain dict (shapes, options, layouts, seeds), so a failure prints a readable, replayable
example; `build_*` turns it into tensors. Every float input is drawn in some layout: contiguous, dims
permuted in storage, strided (every other element, a slice of a larger tensor), a view at an offset
into larger storage, expanded (a stride-0 dim) or channels_last. Each case runs forward and every
gradient against the float64 reference under the tolerance rule (bmkernels.testing).

Profiles (BMK_FUZZ_PROFILE): "ci" (default) is derandomized, a fixed set of examples and no example
database, so CI sees the same cases every run; "long" (`make fuzz`) draws new random cases, many more,
and keeps failures in .hypothesis/ to replay them first next time.
"""

import math
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import bmkernels
from bmkernels.reference import attention as reference_attention
from bmkernels.reference import conv as reference_conv
from bmkernels.reference import gru as reference_gru
from bmkernels.testing import check_against_reference

PROFILE = os.environ.get("BMK_FUZZ_PROFILE", "ci")
# the env-only fixtures (backend/ISA/engine variables) hold for every example of a test
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=_QUIET
)
settings.register_profile("long", deadline=None, print_blob=True, suppress_health_check=_QUIET)
if PROFILE not in ("ci", "long"):
    raise ValueError(f"BMK_FUZZ_PROFILE must be 'ci' or 'long'; got {PROFILE!r}")
LONG_FACTOR = 25  # the long profile runs this many times the CI profile's examples


def fuzz_settings(ci_examples):
    """The active profile with `ci_examples` examples in CI (LONG_FACTOR times as many in the long one)."""
    examples = ci_examples if PROFILE == "ci" else ci_examples * LONG_FACTOR
    return settings(settings.get_profile(PROFILE), max_examples=examples)


# ------------------------------------------------------------------------------------------------
# Layouts: the same values (drawn contiguously) in storage of another shape or order.

LAYOUTS = ("contiguous", "permuted", "strided", "offset", "expanded")


def arrange(fill, shape, layout):
    """A tensor of `shape` whose values come from fill(storage_shape) (a contiguous tensor), viewed in
    `layout`. "expanded" broadcasts the first dim of size > 1 from one slice (stride 0)."""
    shape = tuple(shape)
    n = len(shape)
    if n == 0 or layout == "contiguous":
        return fill(shape)
    if layout == "permuted":  # storage in reversed dim order
        return fill(shape[::-1]).permute(*reversed(range(n)))
    if layout == "strided" and n == 1:  # every other element, from the second
        return fill((2 * shape[0] + 1,))[1::2]
    if layout == "strided":  # every other element of the last dim, and a slice past the first row
        return fill((shape[0] + 1, *shape[1:-1], 2 * shape[-1]))[1:, ..., ::2]
    if layout == "offset":  # a contiguous view at an offset into larger storage
        numel = math.prod(shape)
        return fill((numel + 9,))[5 : 5 + numel].view(shape)
    if layout == "expanded":
        dim = next((i for i, s in enumerate(shape) if s > 1), None)
        if dim is None:
            return fill(shape)
        one = shape[:dim] + (1,) + shape[dim + 1 :]
        return fill(one).expand(shape)
    if layout == "channels_last":
        return fill(shape).contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def randn(shape, dtype, layout, seed, scale=1.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = arrange(lambda s: (torch.randn(s, generator=gen) * scale).to(dtype), shape, layout)
    return t.requires_grad_(requires_grad)


def bernoulli(shape, p, layout, seed):
    """A bool tensor, True with probability p."""
    gen = torch.Generator().manual_seed(seed)
    return arrange(lambda s: torch.rand(s, generator=gen) < p, shape, layout)


def _broadcast_shape(draw, full, keep_last=False):
    """A shape that broadcasts to `full`: some leading dims dropped, some dims 1 (the last kept if asked)."""
    drop = draw(st.integers(0, len(full) - 1))
    shape = [s if draw(st.booleans()) else 1 for s in full[drop:]]
    return tuple(shape[:-1] + [full[-1]] if keep_last else shape)


seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)


# ------------------------------------------------------------------------------------------------
# Attention


@st.composite
def attention_cases(draw, dtypes, max_len=40, max_dim=72, max_kv_heads=3):
    """q/k/v shapes (GQA, Lq != Lk, Dv != D) and every option of bmkernels.attention (dropout 0)."""
    batch, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, max_kv_heads)), draw(st.integers(1, 3))
    q_len, head_dim = draw(st.integers(1, max_len)), draw(st.integers(1, max_dim))
    k_len = draw(st.one_of(st.just(q_len), st.integers(1, max_len)))
    # Dv up to 4 D + 8: the backward's delta = rowsum(dO * O) rounds at |dO| |O| Dv, which the rule's floor
    # (relative to each gradient's own magnitude) does not cover when Dv >> D (D = 1, Dv = 71: 1.1x the bound)
    v_dim = draw(st.one_of(st.just(head_dim), st.integers(1, min(max_dim, 4 * head_dim + 8))))
    q_heads = kv_heads * group
    grid = (batch, q_heads, q_len, k_len)
    bound = st.integers(-1, max_len + 1)
    case = {
        "dtype": draw(st.sampled_from(dtypes)),
        "q": (batch, q_heads, q_len, head_dim),
        "k": (batch, kv_heads, k_len, head_dim),
        "v": (batch, kv_heads, k_len, v_dim),
        "layouts": draw(st.tuples(layouts, layouts, layouts)),
        "seed": draw(seeds),
        "options": {
            "causal": draw(st.booleans()),
            "causal_alignment": draw(st.sampled_from(("top_left", "bottom_right"))),
            "window": draw(st.one_of(st.none(), st.tuples(bound, bound))),
            "softcap": draw(st.one_of(st.none(), st.floats(0.5, 20.0))),
            "scale": draw(st.one_of(st.none(), st.floats(0.05, 1.5))),
            "return_lse": draw(st.booleans()),
        },
        "bias": draw(st.one_of(st.none(), st.tuples(st.just(_broadcast_shape(draw, grid)), layouts))),
        # a bias that gets a gradient varies along the keys: one constant along them cancels in the softmax, so
        # its exact gradient is 0 and the kernel's is reduction noise, which no rule relative to the truth bounds
        "grad_bias": draw(st.one_of(st.none(), st.tuples(st.just(_broadcast_shape(draw, grid, True)), layouts))),
        "mask": draw(
            st.one_of(st.none(), st.tuples(st.just(_broadcast_shape(draw, grid)), st.floats(0.2, 0.95), layouts))
        ),
        "key_padding": draw(st.sampled_from((None, "right", "left", "random"))),
        "alibi": draw(st.sampled_from((None, (q_heads,), (batch, q_heads)))),
    }
    return case


def _key_padding_mask(kind, batch, k_len, gen):
    """(B, Lk) bool, True = padding: a run at the end ("right") or start ("left"), or any pattern."""
    if kind == "random":
        return torch.rand(batch, k_len, generator=gen) < 0.3
    real = torch.randint(0, k_len + 1, (batch,), generator=gen)
    positions = torch.arange(k_len)
    if kind == "right":
        return positions[None, :] >= real[:, None]
    return positions[None, :] < (k_len - real)[:, None]


def build_attention(case):
    """The case's keyword tensors for bmkernels.attention / the reference, and its options."""
    dtype, seed = case["dtype"], case["seed"]
    inputs = {
        name: randn(case[name], dtype, layout, seed + i, requires_grad=True)
        for i, (name, layout) in enumerate(zip("qkv", case["layouts"], strict=True))
    }
    batch, k_len = case["q"][0], case["k"][2]
    gen = torch.Generator().manual_seed(seed + 10)
    if case["bias"] is not None or case["grad_bias"] is not None:
        shape, layout, *_ = case["grad_bias"] or case["bias"]
        inputs["bias"] = randn(shape, dtype, layout, seed + 11, requires_grad=case["grad_bias"] is not None)
    if case["mask"] is not None:
        shape, p, layout = case["mask"]
        inputs["mask"] = bernoulli(shape, p, layout, seed + 12)
    if case["key_padding"] is not None:
        inputs["key_padding_mask"] = _key_padding_mask(case["key_padding"], batch, k_len, gen)
    if case["alibi"] is not None:
        inputs["alibi_slopes"] = torch.rand(case["alibi"], generator=gen)
    return inputs, dict(case["options"])


def check_attention(case, backend):
    inputs, options = build_attention(case)
    check_against_reference(
        lambda q, k, v, **t: bmkernels.attention(q, k, v, backend=backend, **options, **t),
        lambda q, k, v, **t: reference_attention.attention(q, k, v, **options, **t),
        inputs,
        case["dtype"],
    )


# ------------------------------------------------------------------------------------------------
# conv2d

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "leaky_relu", ("leaky_relu", 0.2))


@st.composite
def conv_cases(draw, dtypes, max_size=12, max_channels=4):
    """x/weight shapes (groups, unbatched), stride/padding/dilation, bias, activation, residual, layouts
    (NCHW, channels_last and the general ones) and which inputs need a gradient."""
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, max_channels)), groups * draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if stride == (1, 1) and draw(st.booleans()):
        padding = draw(st.sampled_from(("same", "valid")))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pads = (0, 0) if padding in ("same", "valid") else padding
    # the smallest input with a positive output size ("same" pads as much as it needs)
    least = [
        max(1, d * (k - 1) + 1 - (0 if padding == "same" else 2 * p))
        for k, d, p in zip(kernel, dilation, pads, strict=True)
    ]
    size = tuple(draw(st.integers(lo, max(lo, max_size))) for lo in least)
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    x_layouts = layouts if batch is None else st.sampled_from(LAYOUTS + ("channels_last",))
    return {
        "dtype": draw(st.sampled_from(dtypes)),
        "x": ((batch,) if batch else ()) + (c_in, *size),
        "weight": (c_out, c_in // groups, *kernel),
        "layouts": {
            "x": draw(x_layouts),
            "weight": draw(st.sampled_from(LAYOUTS + ("channels_last",))),
            "bias": draw(layouts),
            "residual": draw(x_layouts),
        },
        "grads": draw(st.sampled_from(("all", "x", "weight", "none", "some"))),
        "bias": draw(st.booleans()),
        "residual": draw(st.booleans()),
        "seed": draw(seeds),
        "options": {
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
            "activation": draw(st.sampled_from(ACTIVATIONS)),
        },
    }


def build_conv(case):
    dtype, seed, lay, opts = case["dtype"], case["seed"], case["layouts"], case["options"]
    grads = {"all": "xwbr", "x": "x", "weight": "w", "none": "", "some": "xbr"}[case["grads"]]
    inputs = {
        "x": randn(case["x"], dtype, lay["x"], seed, requires_grad="x" in grads),
        "weight": randn(case["weight"], dtype, lay["weight"], seed + 1, 0.5, requires_grad="w" in grads),
    }
    if case["bias"]:
        inputs["bias"] = randn(case["weight"][:1], dtype, lay["bias"], seed + 2, requires_grad="b" in grads)
    if case["residual"]:
        probe = reference_conv.conv2d(inputs["x"].detach().float(), inputs["weight"].detach().float(), **opts)
        inputs["residual"] = randn(probe.shape, dtype, lay["residual"], seed + 3, requires_grad="r" in grads)
    return inputs, opts


def check_conv(case, backend):
    inputs, options = build_conv(case)
    check_against_reference(
        lambda x, weight, **t: bmkernels.conv2d(x, weight, backend=backend, **options, **t),
        lambda x, weight, **t: reference_conv.conv2d(x, weight, **options, **t),
        inputs,
        case["dtype"],
    )


# ------------------------------------------------------------------------------------------------
# GRU: the cell and the multi-layer sequence op


@st.composite
def gru_cell_cases(draw, dtypes, max_size=12, max_batch=40):
    """One step: batch (None = unbatched; up to 40 reaches the cell's GEMM path), sizes, bias, h or none."""
    return {
        "dtype": draw(st.sampled_from(dtypes)),
        "batch": draw(st.one_of(st.none(), st.integers(1, 4), st.integers(5, max_batch))),
        "input_size": draw(st.integers(1, max_size)),
        "hidden": draw(st.integers(1, max_size)),
        "bias": draw(st.booleans()),
        "h": draw(st.booleans()),
        "layouts": draw(st.lists(layouts, min_size=6, max_size=6)),
        "seed": draw(seeds),
    }


def _gru_weight_shapes(input_size, hidden, num_layers, directions, bias):
    shapes = []
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else directions * hidden
        for _ in range(directions):
            shapes += [(3 * hidden, layer_input), (3 * hidden, hidden)] + ([(3 * hidden,)] * 2 if bias else [])
    return shapes


def build_gru_cell(case):
    dtype, seed, lay, hidden = case["dtype"], case["seed"], case["layouts"], case["hidden"]
    lead = (case["batch"],) if case["batch"] else ()
    bound = hidden**-0.5
    inputs = {"x": randn((*lead, case["input_size"]), dtype, lay[0], seed, requires_grad=True)}
    inputs["h"] = randn((*lead, hidden), dtype, lay[1], seed + 1, requires_grad=True) if case["h"] else None
    for i, shape in enumerate(_gru_weight_shapes(case["input_size"], hidden, 1, 1, case["bias"])):
        name = ("w_ih", "w_hh", "b_ih", "b_hh")[i]
        inputs[name] = randn(shape, dtype, lay[2 + i], seed + 2 + i, bound, requires_grad=True)
    return inputs


def _reference_cell(x, h, w_hh, **weights):
    """reference.gru_cell with h = None as zeros (as bmkernels.gru_cell takes it)."""
    h = x.new_zeros((*x.shape[:-1], w_hh.shape[1])) if h is None else h
    return reference_gru.gru_cell(x, h, w_hh=w_hh, **weights)


def check_gru_cell(case, backend):
    check_against_reference(
        lambda **t: bmkernels.gru_cell(**t, backend=backend),
        _reference_cell,
        build_gru_cell(case),
        case["dtype"],
    )


@st.composite
def gru_cases(draw, dtypes, max_steps=6, max_size=10, max_layers=3):
    """Sequence shapes (unbatched, batch_first), layers, directions, bias, h0 or none, lengths."""
    steps, batch = draw(st.integers(1, max_steps)), draw(st.one_of(st.none(), st.integers(1, 3)))
    return {
        "dtype": draw(st.sampled_from(dtypes)),
        "steps": steps,
        "batch": batch,
        "input_size": draw(st.integers(1, max_size)),
        "hidden": draw(st.integers(1, max_size)),
        "num_layers": draw(st.integers(1, max_layers)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "h0": draw(st.booleans()),
        "lengths": None
        if batch is None
        else draw(st.one_of(st.none(), st.lists(st.integers(1, steps), min_size=batch, max_size=batch))),
        "training": draw(st.booleans()),
        "layouts": draw(st.tuples(layouts, layouts, layouts)),
        "seed": draw(seeds),
    }


def build_gru(case):
    """Keyword tensors x, h0, w0 ... (weights in torch.nn.GRU._flat_weights order) and the options."""
    dtype, seed, hidden = case["dtype"], case["seed"], case["hidden"]
    directions = 2 if case["bidirectional"] else 1
    steps, batch = case["steps"], case["batch"]
    if batch is None:
        x_shape, h_shape = (steps, case["input_size"]), (case["num_layers"] * directions, hidden)
    else:
        x_shape = (batch, steps, case["input_size"]) if case["batch_first"] else (steps, batch, case["input_size"])
        h_shape = (case["num_layers"] * directions, batch, hidden)
    x_layout, h_layout, w_layout = case["layouts"]
    inputs = {"x": randn(x_shape, dtype, x_layout, seed, requires_grad=True)}
    inputs["h0"] = randn(h_shape, dtype, h_layout, seed + 1, requires_grad=True) if case["h0"] else None
    shapes = _gru_weight_shapes(case["input_size"], hidden, case["num_layers"], directions, case["bias"])
    for i, shape in enumerate(shapes):
        inputs[f"w{i}"] = randn(shape, dtype, w_layout, seed + 2 + i, hidden**-0.5, requires_grad=True)
    options = {
        "num_layers": case["num_layers"],
        "bidirectional": case["bidirectional"],
        "batch_first": case["batch_first"],
        "dropout": 0.0,
        "training": case["training"],
        "lengths": None if case["lengths"] is None else torch.tensor(case["lengths"], dtype=torch.int64),
    }
    return inputs, options


def _gru_as_one(impl, options, n_weights, **backend):
    """(x, h0, w0, ...) -> output and h_n flattened into one tensor (the rule checks it, and every
    gradient, at once)."""

    def fn(x, h0, **weights):
        out, h_n = impl(x, h0, [weights[f"w{i}"] for i in range(n_weights)], **options, **backend)
        return torch.cat((out.reshape(-1), h_n.reshape(-1)))

    return fn


def check_gru(case, backend):
    inputs, options = build_gru(case)
    n = len(inputs) - 2
    check_against_reference(
        _gru_as_one(bmkernels.gru, options, n, backend=backend),
        _gru_as_one(reference_gru.gru, options, n),
        inputs,
        case["dtype"],
    )
