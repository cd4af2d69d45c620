"""kvpress's own press-call, generate and pipeline test steps (``tests/test_press_call.py``, ``test_generate.py`` and
``test_pipeline.py`` of kvpress) run against DeltaPress on a tiny Llama, with the assertions DASH's rules give: no
hook left on the model after the block while the halted cache lives (so the model saves and copies as before), the
cache lengths of rule 7, and the pipeline's answers equal to ``model.generate`` under the same halting decision."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from transformers import DynamicCache, pipeline

from dash_vlm import DeltaPress
from dash_vlm.models.text import tiny_text_model
from dash_vlm.models.tiny import tiny_tokenizer

RATIO = 0.667
CONTEXT = " ".join(f"w{i}" for i in torch.randint(3, 100, (40,), generator=torch.Generator().manual_seed(3)))


def hooks_on(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


@pytest.fixture(scope="module")
def model():
    return tiny_text_model("llama")


def prefill(model, ids: torch.Tensor, press: DeltaPress | None = None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache)
        else:
            with press(model):
                model(ids, past_key_values=cache)
    return cache


def test_context_manager_adds_and_removes_hooks_and_the_kept_cache_needs_none(model):
    ids = tiny_tokenizer()(CONTEXT, return_tensors="pt")["input_ids"]
    press = DeltaPress(compression_ratio=RATIO)
    with press(model):
        # The prefill module's pre-hook and forward hook and the labels check on the model; nothing per layer yet.
        assert hooks_on(model) == 3
        with torch.no_grad():
            cache = model(ids, past_key_values=DynamicCache()).past_key_values
    assert hooks_on(model) == 0  # kvpress's own test: no hook after the block; here with the halted cache alive
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a hook with a closure would not pickle
    twin = copy.deepcopy(model)
    assert hooks_on(twin) == 0
    turn = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        logits = model(turn, past_key_values=cache).logits
        twin_logits = twin(turn, past_key_values=prefill(twin, ids, press)).logits
    assert torch.equal(twin_logits, logits)  # the copy halts and continues as the original does
    assert hooks_on(model) == 0 and hooks_on(twin) == 0  # the later forwards' one-shot mask rewrites are gone


def test_context_manager_applies_compression(model):
    """kvpress checks each layer's cache length; DASH's rule 7: layers up to the decision layer hold every position,
    the deeper ones the kept tokens; a forward outside the block keeps everything."""
    ids = tiny_tokenizer()(CONTEXT, return_tensors="pt")["input_ids"]
    press = DeltaPress(compression_ratio=RATIO)
    cache = prefill(model, ids, press)
    length, stats = ids.shape[-1], press.last_stats[0]
    kept = length - round(RATIO * (length - 1))
    assert stats.kept == kept < length
    decision = stats.decision_layer
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        length if index <= decision else kept for index in range(len(cache.layers))
    ]
    assert [layer.values.shape[2] for layer in cache.layers] == [layer.keys.shape[2] for layer in cache.layers]
    assert cache.get_seq_length() == length  # transformers reads layer 0: the positions the prompt took
    plain = prefill(model, ids)
    assert [layer.keys.shape[2] for layer in plain.layers] == [length] * len(plain.layers)


def test_generate_matches_the_pipeline(model):
    """kvpress's test_generate: the pipeline's answer equals ``model.generate`` on context + question under the press.
    The pipeline halts in the context alone; ``generate`` sees the question too, so it protects the question and the
    context's last token (the pipeline's ``protect_last``): the same eligible tokens, so the same decision (causal
    attention: the question cannot change a context token's score), and the same answer."""
    tokenizer = tiny_tokenizer()
    generator = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    question = "w5 w6 w7"
    press = DeltaPress(compression_ratio=RATIO)
    with torch.no_grad():
        answer = generator(CONTEXT, question=question, press=press, max_new_tokens=8)["answer"]
    pipeline_halted = press.last_stats[0].halted_positions
    context_ids = tokenizer.encode(tokenizer.bos_token + CONTEXT, return_tensors="pt", add_special_tokens=False)
    question_ids = tokenizer.encode(question, return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([context_ids, question_ids], -1)
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[:, context_ids.shape[-1] - 1 :] = True
    with torch.no_grad(), press(model, protect=protect):
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert press.last_stats[0].halted_positions == pipeline_halted and pipeline_halted
    generated = tokenizer.decode(output[0, ids.shape[-1] :], skip_special_tokens=True)
    assert generated == answer and answer.strip()


def test_pipeline_steps(model, caplog):
    """kvpress's test_pipeline, test_pipeline_with_cache and test_pipeline_no_press_works: answers for one and for
    several questions, the context lengths the pipeline logs, a cache given by the caller left as the halted prefill
    (the pipeline removes each answer again), and no hook afterwards."""
    generator = pipeline("kv-press-text-generation", model=model, tokenizer=tiny_tokenizer(), device="cpu")
    press = DeltaPress(compression_ratio=RATIO)
    questions = ["w5 w6 w7", "w9", "w40 w41 w42"]
    with caplog.at_level(logging.DEBUG), torch.no_grad():
        answers = generator(CONTEXT, questions=questions, press=press, max_new_tokens=6)["answers"]
    assert len(answers) == 3 and all(isinstance(answer, str) and answer.strip() for answer in answers)
    length = len(CONTEXT.split()) + 1  # the words and the pipeline's BOS
    messages = [record.message for record in caplog.records]
    assert f"Context Length: {length}" in messages
    assert f"Compressed Context Length: {length}" in messages  # layer 0 keeps every position (rule 7)
    cache = DynamicCache()
    with torch.no_grad():
        with_cache = generator(CONTEXT, questions=questions, press=press, cache=cache, max_new_tokens=6)["answers"]
        unpressed = generator(CONTEXT, questions=questions, max_new_tokens=6)["answers"]
    assert with_cache == answers and len(unpressed) == 3
    kept = press.last_stats[0].kept
    decision = press.last_stats[0].decision_layer
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        length if index <= decision else kept for index in range(len(cache.layers))
    ]
    assert hooks_on(model) == 0
