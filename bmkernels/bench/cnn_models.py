"""Whole-CNN cases (`bmkernels bench --models`): torchvision resnet18 / resnet50 / mobilenet_v2 and
timm resnet18 / efficientnet_b0 / convnext_atto (random weights, 1000 classes), swapped by
swap_modules against the unswapped model in eager and the same model object under
`torch.compile` (default mode), float32, in eval (forward under no_grad) and one SGD training step
(zero_grad, forward, cross-entropy, backward, SGD with momentum), NCHW and channels_last (for
channels_last the model is converted with `model.to(memory_format=torch.channels_last)` and so is
the input, as PyTorch's channels_last guide does).

Batch 4 at 128x128 for every model, ResNet-18 also at batch 8, 160x160. Models are built (and the
compiled contender compiled, two calls) in make_inputs, outside the timing. Cases whose library is
not installed are left out; the compiled contender is skipped where torch.compile cannot run.
"""

import copy

import torch
import torch.nn.functional as F

from bmkernels.bench import BMK, Case

FOOTNOTE = (
    "cnn_models: GFLOP/s not computed (whole models); vs eager = unswapped eager time / swapped time, "
    "vs compiled = torch.compile(unswapped model) time / swapped time."
)

# (label, library, builder name, batch, image size)
MODELS = (
    ("resnet18", "torchvision", "resnet18", 4, 128),
    ("resnet18", "torchvision", "resnet18", 8, 160),
    ("resnet50", "torchvision", "resnet50", 4, 128),
    ("mobilenet_v2", "torchvision", "mobilenet_v2", 4, 128),
    ("timm resnet18", "timm", "resnet18", 4, 128),
    ("timm efficientnet_b0", "timm", "efficientnet_b0", 4, 128),
    ("timm convnext_atto", "timm", "convnext_atto", 4, 128),
)
QUICK_MODELS = (("resnet18", "torchvision", "resnet18", 2, 32),)
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def build(library, builder):
    """The model with seeded random weights (no hub downloads)."""
    torch.manual_seed(0)
    if library == "timm":
        import timm

        return timm.create_model(builder, pretrained=False)
    import torchvision

    return getattr(torchvision.models, builder)(weights=None)


def _step(model, optimizer, train):
    def run(inp):
        if not train:
            with torch.no_grad():
                return model(inp["x"])
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inp["x"]), inp["labels"]).backward()
        optimizer.step()

    return run


def _model_case(spec, layout, train, compiled):
    import bmkernels

    label, library, builder, batch, size = spec
    fmt = LAYOUTS[layout]
    runs = {}

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
        inp = {"x": x, "labels": torch.randint(0, 1000, (batch,), generator=g)}
        if not runs:
            eager = build(library, builder).to(memory_format=fmt).train(train)
            swapped = copy.deepcopy(eager)
            bmkernels.swap_modules(swapped)
            models = {BMK: swapped, "eager": eager}
            if compiled:
                models["compiled"] = torch.compile(eager)  # the same model object, compiled
            for name, model in models.items():
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                runs[name] = _step(model, optimizer, train)
            for run in runs.values():  # compiles, and picks the conv engines, outside the timing
                run(inp)
                run(inp)
        return inp

    def contender(name):
        return lambda inp: runs[name](inp)

    names = [BMK, "eager"] + (["compiled"] if compiled else [])
    mode = "train" if train else "eval"
    return Case(
        op="cnn_models",
        name=f"{label} {mode} B={batch} {size}px {layout}",
        make_inputs=make_inputs,
        contenders={n: contender(n) for n in names},
        flops=0.0,
        backward=train,  # the timing loop runs the step with grad enabled
        params={"model": label, "B": batch, "image": size, "pass": mode, "layout": layout},
    )


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cases(preset="default"):
    """quick: ResNet-18 at batch 2, 32x32, eval and train, both layouts, without the compiled
    contender (seconds); every other preset: the models of the module docstring."""
    specs = QUICK_MODELS if preset == "quick" else MODELS
    compiled = preset != "quick" and hasattr(torch, "compile")
    return [
        _model_case(spec, layout, train, compiled)
        for spec in specs
        if _installed(spec[1])
        for train in (False, True)
        for layout in LAYOUTS
    ]
