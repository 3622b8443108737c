"""bmkernels.nn.GRUCell and bmkernels.nn.GRU: torch.nn.GRUCell / torch.nn.GRU running bmkernels.gru_cell
and bmkernels.gru.

Subclasses of the torch classes: same constructor, forward, return values, parameters and
state_dict. GRU takes (T, B, I) / (B, T, I) with batch_first / unbatched (T, I) tensors or a
PackedSequence (returned packed, with the input's batch sizes and sort order), h0 optional,
num_layers, bidirectional, dropout between layers in training (mask from torch's default generator,
not the mask torch's cuDNN/native GRU would draw), bias=False. flatten_parameters() is accepted and
does nothing: the kernels read the parameters where they are.

torch.compile: Dynamo refuses to trace any nn.GRU instance (this subclass too) unless
torch._dynamo.config.allow_rnn is set; by default a compiled model runs its GRU eagerly (a graph
break, still the bmkernels kernel), with allow_rnn=True it compiles with fullgraph=True.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from bmkernels import _backend
from bmkernels.nn._convert import rebuild
from bmkernels.ops.gru import _DTYPES, gru, gru_cell


def _blocker(cls, module):
    if type(module) is not cls.torch_class:
        return (
            f"{type(module).__name__} subclasses nn.{cls.torch_class.__name__}; its forward may differ from "
            "torch's, so it is kept"
        )
    dtype = module.weight_ih_l0.dtype if cls is GRU else module.weight_ih.dtype
    if dtype not in _DTYPES:
        return f"dtype {dtype} (bmkernels' GRU runs float32, float64 and bfloat16)"
    try:
        _backend.choose("gru", module.weight_hh_l0.device if cls is GRU else module.weight_hh.device)
    except RuntimeError as e:
        return str(e)
    return None


def _backend_in_use(module, weight):
    try:
        return _backend.choose("gru", weight.device, module.backend)
    except RuntimeError as e:
        return f"unavailable ({e})"


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell with the step in bmkernels.gru_cell. Extra keyword-only argument: backend."""

    family = "gru"
    torch_class = torch.nn.GRUCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        _backend.requested(backend)
        self.backend = backend

    def _ctor_kwargs(self):
        return dict(input_size=self.input_size, hidden_size=self.hidden_size, bias=self.bias)

    @classmethod
    def swap_blocker(cls, module: torch.nn.Module) -> str | None:
        """Why `module` (a torch.nn.GRUCell) cannot be swapped, or None."""
        return _blocker(cls, module)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, backend: str | None = None) -> GRUCell:
        """A bmkernels GRUCell sharing `module`'s parameters, device, dtype, mode and hooks."""
        return rebuild(module, cls, cls._ctor_kwargs(module), backend=backend)

    def to_torch(self) -> torch.nn.Module:
        return rebuild(self, torch.nn.GRUCell, self._ctor_kwargs())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={_backend_in_use(self, self.weight_hh)}"

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() != input.dim():
            raise ValueError(f"GRUCell: Expected hidden to be {input.dim()}D (as the input), got {hx.dim()}D instead")
        return gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, backend=self.backend)


class GRU(torch.nn.GRU):
    """torch.nn.GRU with the layers in bmkernels.gru (see the module docstring). Extra keyword-only
    argument: backend."""

    family = "gru"
    torch_class = torch.nn.GRU

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _backend.requested(backend)
        self.backend = backend

    def _ctor_kwargs(self):
        return dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
        )

    @classmethod
    def swap_blocker(cls, module: torch.nn.Module) -> str | None:
        """Why `module` (a torch.nn.GRU) cannot be swapped, or None."""
        return _blocker(cls, module)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, backend: str | None = None) -> GRU:
        """A bmkernels GRU sharing `module`'s parameters, device, dtype, mode and hooks."""
        new = rebuild(module, cls, cls._ctor_kwargs(module), backend=backend)
        new._init_flat_weights()  # the flat list still names the meta tensors of the constructor
        return new

    def to_torch(self) -> torch.nn.Module:
        twin = rebuild(self, torch.nn.GRU, self._ctor_kwargs())
        twin._init_flat_weights()
        return twin

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; nothing to do (the kernels read the parameters in place)."""

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={_backend_in_use(self, self.weight_hh_l0)}"

    def forward(
        self, input: torch.Tensor | PackedSequence, hx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        options = dict(
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            dropout=float(self.dropout),
            training=self.training,
            backend=self.backend,
        )
        if not isinstance(input, PackedSequence):
            return gru(input, hx, self._flat_weights, batch_first=self.batch_first, **options)
        # padded in the caller's batch order (as hx and h_n are), then packed back with the input's order
        padded, lengths = pad_packed_sequence(input)
        out, h_n = gru(padded, hx, self._flat_weights, batch_first=False, lengths=lengths, **options)
        order = input.sorted_indices
        if order is not None:
            out, lengths = out.index_select(1, order), lengths[order.cpu()]
        packed = pack_padded_sequence(out, lengths, enforce_sorted=True)
        return PackedSequence(packed.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), h_n
