"""Drop-in modules: the torch.nn classes running bmkernels kernels (same constructor, forward,
state_dict; subclasses of the torch class).

DROP_INS maps an op family (the swap_modules flag that selects it) to its drop-in classes. Each
drop-in class names its `torch_class` and provides `swap_blocker(module)` (a reason it cannot
replace that torch module, or None), `from_torch(module)` and `to_torch()`; bmkernels.swap_modules
needs nothing else. A new family adds its import and one entry here.
"""

from bmkernels.nn.attention import MultiheadAttention

DROP_INS = {
    "attention": (MultiheadAttention,),
}

__all__ = ["DROP_INS", "MultiheadAttention"]
