"""What Qwen3.5's hybrid decoder asks of DASH (DESIGN.md section 1 rule 16, section 11): each deeper recurrent
(Gated DeltaNet) layer runs over its sample's kept tokens only, held to the subsequence reference (each sample alone,
its deeper layers on the explicit list of its kept positions) for a decision layer of either kind, both scopes, every
method, padded batches and decode steps; the caches' recurrent and convolution states equal the reference's; the
refusals that the hybrid layout needs. The generic tests (test_press_vlm.py, test_vision.py, ...) take both model
types through everything else."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.checks import relative_error
from dash_vlm.checks.reference import SubsequenceReference
from dash_vlm.models import adapter_for
from dash_vlm.models.qwen3_5 import DECISION_AT_ATTENTION, TINY_LAYER_TYPES, tiny_qwen3_5
from dash_vlm.scorers import SCORERS

GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
# A 7-layer layout puts two attention layers above the decision layer (2), recurrent ones between them: the mask
# rewrite of a later forward hands over across recurrent layers.
TWO_DEEPER_ATTENTION = ("linear_attention", "full_attention", "linear_attention") + (
    "full_attention",
    "linear_attention",
) * 2
LAYOUTS = {
    "recurrent decision": TINY_LAYER_TYPES,
    "attention decision": DECISION_AT_ATTENTION,
    "two deeper attention layers": TWO_DEEPER_ATTENTION,
}
NEW_TOKENS = 5


def generate(model, inputs, context=None):
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **GREEDY)
    with torch.no_grad():
        if context is None:
            return model.generate(**inputs, **options)
        with context:
            return model.generate(**inputs, **options)


def batch_and_singles(model_type: str) -> tuple[dict, list[dict]]:
    return adapter_for(model_type).tiny_batch(model_type)


def test_the_tiny_layouts_decide_at_each_kind_of_layer():
    for layout, decision_kind in ((TINY_LAYER_TYPES, "linear_attention"), (DECISION_AT_ATTENTION, "full_attention")):
        model = tiny_qwen3_5(layer_types=layout)
        decision = DeltaPress().decision_layer(len(layout))
        assert model.model.language_model.layers[decision].layer_type == decision_kind
        assert {layout[index] for index in range(decision + 1, len(layout))} == {"linear_attention", "full_attention"}


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scope", ["vision", "all"])
@pytest.mark.parametrize("method", list(SCORERS))
def test_padded_batch_equals_the_subsequence_reference(model_type, layout, scope, method):
    """A left-padded batch under the press against each sample alone under the reference: DASH's own selection for
    ``method="dash"``; for the other methods the reference takes the press's choice (their selections are held to
    brute force in test_scorers.py) and holds the execution to rule 16."""
    layer_types = LAYOUTS[layout]
    model = tiny_qwen3_5(model_type, layer_types=layer_types, num_hidden_layers=len(layer_types))
    batch, singles = batch_and_singles(model_type)
    fastv_layer = 3 if layout == "attention decision" else 2  # FastV reads attention: layer 2, or layer 1
    press = DeltaPress(compression_ratio=0.667, scope=scope, method=method, fastv_layer=fastv_layer)
    actual = generate(model, batch, press(model))
    stats = press.last_stats
    assert len({stat.kept for stat in stats}) > 1  # filler slots in the compact layers
    length = batch["input_ids"].shape[1]
    for b, sample in enumerate(singles):
        chosen = None if method == "dash" else [stats[b].halted_positions]
        start_ratio = stats[b].decision_layer / len(layer_types)  # FastV decides below DASH's layer
        reference = SubsequenceReference(model, 0.667, start_ratio, scope=scope, chosen=chosen)
        with reference():
            expected = generate(model, sample)
        assert reference.halted_per_sample[0] == stats[b].halted_positions and stats[b].halted_positions
        assert torch.equal(actual.sequences[b, length:], expected.sequences[0, -NEW_TOKENS:])
        for step, (x, y) in enumerate(zip(actual.logits, expected.logits, strict=True)):
            assert relative_error(x[b], y[0]) <= 1e-4, f"sample {b} step {step}"


@pytest.mark.parametrize("layout", ["recurrent decision", "attention decision"])
def test_deeper_recurrent_layers_take_the_kept_rows_and_leave_the_references_states(layout):
    """After a padded prefill, every recurrent layer's convolution and recurrent state, per sample, equals the
    reference's for that sample alone (the deeper ones: over its kept tokens only); the first deeper layer receives
    exactly the decision layer's rows of the kept positions, filler first."""
    model = tiny_qwen3_5(layer_types=LAYOUTS[layout])
    layers = model.model.language_model.layers
    batch, singles = batch_and_singles("qwen3_5")
    decision = DeltaPress().decision_layer(len(layers))
    seen = {}

    def keep(name, tensor):
        seen.setdefault(name, tensor)  # the prefill's, not a later forward's

    handles = [
        layers[decision].register_forward_hook(lambda module, args, output: keep("decision", output)),
        # what the first deeper layer's own computation receives, after the press's layer pre-hook gathered it
        layers[decision + 1].input_layernorm.register_forward_pre_hook(lambda module, args: keep("first", args[0])),
    ]
    press = DeltaPress(compression_ratio=0.5)
    try:
        with torch.no_grad(), press(model):
            cache = model(**batch, use_cache=True).past_key_values
    finally:
        for handle in handles:
            handle.remove()
    pads = (batch["attention_mask"] == 0).sum(-1).tolist()
    slots = max(stat.kept for stat in press.last_stats)
    assert seen["first"].shape[1] == slots < batch["input_ids"].shape[1]
    recurrent = sorted(adapter_for(model).recurrent_layers(model.config))
    deeper = [index for index in recurrent if index > decision]
    assert deeper and [index for index in recurrent if index <= decision]
    for b, (sample, stat) in enumerate(zip(singles, press.last_stats, strict=True)):
        halted = {pads[b] + t for t in stat.halted_positions}
        kept = [t for t in range(pads[b], batch["input_ids"].shape[1]) if t not in halted]
        filler = slots - len(kept)
        assert torch.equal(seen["first"][b, filler:], seen["decision"][b, kept])
        reference = SubsequenceReference(model, 0.5)
        with torch.no_grad(), reference():
            expected = model(**sample, use_cache=True).past_key_values
        for index in recurrent:
            for states in ("conv_states", "recurrent_states"):
                actual_state, expected_state = getattr(cache, states)[index][b], getattr(expected, states)[index][0]
                assert relative_error(actual_state, expected_state) <= 1e-5, (index, states)


