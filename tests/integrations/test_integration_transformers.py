"""bmkernels.integrations.transformers on tiny config-built models (random weights, no hub): Llama
(GQA), GPT-2, BERT, Gemma-2 (softcap + sliding window), gpt-oss (attention sinks + sliding window), ViT.
Outputs and every parameter gradient against the unpatched model under the tolerance rule (truth: the
unpatched model in float64; torch's error: the unpatched model in float32), on unpadded, right-padded
and left-padded batches; generate() with a KV cache gives the same tokens; the profiler sees bmkernels'
op and no aten SDPA; padding reaches the kernel as key ranges, not as a mask; swap_modules / unswap
switch the implementation."""

import copy
import sys

import pytest
import torch

from bmkernels.testing import assert_within_rule

transformers = pytest.importorskip("transformers")
bmk_transformers = pytest.importorskip("bmkernels.integrations.transformers")

import bmkernels  # noqa: E402

VOCAB = 97


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM, cfg, "sdpa"


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel, cfg, "sdpa"


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.BertModel, cfg, "sdpa"


def gemma2():
    # every other layer slides over 6 keys; logits capped at 30 (transformers' sdpa refuses softcap: eager)
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        attn_logit_softcapping=5.0,
        max_position_embeddings=128,
    )
    return transformers.Gemma2ForCausalLM, cfg, "eager"


def gpt_oss():
    # sinks (s_aux) in every layer, layers alternating sliding (6 keys) and full; 4 experts, top 2, run
    # by the eager loop (torch's grouped_mm refuses float64)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=6,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        experts_implementation="eager",
    )
    return transformers.GptOssForCausalLM, cfg, "eager"


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "gemma2": gemma2, "gpt_oss": gpt_oss}
# The float64 truth of an eager model: transformers' eager masks with finfo(float64).min, which its
# float32 softmax turns into -inf, so a fully masked (padding) row gives NaN in float64 only, and the
# NaN spreads through the next layer. This variant clips the mask to float32's range: eager's float32
# behaviour, computed in float64.
TRUTH_EAGER = "eager_float64_truth"


def _eager_with_finite_mask(module, query, key, value, attention_mask, **kwargs):
    """The module's own model's eager attention (gpt-oss's adds the sinks), on the clipped mask."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if attention_mask is not None and attention_mask.dtype == torch.float64:
        attention_mask = attention_mask.clamp(min=torch.finfo(torch.float32).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


transformers.AttentionInterface.register(TRUTH_EAGER, _eager_with_finite_mask)
transformers.AttentionMaskInterface.register(TRUTH_EAGER, transformers.masking_utils.eager_mask)
DECODERS = ("llama", "gpt2", "gemma2", "gpt_oss")


def build(name, implementation=None, dtype=torch.float32):
    cls, cfg, baseline = MODELS[name]()
    if baseline == "eager" and dtype == torch.float64 and implementation is None:
        implementation = TRUTH_EAGER
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=implementation or baseline, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():  # sinks of a trained model's size (the init's are near 0)
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            module.sinks.data.copy_(torch.randn(module.sinks.shape, generator=gen) * 2)
    return model.eval()


def batch(padding, length=19):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "right":
        mask[1, length - 6 :] = 0
    elif padding == "left":
        mask[1, :6] = 0
    return ids, mask


def output_of(result):
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def run(model, ids, mask, grads):
    """Output at the real tokens and, with grads, every parameter's gradient of a loss over them."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        out = output_of(model(input_ids=ids, attention_mask=mask))
    valid = out[mask.bool()]
    if not grads:
        return valid, {}
    weight = torch.linspace(-1, 1, valid.shape[-1], dtype=valid.dtype)
    (valid * weight).sum().backward()
    return valid.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", ("none", "right", "left"))
