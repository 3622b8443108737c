"""bmkernels.gru_cell and bmkernels.gru: argument checks, backend choice, and the fake kernels of the
torch.ops.bmkernels.gru_* operators. Their autograd is registered in C++ (csrc/autograd/gru.cpp), so a
cell stepped from Python costs one dispatch with or without grad.

Memory: for backward the forward saves a workspace of 5 values per unit and step (the gates r, z, n,
the hidden part of the candidate hn = W_hn h + b_hn, and the previous state) in float32 (float64 for
float64 inputs), (D, T, B, 5H) per layer; nothing is recomputed. Inference (no input requiring grad,
or grad disabled) saves nothing.
"""

import os
from collections.abc import Sequence

import torch

from bmkernels import _backend, _extension
from bmkernels.ops._common import acc_dtype, bind, check_tensor, forward_op, same_device_or_fail, table, tensor_names
from bmkernels.reference import gru as reference

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# backends whose kernels take float16 (the CPU ones do not), and those that do not take float64
_FLOAT16_BACKENDS = ("cuda", "cuda_emulated", "triton")
_NO_FLOAT64_BACKENDS = ("cuda", "cuda_emulated")


def _check_input(op, x):
    check_tensor(op, "x", x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float32, float64, bfloat16 or float16; got {x.dtype}")


def _check_backend_dtype(op, dtype, backend):
    """float16 only where the backend's kernels take it, float64 not on the CUDA kernels."""
    if dtype == torch.float16 and backend not in _FLOAT16_BACKENDS:
        raise TypeError(
            f"{op}: float16 runs on backend 'cuda', 'cuda_emulated' or 'triton'; backend '{backend}' takes "
            "float32, float64 or bfloat16"
        )
    if dtype == torch.float64 and backend in _NO_FLOAT64_BACKENDS:
        raise TypeError(f"{op}: backend '{backend}' takes float16, bfloat16 or float32; got {dtype}")


def _check_shape(op, name, t, shape):
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}; got {tuple(t.shape)}")


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Backend decisions for CPU tensors and no backend= argument, per BMK_BACKEND value: the environment is read
# on every call, the rest of the decision (validation, extension check) once, so a GRUCell stepped from
# Python does not pay it on every step.
_cpu_backend_cache = {}


