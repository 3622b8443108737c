"""Whole-model cases for attention integrations: tiny transformers models built from configs (random
weights) with attn_implementation="bmkernels" against the same model with "sdpa", and a timm ViT
swapped by swap_modules against the unswapped one.

- Llama-style decoder: hidden 256, 4 query / 2 kv heads (GQA), 2 layers, at L = 2048.
- BERT-style encoder: hidden 256, 4 heads, 2 layers, attention dropout 0.1 in training, at L = 1024.
Both at batch 2, forward (eval, no_grad) and a training step (forward + backward of a mean-square
loss), unpadded and with the last 25% of one sequence padded. timm vit_tiny_patch16_224, batch 4,
forward. Cases are skipped when transformers / timm are not installed.
"""

import copy

import torch

from bmkernels.bench import BMK, Case

FOOTNOTE = "models: GFLOP/s not computed (whole models); ratio = sdpa (or timm) time / bmkernels time."

# (name, builder, length, quick length)
TRANSFORMERS_MODELS = (("llama", 2048, 64), ("bert", 1024, 64))


def _build(kind, implementation):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
        return transformers.LlamaModel._from_config(cfg, attn_implementation=implementation)
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
    )
    return transformers.BertModel._from_config(cfg, attn_implementation=implementation)


def _transformers_case(kind, length, padded, train):
    import bmkernels.integrations.transformers  # noqa: F401 -- registers "bmkernels"

    models = {}

    def make_inputs():
        if not models:
            models["sdpa"] = _build(kind, "sdpa")
            models[BMK] = copy.deepcopy(models["sdpa"])
            models[BMK].set_attn_implementation("bmkernels")
        for m in models.values():
            m.train(train)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1000, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        if padded:
            mask[1, length - length // 4 :] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def contender(name):
        def run(inp):
            model = models[name]
            if not train:
                with torch.no_grad():
                    return model(**inp).last_hidden_state
            model.zero_grad(set_to_none=True)
            model(**inp).last_hidden_state.pow(2).mean().backward()

        return run

    mode = "train" if train else "fwd"
    return Case(
        op="models",
        name=f"{kind} {mode} L={length} {'padded' if padded else 'unpadded'}",
        make_inputs=make_inputs,
        contenders={BMK: contender(BMK), "sdpa": contender("sdpa")},
        flops=0.0,
        backward=train,
        params={"model": kind, "L": length, "B": 2, "padded": padded, "pass": mode},
    )


def _vit_case(batch, size):
    import timm

    import bmkernels

    models = {}

    def make_inputs():
        if not models:
            torch.manual_seed(0)
            models["timm"] = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size).eval()
            models[BMK] = copy.deepcopy(models["timm"])
            bmkernels.swap_modules(models[BMK])
        return {"x": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}

    def contender(name):
        def run(inp):
            with torch.no_grad():
                return models[name](inp["x"])

        return run

    return Case(
        op="models",
        name=f"timm vit_tiny fwd B={batch} {size}px",
        make_inputs=make_inputs,
        contenders={BMK: contender(BMK), "timm": contender("timm")},
        flops=0.0,
        params={"model": "vit_tiny_patch16_224", "B": batch, "image": size, "pass": "fwd"},
    )


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cases(preset="default"):
    """Whole-model cases of a preset: quick runs the same models at L = 64 (and a 32 px ViT);
    small, default and full all run the lengths of the module docstring."""
    out = []
    if _installed("transformers"):
        for kind, length, quick_length in TRANSFORMERS_MODELS:
            n = quick_length if preset == "quick" else length
            out += [_transformers_case(kind, n, padded, train) for train in (False, True) for padded in (False, True)]
    if _installed("timm"):
        out.append(_vit_case(2, 32) if preset == "quick" else _vit_case(4, 224))
    return out
