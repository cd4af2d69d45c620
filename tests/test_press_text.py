"""DeltaPress on the text LLMs kvpress supports, directly and inside kvpress's own pipeline."""

import contextlib
from functools import cache

import pytest
import torch
from transformers import DynamicCache, pipeline

from dash_vlm import DeltaPress, supported_model_types
from dash_vlm.checks import relative_error
from dash_vlm.checks.reference import MaskedReference
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.text import text_sample
from dash_vlm.models.tiny import left_pad_batch, tiny_tokenizer

TEXT_MODELS = sorted(set(supported_model_types()) - set(model_types_with("is_vision_language")))
ATTENTION = ["sdpa", "eager"]
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@cache
def model_for(model_type: str, attention: str = "sdpa"):
    return adapter_for(model_type).tiny_model(model_type, attention)


def generate(model, inputs, new_tokens=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY)


@pytest.mark.parametrize("model_type", list(TEXT_MODELS))
@pytest.mark.parametrize("attention", ATTENTION)
def test_padded_batch_matches_reference_and_ratio_zero_is_exact(model_type, attention):
    model = model_for(model_type, attention)
    batch = left_pad_batch([text_sample(23, seed=1), text_sample(14, seed=2), text_sample(30, seed=3)])
    plain = generate(model, batch)
    with DeltaPress(compression_ratio=0.0)(model):
        unchanged = generate(model, batch)
    assert torch.equal(unchanged.sequences, plain.sequences)
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip(unchanged.logits, plain.logits, strict=True))
    reference = MaskedReference(model, 0.5, scope="all")
    with reference():
        expected = generate(model, batch)
    press = DeltaPress(compression_ratio=0.5)  # scope "auto" is "all" on a text model
    with press(model):
        actual = generate(model, batch)
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(relative_error(a, b) <= 1e-4 for a, b in zip(actual.logits, expected.logits, strict=True))
    assert [s.kept for s in press.last_stats] == [23 - 11, 14 - 6, 30 - 14]  # round(0.5 * (n - 1)) halt


def test_long_generation_on_halted_cache():
    model = model_for("llama")
    inputs = text_sample(40, seed=4)
    reference = MaskedReference(model, 0.667, scope="all")
    with reference():
        expected = generate(model, inputs, new_tokens=40)
    with DeltaPress(compression_ratio=0.667)(model):
        actual = generate(model, inputs, new_tokens=40)
    assert torch.equal(actual.sequences, expected.sequences)
    assert max(relative_error(a, b) for a, b in zip(actual.logits, expected.logits, strict=True)) <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("questions", [["w5 w6 w7"], ["w5 w6 w7", "w9", "w40 w41 w42 w43 w44"]])
def test_kvpress_pipeline_matches_reference(model_type, attention, questions):
    model = model_for(model_type, attention)
    generator = pipeline("kv-press-text-generation", model=model, tokenizer=tiny_tokenizer(), device="cpu")
    context = " ".join(f"w{i}" for i in torch.randint(3, 100, (60,), generator=torch.Generator().manual_seed(5)))
    kwargs = dict(questions=questions, max_new_tokens=8)
    press = DeltaPress(compression_ratio=0.667)
    with torch.no_grad():
        actual = generator(context, press=press, **kwargs)["answers"]
        reference = MaskedReference(model, 0.667, scope="all")
        with reference():  # the reference has no cache to carry its decision: it wraps the whole pipeline call
            expected = generator(context, **kwargs)["answers"]
        plain = generator(context, **kwargs)["answers"]
    stats = press.last_stats[0]
    assert stats.tokens == 61 and stats.kept == 61 - round(0.667 * 60)
    assert stats.halted_positions == reference.halted_per_sample[0]
    assert actual == expected
    assert len(actual) == len(questions) and all(answer.strip() for answer in actual)
    assert actual != plain or len(questions) == 1  # halting changes some answer of the random model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layers_of_different_attention_types_get_their_own_compact_masks(attention):
    """A decoder mixing sliding-window and full-attention layers above the decision layer, without a cache: each
    layer type keeps its own mask on the compact sequence (the reference masks each layer's own mask)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dash_vlm.models.text import TEXT

    torch.manual_seed(0)
    types = ["full_attention"] * 3 + ["sliding_attention", "full_attention"]
    config = Qwen2Config(**(TEXT | dict(sliding_window=6, layer_types=types)), use_sliding_window=True)
    config._attn_implementation = attention
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(2, 100, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        reference = MaskedReference(model, 0.5, scope="all")
        with reference():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        with DeltaPress(compression_ratio=0.5, scope="all")(model):
            actual = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
    assert relative_error(actual, expected) <= 1e-5 < relative_error(plain, expected)


@pytest.mark.parametrize("attention", ATTENTION)
def test_padding_that_arrives_after_an_unpadded_prompt(attention):
    """An unpadded batch (every sample keeps as many tokens: no filler), then a next turn padded in one sample and
    decode steps: the one-shot mask rewrites follow the masks each forward brings, not the prompt's layout."""
    model = model_for("llama", attention)
    prompt = torch.cat([text_sample(20, seed=7)["input_ids"], text_sample(20, seed=8)["input_ids"]])
    turn = torch.tensor([[0, 11, 12], [13, 14, 15]])
    turn_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])

    def converse(prefill_context, outer_context):
        cache, logits = DynamicCache(), []
        mask = torch.ones_like(prompt)
        with torch.no_grad(), outer_context():
            with prefill_context():
                model(input_ids=prompt, attention_mask=mask, past_key_values=cache)
            mask = torch.cat([mask, turn_mask], -1)
            logits.append(model(input_ids=turn, attention_mask=mask, past_key_values=cache).logits[:, -1])
            for _ in range(3):
                token = logits[-1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], -1)
                logits.append(model(input_ids=token, attention_mask=mask, past_key_values=cache).logits[:, -1])
        return logits

    reference = MaskedReference(model, 0.667, scope="all")
    expected = converse(contextlib.nullcontext, reference)
    press = DeltaPress(compression_ratio=0.667)
    actual = converse(lambda: press(model), contextlib.nullcontext)
    assert [stats.kept for stats in press.last_stats] == [20 - round(0.667 * 19)] * 2  # no filler
    assert all(relative_error(a, b) <= 1e-4 for a, b in zip(actual, expected, strict=True))