def _choose(op, device, backend):
    if backend is None and device.type == "cpu":
        key = (op, os.environ.get("BMK_BACKEND"))
        name = _cpu_backend_cache.get(key)
        if name is None:
            name = _cpu_backend_cache[key] = _backend.choose(op, device, None)
        return name
    return _backend.choose(op, device, backend)


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor | None,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One GRU step, as torch.nn.GRUCell: x (B, I) or (I,), h (B, H) or (H,) (None: zeros),
    w_ih (3H, I), w_hh (3H, H), b_ih and b_hh (3H,) or None. Returns h' in x's dtype.
    float32, float64, bfloat16 (bfloat16 computes in float32); float16 on backend "cuda", "cuda_emulated",
    "triton"; float64 not on the first two."""
    try:
        hot = (
            backend is None
            and h is not None
            and (b_ih is None) == (b_hh is None)
            and x.is_cpu
            and h.is_cpu
            and w_ih.is_cpu
            and w_hh.is_cpu
            and (b_ih is None or b_ih.is_cpu and b_hh.is_cpu)
            and x.dim() == 2
            and not torch.compiler.is_compiling()
            and _choose("gru", x.device, None) == "cpu"
        )
    except AttributeError:  # an argument is not a tensor: the checks below say which
        hot = False
    if hot:
        # hot path (a GRUCell stepped from Python): the kernel checks shapes and dtypes itself
        save = torch.is_grad_enabled() and (
            x.requires_grad
            or h.requires_grad
            or w_ih.requires_grad
            or w_hh.requires_grad
            or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad))
        )
        return _extension._C.gru_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, save)
    op = "gru_cell"
    _check_input(op, x)
    dtype, device = x.dtype, x.device
    check_tensor(op, "w_ih", w_ih, x)
    check_tensor(op, "w_hh", w_hh, x)
    if w_hh.dim() != 2 or w_hh.shape[0] != 3 * w_hh.shape[1] or w_hh.shape[1] == 0:
        raise ValueError(f"{op}: w_hh must have shape (3H, H) with H >= 1; got {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if x.dim() not in (1, 2):
        raise ValueError(f"{op}: x must be (B, I) or unbatched (I,); got shape {tuple(x.shape)}")
    _check_shape(op, "w_ih", w_ih, (3 * hidden, x.shape[-1]))
    unbatched = x.dim() == 1
    batch_shape = (hidden,) if unbatched else (x.shape[0], hidden)
    if h is None:
        h = x.new_zeros(batch_shape)
    else:
        check_tensor(op, "h", h, x)
        _check_shape(op, "h", h, batch_shape)
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{op}: pass both b_ih and b_hh or neither")
    if b_ih is not None:
        check_tensor(op, "b_ih", b_ih, x)
        check_tensor(op, "b_hh", b_hh, x)
        _check_shape(op, "b_ih", b_ih, (3 * hidden,))
        _check_shape(op, "b_hh", b_hh, (3 * hidden,))
    name = _choose("gru", device, backend)
    _check_backend_dtype(op, dtype, name)
    if name == "reference":
        return reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    if unbatched:
        x, h = x.unsqueeze(0), h.unsqueeze(0)
    h_next, _ = forward_op("gru_cell_fwd", name)(
        x, h, w_ih, w_hh, b_ih, b_hh, _needs_grad(x, h, w_ih, w_hh, b_ih, b_hh)
    )
    return h_next.squeeze(0) if unbatched else h_next


def _check_lengths(lengths, batch, steps, device):
    op = "gru"
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be a torch.Tensor of int64; got {type(lengths).__name__}")
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{op}: lengths must be int64 of shape (B,) = ({batch},); got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if lengths.device.type != "cpu" and lengths.device != device:
        raise ValueError(f"{op}: lengths must be on the CPU or the input's device {device}; got {lengths.device}")
    if not torch.compiler.is_compiling() and batch > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > steps:
            raise ValueError(f"{op}: lengths must be in [1, T] = [1, {steps}]; got values from {low} to {high}")
    return lengths.to(device)


def gru(
    x: torch.Tensor,
    h0: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    dropout: float,
    training: bool,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer GRU over a sequence, as torch.nn.GRU: `bmkernels.gru(x, h0, gru._flat_weights,
    num_layers=..., bidirectional=..., batch_first=..., dropout=..., training=...)` equals `gru(x, h0)`.

    x: (T, B, I), (B, T, I) if batch_first, or unbatched (T, I). h0: (L*D, B, H) ((L*D, H) unbatched)
    or None for zeros. weights: per layer, per direction: w_ih (3H, I_l), w_hh (3H, H), then b_ih, b_hh
    (3H,) when there is bias. dropout: on each layer's output but the last when training (mask from
    torch's default generator: reproducible under torch.manual_seed). lengths: optional int64 (B,)
    per-sequence lengths of a padded batch (as a PackedSequence holds them, any order): steps at or past
    a sequence's end leave its state unchanged and give output 0, so h_n is each sequence's last state.
    Returns (output (T, B, D*H) in x's layout, h_n (L*D, B, H)). float32, float64, bfloat16 (bfloat16
    computes in float32).
    """
    op = "gru"
    _check_input(op, x)
    dtype, device = x.dtype, x.device
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise ValueError(f"{op}: num_layers must be an int >= 1; got {num_layers!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout <= 1.0):
        raise ValueError(f"{op}: dropout must be a number in [0, 1]; got {dropout!r}")
    directions = 2 if bidirectional else 1
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{op}: x must be (T, B, I), (B, T, I) with batch_first, or unbatched (T, I); got shape {tuple(x.shape)}"
        )
    unbatched = x.dim() == 2
    seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
    steps, batch, input_size = seq.shape
    if steps == 0:
        raise ValueError(f"{op}: the sequence length T must be >= 1; got x of shape {tuple(x.shape)}")
    if not isinstance(weights, (list, tuple)) or len(weights) not in (
        2 * num_layers * directions,
        4 * num_layers * directions,
    ):
        got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(
            f"{op}: weights must be a list of {2 * num_layers * directions} (no bias) or "
            f"{4 * num_layers * directions} tensors for num_layers={num_layers}, "
            f"bidirectional={bool(bidirectional)} (torch.nn.GRU._flat_weights order); got {got}"
        )
    per_direction = len(weights) // (num_layers * directions)
    for i, w in enumerate(weights):
        check_tensor(op, f"weights[{i}]", w, x)
    if weights[1].dim() != 2 or weights[1].shape[0] != 3 * weights[1].shape[1] or weights[1].shape[1] == 0:
        raise ValueError(
            f"{op}: weights[1] (w_hh of layer 0) must have shape (3H, H) with H >= 1; got {tuple(weights[1].shape)}"
        )
    hidden = weights[1].shape[1]
    for i, w in enumerate(weights):
        layer, kind = i // (directions * per_direction), i % per_direction
        layer_input = input_size if layer == 0 else directions * hidden
        expected = ((3 * hidden, layer_input), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,))[kind]
        _check_shape(op, f"weights[{i}] ({('w_ih', 'w_hh', 'b_ih', 'b_hh')[kind]} of layer {layer})", w, expected)
    state_shape = (num_layers * directions, batch, hidden)
    if h0 is None:
        h0 = seq.new_zeros(state_shape)
    else:
        check_tensor(op, "h0", h0, x)
        _check_shape(op, "h0", h0, state_shape[:1] + state_shape[2:] if unbatched else state_shape)
        if unbatched:
            h0 = h0.unsqueeze(1)
    if lengths is not None:
        lengths = _check_lengths(lengths, batch, steps, device)

    name = _choose(op, device, backend)
    _check_backend_dtype(op, dtype, name)
    if name == "reference":
        out, h_n = reference.gru(
            seq,
            h0,
            weights,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=False,
            dropout=dropout,
            training=training,
            lengths=lengths,
        )
    else:
        out, h_n = _gru_layers(
            seq,
            h0,
            weights,
            num_layers,
            directions,
            dropout if training else 0.0,
            lengths,
            forward_op("gru_layer_fwd", name),
        )
    if unbatched:
        return out.squeeze(1), h_n.squeeze(1)
    return (out.transpose(0, 1) if batch_first else out), h_n