@pytest.mark.parametrize("name", MODELS)
def test_matches_unpatched_model(name, padding):
    ids, mask = batch(padding)
    truth_model = build(name, dtype=torch.float64)
    torch_model = build(name)
    bmk_model = build(name, "bmkernels")
    truth, truth_grads = run(truth_model, ids, mask, grads=True)
    same, same_grads = run(torch_model, ids, mask, grads=True)
    got, got_grads = run(bmk_model, ids, mask, grads=True)
    assert_within_rule("output", got, truth, same, torch.float32)
    assert set(got_grads) == set(truth_grads)
    for param in truth_grads:
        assert_within_rule(f"grad {param}", got_grads[param], truth_grads[param], same_grads[param], torch.float32)


def test_vit_matches_unpatched_model():
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    models = {}
    for key, impl, dtype in (
        ("truth", "sdpa", torch.float64),
        ("torch", "sdpa", torch.float32),
        ("bmk", "bmkernels", torch.float32),
    ):
        torch.manual_seed(0)
        models[key] = transformers.ViTModel._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()
    outs = {key: m(pixel_values=pixels.to(m.dtype)).last_hidden_state for key, m in models.items()}
    assert_within_rule("vit output", outs["bmk"], outs["truth"], outs["torch"], torch.float32)


@pytest.mark.parametrize("name", DECODERS)
def test_generate_gives_the_same_tokens(name):
    ids, mask = batch("left", length=9)  # left padding, as for batched generation
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = build(name).generate(ids, **kwargs)
    got = build(name, "bmkernels").generate(ids, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", MODELS)
def test_profiler_sees_bmkernels_and_no_sdpa(name):
    model = build(name, "bmkernels")
    ids, mask = batch("right")
    with torch.profiler.profile() as prof, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    names = {e.key for e in prof.key_averages()}
    assert "bmkernels::attention_fwd" in names
    assert not any("scaled_dot_product" in n for n in names), sorted(n for n in names if "attention" in n)


@pytest.mark.parametrize(
    "padding,expected", [("none", None), ("right", [[0, 19], [0, 13]]), ("left", [[0, 19], [6, 19]])]
)
def test_padding_reaches_the_kernel_as_key_ranges(padding, expected, monkeypatch):
    calls = []
    real = bmk_transformers.ops_attention.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(bmk_transformers.ops_attention, "attention", spy)
    ids, mask = batch(padding)
    with torch.no_grad():
        build("llama", "bmkernels")(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2  # one per layer
    for kwargs in calls:
        assert kwargs["mask"] is None and kwargs["bias"] is None and kwargs["key_padding_mask"] is None
        assert kwargs["causal"] is True and kwargs["causal_alignment"] == "bottom_right"
        got = kwargs["key_range"]
        assert (got is None) if expected is None else (got.tolist() == expected)


def test_gemma2_sliding_window_and_softcap_reach_the_kernel(monkeypatch):
    calls = []
    real = bmk_transformers.ops_attention.attention
    monkeypatch.setattr(
        bmk_transformers.ops_attention, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    )
    with torch.no_grad():
        build("gemma2", "bmkernels")(input_ids=batch("none")[0])
    assert [kw["window"] for kw in calls] == [(5, 0), None]  # layer 0 slides over 6 keys, layer 1 is global
    assert all(kw["softcap"] == 5.0 and kw["mask"] is None for kw in calls)


def test_packed_sequences_take_the_dense_mask_and_stay_exact(monkeypatch):
    """position_ids restarting inside a row (packed sequences) and no attention_mask: transformers'
    dense mask, not the fast path, and the same output as sdpa."""
    ids, _ = batch("none", length=12)
    position_ids = torch.tensor([list(range(5)) + list(range(7))] * 2)
    with torch.no_grad():
        expected = build("llama")(input_ids=ids, position_ids=position_ids).logits
        got = build("llama", "bmkernels")(input_ids=ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padding_with_holes_is_exact():
    ids, mask = batch("none")
    mask[0, 4:7] = 0
    with torch.no_grad():
        expected = build("bert")(input_ids=ids, attention_mask=mask).last_hidden_state
        got = build("bert", "bmkernels")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_static_cache_generate_is_exact():
    """A static cache (kv length past the real tokens, cache offsets as tensors) takes the dense mask."""
    ids, mask = batch("none", length=7)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    expected = build("llama").generate(ids, **kwargs)
    got = build("llama", "bmkernels").generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_training_with_dropout_runs_and_is_reproducible():
    model = build("bert", "bmkernels").train()
    model.config.attention_probs_dropout_prob = 0.1
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 0.1
    ids, mask = batch("right")
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    outs[0].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" not in n)


def test_ways_to_select_it(tmp_path):
    cls, cfg, _ = llama()
    model = build("llama")
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, attn_implementation="bmkernels")
    assert loaded.config._attn_implementation == "bmkernels"
    model.set_attn_implementation("bmkernels")
    assert model.config._attn_implementation == "bmkernels"
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


def test_register_is_idempotent():
    bmk_transformers.register()
    bmk_transformers.register()
    assert transformers.AttentionInterface._global_mapping["bmkernels"] is bmk_transformers.attention_forward
    assert transformers.AttentionMaskInterface._global_mapping["bmkernels"] is bmk_transformers.mask_function


@pytest.mark.parametrize("name", ("llama", "gemma2"))
def test_swap_modules_switches_and_unswap_restores(name):
    model = build(name)
    baseline = model.config._attn_implementation
    ids, mask = batch("left")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    report = bmkernels.swap_modules(model)
    assert model.config._attn_implementation == "bmkernels"
    assert report.swapped == [] and report.left == []
    assert any("attn_implementation" in note and "bmkernels" in note for note in report.notes), report.notes
    assert "transformers attn_implementation" in str(report)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    assert bmkernels.unswap(model) is model
    assert model.config._attn_implementation == baseline


def test_swap_with_attention_off_leaves_the_implementation():
    model = build("llama")
    report = bmkernels.swap_modules(model, attention=False)
    assert model.config._attn_implementation == "sdpa" and report.notes == []


def test_gpt_oss_sinks_and_sliding_window_reach_the_kernel(monkeypatch):
    calls = []
    real = bmk_transformers.ops_attention.attention
    monkeypatch.setattr(
        bmk_transformers.ops_attention, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    )
    model = build("gpt_oss", "bmkernels")
    with torch.no_grad():
        model(*batch("right"))
    assert [kw["window"] for kw in calls] == [(5, 0), None]  # layer 0 slides over 6 keys, layer 1 is global
    assert [kw["sinks"] for kw in calls] == [layer.self_attn.sinks for layer in model.model.layers]
    assert all(kw["mask"] is None and kw["key_range"].tolist() == [[0, 19], [0, 13]] for kw in calls)


def test_copy_of_a_switched_model_keeps_working():
    model = build("gpt2", "bmkernels")
    clone = copy.deepcopy(model)
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(
            clone(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


@pytest.mark.parametrize("mask", ("none", "key_ranges", "dense"))
def test_position_bias_runs_as_bias(mask):
    """position_bias (T5-style relative bias) is added to the scores, with every mask form."""
    from bmkernels.reference import attention as reference

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 7, 7, generator=gen)
    module = torch.nn.Module()
    module.is_causal = False
    key_range = torch.tensor([[0, 7], [2, 7]])
    keep = torch.arange(7) >= key_range[:, :1]
    attention_mask = {"none": None, "key_ranges": key_range, "dense": keep[:, None, None, :].expand(2, 1, 7, 7)}[mask]
    out, weights = bmk_transformers.attention_forward(module, q, k, v, attention_mask, position_bias=bias, scaling=0.3)
    expected = reference.attention(
        q, k, v, bias=bias, key_range=key_range if mask != "none" else None, scale=0.3
    ).transpose(1, 2)
    assert weights is None and out.shape == (2, 7, 4, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
