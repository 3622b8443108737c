"""swap_modules: put bmkernels drop-ins into an existing model, in place; unswap: take them out.

Which torch modules can be swapped is the registry bmkernels.nn.DROP_INS (op family -> drop-in
classes); a family's drop-in says itself when a module cannot be swapped (`swap_blocker`). Pattern
fusions (fuse=True) come from the FUSERS list: each fuser is a function (model, report) -> None
that rewrites the patterns it can prove equivalent in every train/eval mode and records them in
report.fused. The attention family has no pattern to fuse; the conv family's fusions (conv ->
BatchNorm2d -> activation runs in Sequentials, torchvision ResNet blocks with their residual add)
are described in bmkernels.nn.fused: they keep the module tree and state_dict keys and only change
the class (so the forward) of the container, to a subclass of its own class; unswap undoes them.

Models that have no nn.MultiheadAttention are reached too: a Hugging Face transformers model
(PreTrainedModel) gets attn_implementation="bmkernels" (bmkernels.integrations.transformers; noted
in the report, undone by unswap), and timm's Attention (when timm is imported) has a drop-in
(bmkernels.integrations.timm). Every other attention module -- a class whose name contains
"Attention" that nothing reached -- gets a `left` line saying what to do (sdpa_mode()).

The drop-ins hold the original Parameter objects, so weights, device, dtype, train/eval mode,
weight tying and an optimizer built before the swap all stay valid.

torch.nn.TransformerEncoder turns a padded batch into nested tensors in eval/no_grad when
`use_nested_tensor` is set (a torch inference fast path that bypasses the layers' attention
modules). The swap turns that flag off on encoders whose attention it swapped (noted in the
report; unswap restores it). The layers' own fast path is kept off by the drop-in itself (see
bmkernels.nn.attention).
"""

import sys
from dataclasses import dataclass, field

import torch

from bmkernels import nn as bmk_nn
from bmkernels.nn import fused as bmk_fused

FUSERS = [
    bmk_fused.fuse_sequences,
    bmk_fused.fuse_resnet_blocks,
    bmk_fused.fuse_inverted_residuals,
    bmk_fused.fuse_timm_blocks,
    bmk_fused.keep_channels_last,
]

_SAVED_NESTED_FLAG = "_bmkernels_saved_use_nested_tensor"
_SAVED_ATTN_IMPLEMENTATION = "_bmkernels_saved_attn_implementation"


@dataclass
class SwapReport:
    """swapped: (module name, torch class, bmkernels class); left: (module name, class, reason);
    fused: (module names, what they became); notes: other changes made to the model; other:
    {class name: count} of the leaf modules no bmkernels family covers (kept as they are); model:
    the swapped model (a new object only when the model passed in was itself a swapped module)."""

    model: object = None
    swapped: list = field(default_factory=list)
    left: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    other: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s), left {len(self.left)}, fused {len(self.fused)}"]
        lines += [f"  swapped {name or '<model>'}: {src} -> {dst}" for name, src, dst in self.swapped]
        lines += [f"  left    {name or '<model>'} ({cls}): {why}" for name, cls, why in self.left]
        lines += [f"  fused   {', '.join(names)} -> {what}" for names, what in self.fused]
        lines += [f"  note    {note}" for note in self.notes]
        if self.other:
            counts = ", ".join(f"{cls} x{n}" for cls, n in self.other.items())
            lines.append(f"  other   {counts} (no bmkernels kernel for these module types; kept)")
        return "\n".join(lines)


def _drop_ins():
    """bmkernels.nn.DROP_INS, plus the timm drop-in when timm is imported (a timm model implies it is;
    bmkernels never imports timm itself)."""
    drop_ins = dict(bmk_nn.DROP_INS)
    if "timm" in sys.modules:
        from bmkernels.integrations import timm as bmk_timm

        drop_ins["attention"] = (*drop_ins["attention"], bmk_timm.Attention)
    return drop_ins


def _drop_in_classes():
    return tuple(drop_in for drop_ins in _drop_ins().values() for drop_in in drop_ins)


def _is_transformers_model(model):
    if "transformers" not in sys.modules:
        return False
    from bmkernels.integrations import transformers as bmk_transformers

    return bmk_transformers.is_model(model)


def _switch_transformers_attention(model, report):
    """A transformers model: attn_implementation="bmkernels" (registered first). True if it took."""
    from bmkernels.integrations import transformers as bmk_transformers

    previous = model.config._attn_implementation
    if previous == bmk_transformers.NAME:
        return True
    try:
        model.set_attn_implementation(bmk_transformers.NAME)
    except (ValueError, TypeError, NotImplementedError) as e:
        report.notes.append(f"<model>: attn_implementation={bmk_transformers.NAME!r} refused by transformers: {e}")
        return False
    setattr(model, _SAVED_ATTN_IMPLEMENTATION, previous)
    report.notes.append(
        f"<model>: transformers attn_implementation {previous!r} -> {bmk_transformers.NAME!r} (every attention "
        "layer runs bmkernels; unswap restores it)"
    )
    return True