def _stacked(tensors):
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _gru_layers(x, h0, weights, num_layers, directions, dropout, lengths, layer_fwd):
    """The layers through layer_fwd (gru_layer_fwd's signature; both directions of a layer in one call)."""
    per_direction = len(weights) // (num_layers * directions)
    h_n = []
    for layer in range(num_layers):
        first = layer * directions * per_direction
        w_ih, w_hh, *biases = (
            _stacked(weights[first + k : first + directions * per_direction : per_direction])
            for k in range(per_direction)
        )
        b_ih, b_hh = biases if biases else (None, None)
        h_layer = h0[layer * directions : (layer + 1) * directions]
        save = _needs_grad(x, h_layer, w_ih, w_hh, b_ih, b_hh)
        x, h, _ = layer_fwd(x, h_layer, w_ih, w_hh, b_ih, b_hh, lengths, save)
        h_n.append(h)
        if dropout > 0 and layer < num_layers - 1:
            x = reference.layer_dropout(x, dropout)
    return x, torch.cat(h_n)


# the schemas of gru_cell_fwd, gru_layer_fwd and gru_layer_bwd (csrc/registration.cpp), in order
GRU_CELL_FWD = table("x:Tensor h:Tensor w_ih:Tensor w_hh:Tensor b_ih:Tensor? b_hh:Tensor? save_workspace:bool")
GRU_LAYER_FWD = table(
    "x:Tensor h0:Tensor w_ih:Tensor w_hh:Tensor b_ih:Tensor? b_hh:Tensor? lengths:Tensor? save_workspace:bool"
)
GRU_LAYER_BWD = table(
    "grad_out:Tensor grad_h_n:Tensor x:Tensor h0:Tensor w_ih:Tensor w_hh:Tensor lengths:Tensor? "
    "workspace:Tensor has_bias:bool"
)


def _device_tensors(table, a):
    # lengths may stay on the CPU (the kernels copy them): not part of the device checks
    return (a[n] for n in tensor_names(table) if n != "lengths")


def _fake_cell_fwd(*args, **kwargs):
    a = bind(GRU_CELL_FWD, args, kwargs)
    same_device_or_fail("gru", *_device_tensors(GRU_CELL_FWD, a))
    x = a["x"]
    batch, hidden = a["h"].shape
    ws_rows = batch if a["save_workspace"] else 0
    return x.new_empty(batch, hidden), x.new_empty(ws_rows, 5 * hidden, dtype=acc_dtype(x.dtype))


def _fake_layer_fwd(*args, **kwargs):
    a = bind(GRU_LAYER_FWD, args, kwargs)
    same_device_or_fail("gru", *_device_tensors(GRU_LAYER_FWD, a))
    x, h0 = a["x"], a["h0"]
    steps, batch, _ = x.shape
    directions, _, hidden = h0.shape
    ws_shape = (directions, steps, batch, 5 * hidden) if a["save_workspace"] else (0,)
    return (
        x.new_empty(steps, batch, directions * hidden),
        h0.new_empty(directions, batch, hidden),
        x.new_empty(ws_shape, dtype=acc_dtype(x.dtype)),
    )


def _fake_layer_bwd(*args, **kwargs):
    a = bind(GRU_LAYER_BWD, args, kwargs)
    same_device_or_fail("gru", *_device_tensors(GRU_LAYER_BWD, a))
    x, h0, w_ih, w_hh = a["x"], a["h0"], a["w_ih"], a["w_hh"]
    bias_shape = (w_ih.shape[0], w_ih.shape[1]) if a["has_bias"] else (0,)
    return (
        x.new_empty(x.shape),
        h0.new_empty(h0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(bias_shape),
        w_hh.new_empty(bias_shape),
    )


if _extension.loaded():
    for infix in ("", "emulated_"):
        torch.library.register_fake(f"bmkernels::gru_cell_{infix}fwd")(_fake_cell_fwd)
        torch.library.register_fake(f"bmkernels::gru_layer_{infix}fwd")(_fake_layer_fwd)
        torch.library.register_fake(f"bmkernels::gru_layer_{infix}bwd")(_fake_layer_bwd)
