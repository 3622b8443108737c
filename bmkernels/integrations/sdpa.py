"""sdpa_mode: every torch.nn.functional.scaled_dot_product_attention call inside it runs in bmkernels.

A torch.overrides.TorchFunctionMode sees each torch function called in its scope; it hands SDPA
calls to bmkernels.scaled_dot_product_attention and every other call (and the SDPA calls bmkernels
cannot serve) back to torch unchanged. It works on code that calls SDPA directly (diffusers, timm,
custom modules) without touching the model. Calls it cannot serve: an input on a device no compiled
bmkernels backend covers, a backend's dtype limit (e.g. float64 on Triton), or an argument form
bmkernels' checks refuse; those run torch's own SDPA (which then raises if the call is wrong), and
the mode counts both kinds.
"""

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bmkernels import _backend
from bmkernels.ops import attention as ops_attention

_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class sdpa_mode(TorchFunctionMode):  # noqa: N801 -- used like a function: `with bmkernels.sdpa_mode():`
    """Context manager and decorator: F.scaled_dot_product_attention calls in its scope run in
    bmkernels (backend: as in bmkernels.attention; None = auto). After the scope, `served` and
    `fell_through` count the calls bmkernels ran and those left to torch.

        with bmkernels.sdpa_mode() as mode:
            out = model(x)
        print(mode.served, mode.fell_through)
    """

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        _backend.requested(backend)
        self.backend = backend
        self.served = 0
        self.fell_through = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = dict(zip(_SDPA_NAMES, args, strict=False), **kwargs)
            if self._can_serve(call):
                try:
                    out = ops_attention.scaled_dot_product_attention(**call, backend=self.backend)
                except (TypeError, ValueError):
                    pass  # an input form bmkernels refuses (its checks run before any work): torch decides
                else:
                    self.served += 1
                    return out
            self.fell_through += 1
        return func(*args, **kwargs)

    def _can_serve(self, call):
        q = call.get("query")
        if not isinstance(q, torch.Tensor) or set(call) - set(_SDPA_NAMES):
            return False
        try:
            name = _backend.choose("attention", q.device, self.backend)
        except RuntimeError:
            return False  # no compiled backend for this device: torch runs it
        return not (name == "triton" and q.dtype == torch.float64)

    def __call__(self, fn):
        """As a decorator: fn runs inside a fresh sdpa_mode with this one's backend."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with sdpa_mode(self.backend):
                return fn(*args, **kwargs)

        return wrapped