def test_decision_layer_below_the_first_attention_layer_and_fastv_on_a_recurrent_layer_are_refused():
    model = tiny_qwen3_5(layer_types=("linear_attention",) * 3 + ("full_attention",) * 2)
    with pytest.raises(
        ValueError, match=r"start_ratio=0\.4 .*hybrid.*decoder layer 3.*start_ratio must be at least 0\.6"
    ):
        with DeltaPress(compression_ratio=0.5)(model):
            pass
    with DeltaPress(compression_ratio=0.5, start_ratio=0.6)(model):  # the decision at the first attention layer
        pass
    with pytest.raises(ValueError, match=r"fastv_layer=2 .*recurrent.*fastv_layer in \[4\]"):
        with DeltaPress(compression_ratio=0.5, method="fastv", fastv_layer=2)(model):
            pass
    with DeltaPress(compression_ratio=0.0, method="fastv")(model):  # nothing halts: no layer needs to decide
        pass


def test_the_fast_path_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    model, processor = adapter_for("qwen3_5").tiny_checkpoint("qwen3_5", ["red", "blue"], 0, 2, 32, 32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"cuda_graphs=True does not support 'qwen3_5'"):
        DashVLM.from_pretrained(tmp_path, cuda_graphs=True)


def halted_prefill(model, inputs: dict):
    """The prefill under DASH 0.5, and the halted cache it leaves."""
    with torch.no_grad(), DeltaPress(compression_ratio=0.5)(model):
        output = model(**inputs, use_cache=True)
    return output, output.past_key_values


def decode_step(model, inputs: dict, output, cache) -> torch.Tensor:
    """One greedy decode step of a padded batch on ``cache``, positions as generate gives them."""
    token = output.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], -1)
    step = model.prepare_inputs_for_generation(
        token, past_key_values=cache, attention_mask=mask, cache_position=torch.tensor([mask.shape[1] - 1])
    )
    with torch.no_grad():
        return model(**step).logits


def test_a_reordered_halted_cache_decodes_as_its_samples_reordered():
    """``reorder_cache`` across samples (what beam search does within a prompt's beams, made visible by mixing
    prompts): the cache's record follows its rows, so a decode step on the reordered cache equals the original
    step's rows in the new order."""
    model = tiny_qwen3_5()
    batch, _ = batch_and_singles("qwen3_5")
    output, cache = halted_prefill(model, batch)
    order = torch.tensor([2, 0, 1])
    expected = decode_step(model, batch, output, copy.deepcopy(cache))[order]
    cache.reorder_cache(order)
    model.model.rope_deltas = model.model.rope_deltas[order]  # the positions of the reordered rows
    reordered = {key: value[order] for key, value in batch.items() if key in ("input_ids", "attention_mask")}
    logits = decode_step(model, reordered, SimpleNamespace(logits=output.logits[order]), cache)
    assert relative_error(logits, expected) <= 1e-5


def test_the_halted_hybrid_cache_deep_copies_and_refuses_pickling():
    model = tiny_qwen3_5()
    batch, _ = batch_and_singles("qwen3_5")
    output, cache = halted_prefill(model, batch)
    copied = copy.deepcopy(cache)
    assert type(copied) is type(cache) and copied.halt_record is not cache.halt_record
    assert torch.equal(decode_step(model, batch, output, copied), decode_step(model, batch, output, cache))
    with pytest.raises(TypeError, match="halted cache .* cannot be pickled"):
        pickle.dumps(cache)
    pickle.dumps(model)  # the model itself carries nothing of the press


def test_beam_search_on_the_halted_hybrid_cache():
    """Beam search expands each prompt and reorders the cache every step; each prompt alone gives the same beams."""
    model = tiny_qwen3_5()
    batch, singles = batch_and_singles("qwen3_5")
    beams = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad(), DeltaPress(compression_ratio=0.667)(model):
        together = model.generate(**batch, **beams)
        for b, sample in enumerate(singles):
            alone = model.generate(**sample, **beams)
            assert torch.equal(together[b, -5:], alone[0, -5:])