def _unreached_attention(model, report, reached):
    """A `left` line for each outermost attention module no drop-in or switch reached."""
    covered = set()
    already_left = {name for name, _, _ in report.left}
    for name, module in model.named_modules():
        if (
            name in covered
            or name in already_left
            or isinstance(module, _drop_in_classes() + (torch.nn.MultiheadAttention,))
        ):
            covered.update(".".join(filter(None, (name, child))) for child, _ in module.named_modules())
            continue
        cls = type(module)
        if "Attention" not in cls.__name__ or reached:
            continue
        covered.update(".".join(filter(None, (name, child))) for child, _ in module.named_modules())
        if cls.__module__.startswith("transformers."):
            why = (
                "a transformers attention layer: load the model with attn_implementation='bmkernels' (import "
                "bmkernels.integrations.transformers) or call swap_modules on the PreTrainedModel itself"
            )
        else:
            why = (
                "computes attention itself (no nn.MultiheadAttention inside to replace); if it calls "
                "F.scaled_dot_product_attention, run it inside bmkernels.sdpa_mode()"
            )
        report.left.append((name, cls.__name__, why))


def _qualified(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _replace(model, old, new):
    """Put `new` wherever `old` sits in `model` (a module shared by several parents is replaced in each)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)


def swap_modules(
    model: torch.nn.Module, *, attention: bool = True, conv: bool = True, gru: bool = True, fuse: bool = True
) -> SwapReport:
    """Replace the torch.nn modules of the selected op families in `model` (in place) with their
    bmkernels drop-ins and, with fuse=True, apply the registered fusions. Families without a
    drop-in in this build (see bmkernels.nn.DROP_INS) are not touched. Returns a SwapReport."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"swap_modules: model must be a torch.nn.Module; got {type(model).__name__}")
    enabled = {"attention": attention, "conv": conv, "gru": gru}
    by_torch_class = {
        drop_in.torch_class: (family, drop_in) for family, drop_ins in _drop_ins().items() for drop_in in drop_ins
    }
    report = SwapReport(model=model)
    reached = attention and _is_transformers_model(model) and _switch_transformers_attention(model, report)
    drop_in_classes = _drop_in_classes()
    for name, module in list(model.named_modules()):
        if isinstance(module, drop_in_classes):
            continue
        match = next(((f, d) for cls, (f, d) in by_torch_class.items() if isinstance(module, cls)), None)
        if match is None:
            continue
        family, drop_in = match
        if not enabled[family]:
            report.left.append((name, type(module).__name__, f"{family}=False"))
            continue
        reason = drop_in.swap_blocker(module)
        if reason is not None:
            report.left.append((name, type(module).__name__, reason))
            continue
        source = _qualified(type(module))  # before from_torch: a drop-in may switch the module's class in place
        new = drop_in.from_torch(module)
        if name:
            _replace(model, module, new)
        else:
            report.model = new
        report.swapped.append((name, source, _qualified(drop_in)))
    if attention:
        _unreached_attention(report.model, report, reached)
    _keep_encoders_on_layers(report.model, report)
    if fuse:
        for fuser in FUSERS:
            fuser(report.model, report)
    report.other = _uncovered_leaves(report.model, by_torch_class)
    return report


def _uncovered_leaves(model, by_torch_class):
    """{class name: count} of leaf modules outside every drop-in and of no registered torch class."""
    counts = {}
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, _drop_in_classes() + tuple(by_torch_class)):
            inside.update(".".join(filter(None, (name, child))) for child, _ in module.named_modules())
        elif name not in inside and not any(True for _ in module.children()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def _keep_encoders_on_layers(model, report):
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.TransformerEncoder)
            and getattr(module, "use_nested_tensor", False)
            and any(isinstance(m, bmk_nn.MultiheadAttention) for m in module.modules())
        ):
            setattr(module, _SAVED_NESTED_FLAG, True)
            module.use_nested_tensor = False
            report.notes.append(
                f"{name or '<model>'}: TransformerEncoder.use_nested_tensor turned off (its "
                "nested-tensor inference fast path would bypass the swapped attention)"
            )


def unswap(model: torch.nn.Module) -> torch.nn.Module:
    """Put the torch.nn originals back (sharing the same parameters) in place; returns the model
    (a new object only if `model` itself is a drop-in). Undoes the swap's notes too."""
    drop_in_classes = _drop_in_classes()
    for module in model.modules():
        bmk_fused.unfuse(module)
    if isinstance(model, drop_in_classes):
        return model.to_torch()
    for module in list(model.modules()):
        if isinstance(module, drop_in_classes):
            _replace(model, module, module.to_torch())
    for module in model.modules():
        if getattr(module, _SAVED_NESTED_FLAG, False):
            module.use_nested_tensor = True
            delattr(module, _SAVED_NESTED_FLAG)
    previous = getattr(model, _SAVED_ATTN_IMPLEMENTATION, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, _SAVED_ATTN_IMPLEMENTATION)
    return model


to_torch = unswap
