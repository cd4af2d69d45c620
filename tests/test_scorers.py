"""Halting methods as scorers: the registry drives ``DeltaPress(method=...)``, and a scorer gets exactly what it
declares it reads, at the layer it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dash_vlm import DeltaPress
from dash_vlm.halting import decision_layer, random_scores, token_scores
from dash_vlm.models import adapter_for
from dash_vlm.models.text import text_sample
from dash_vlm.models.tiny import left_pad_batch
from dash_vlm.scorers import SCORERS, DashScorer, LayerDeltaScorer, RandomScorer, Reading, Scorer


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
    with pytest.raises(ValueError, match=r"method must be one of \('dash', 'random', 'layer_delta'\)"):
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
