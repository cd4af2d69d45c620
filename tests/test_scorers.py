"""Halting methods as scorers: the registry drives ``DeltaPress(method=...)``, and a scorer gets exactly what it
declares it reads, at the layer it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dash_vlm import DeltaPress
from dash_vlm.halting import decision_layer, eligible_tokens, random_scores, select_halted, token_scores
from dash_vlm.models import adapter_for
from dash_vlm.models.text import text_sample
from dash_vlm.models.tiny import left_pad_batch
from dash_vlm.scorers import SCORERS, DashScorer, FastVScorer, LayerDeltaScorer, RandomScorer, Reading, Scorer


@dataclass(frozen=True)
class NormOfInputScorer(Scorer):
    """A made-up method, to show that registering a scorer is all a new method needs."""

    start_ratio: float
    reads: ClassVar[tuple[str, ...]] = ("layer_input",)

    def layer(self, num_layers: int) -> int:
        return decision_layer(self.start_ratio, num_layers)

    def score(self, reading: Reading) -> torch.Tensor:
        return token_scores(reading.layer_input)


def test_the_registry_drives_the_method_names(monkeypatch):
    with pytest.raises(ValueError, match=r"method must be one of \('dash', 'random', 'layer_delta', 'fastv'\)"):
        DeltaPress(method="input_norm")
    monkeypatch.setitem(SCORERS, "input_norm", NormOfInputScorer)
    assert DeltaPress(method="input_norm", start_ratio=0.6).scorer() == NormOfInputScorer(start_ratio=0.6)
    assert DeltaPress(method="layer_delta", start_ratio=0.6).scorer() == LayerDeltaScorer(start_ratio=0.6)


def test_scorers_take_the_press_fields_of_their_names():
    assert DeltaPress(start_ratio=0.5).scorer() == DashScorer(start_ratio=0.5)
    assert DeltaPress(method="random", start_ratio=0.2, seed=9).scorer() == RandomScorer(start_ratio=0.2, seed=9)
    assert DashScorer(0.4).layer(28) == RandomScorer(0.4, 0).layer(28) == 11
    assert DeltaPress(start_ratio=0.4).decision_layer(28) == 11


def test_a_scorer_reads_only_reading_fields():
    with pytest.raises(TypeError, match="queries"):

        @dataclass(frozen=True)
        class Unwired(DashScorer):
            reads: ClassVar[tuple[str, ...]] = ("queries",)


def test_the_builtin_scores():
    real = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    attention_output = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    assert torch.equal(
        DashScorer(0.4).score(Reading(real, attention_output=attention_output)), token_scores(attention_output)
    )
    input_ids = torch.randint(0, 100, (2, 4))
    expected = random_scores(input_ids, real, 3)
    assert torch.equal(RandomScorer(0.4, 3).score(Reading(real, input_ids=input_ids)), expected)


def layer_io(model, inputs: dict, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What decoder layer ``layer_index`` of the unmodified model takes and gives, by plain hooks."""
    layer, seen = adapter_for(model).decoder_layers(model)[layer_index], {}

    def before(module, args, kwargs):
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def after(module, args, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen["input"], seen["output"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2_vl"])  # a decoder layer that returns a tensor, a tuple
def test_layer_delta_halts_what_plain_hooks_say(model_type):
    adapter = adapter_for(model_type)
    model = adapter.tiny_model(model_type)
    if adapter.is_vision_language:
        inputs = adapter.tiny_batch(model_type)[0]
    else:
        inputs = left_pad_batch([text_sample(20, seed=1), text_sample(13, seed=2)])
    press = DeltaPress(compression_ratio=0.5, scope="all", method="layer_delta")
    layer_input, layer_output = layer_io(model, inputs, press.decision_layer(len(adapter.decoder_layers(model))))
    delta = (layer_output - layer_input).float().norm(dim=-1)
    with torch.no_grad(), press(model):
        model(**inputs)
    real = inputs["attention_mask"].bool()
    for b, stats in enumerate(press.last_stats):
        positions = real[b].nonzero().flatten().tolist()
        eligible = positions[:-1]  # protect_last=1
        halted = sorted(eligible, key=lambda t: (delta[b, t].item(), t))[: round(0.5 * len(eligible))]
        assert stats.halted_positions == sorted(positions.index(t) for t in halted)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_a_scorer_of_input_ids_needs_them():
    model = adapter_for("llama").tiny_model("llama")
    embeddings = model.get_input_embeddings()(text_sample(10)["input_ids"])
    with pytest.raises(ValueError, match="method='random' needs input_ids"):
        with torch.no_grad(), DeltaPress(compression_ratio=0.5, method="random")(model):
            model(inputs_embeds=embeddings)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen2_vl", "qwen2_5_vl", "llava", "llava_next"])
@pytest.mark.parametrize("fastv_layer", [1, 3])
def test_fastv_halts_by_the_last_tokens_eager_attention(model_type, fastv_layer):
    """FastV's scores, computed from the layer's queries and keys under SDPA, select what the eager attention
    weights (``output_attentions=True``) of the last real token at layer ``K - 1``, averaged over heads, select."""
    adapter = adapter_for(model_type)
    if adapter.is_vision_language:
        inputs = adapter.tiny_batch(model_type)[0]
    else:
        inputs = left_pad_batch([text_sample(20, seed=1), text_sample(13, seed=2)])
    eager = adapter.tiny_model(model_type, "eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    row = attentions[fastv_layer - 1][:, :, -1].float().mean(1)  # left padding: the last real token is the last
    real = inputs["attention_mask"].bool()
    eligible = eligible_tokens(real, real, 0, 1)
    n_halt = torch.tensor([round(0.5 * count) for count in eligible.sum(-1).tolist()])
    expected = select_halted(row, eligible, n_halt)
    press = DeltaPress(compression_ratio=0.5, scope="all", method="fastv", fastv_layer=fastv_layer)
    model = adapter.tiny_model(model_type, "sdpa")
    with torch.no_grad(), press(model):
        model(**inputs)
    rank = real.long().cumsum(-1) - 1
    for b, stats in enumerate(press.last_stats):
        assert stats.decision_layer == fastv_layer - 1
        assert stats.halted_positions == rank[b][expected[b]].tolist()


def test_fastv_layer_is_checked_against_the_depth():
    model = adapter_for("llama").tiny_model("llama")  # 5 layers: K in 1..4
    assert FastVScorer(fastv_layer=4).layer(5) == 3
    for value in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="fastv_layer must be an integer >= 1"):
            DeltaPress(method="fastv", fastv_layer=value)
    with pytest.raises(ValueError, match="fastv_layer must be in 1..4 for a 5-layer decoder, got 5"):
        with torch.no_grad(), DeltaPress(compression_ratio=0.5, method="fastv", fastv_layer=5)(model):
            model(**text_sample(10))
    with pytest.raises(ValueError, match="method='fastv' cannot halt inside the vision tower"):
        DeltaPress(method="fastv", vision_compression_ratio=0.5)
