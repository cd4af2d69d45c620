"""DeltaPress on every tiny vision-language family: against the unmodified model, the reference of its decoder (the
masked one; the subsequence one for a hybrid decoder), and each sample alone."""

import copy
from functools import cache

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from dash_vlm import DeltaPress
from dash_vlm.checks import relative_error
from dash_vlm.checks.reference import MaskedReference, SubsequenceReference, decoder_reference
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.qwen2_vl import qwen_vl_sample, tiny_qwen_vl
from dash_vlm.models.text import tiny_text_model
from dash_vlm.models.tiny import IMAGE_TOKEN, VIDEO_TOKEN
from dash_vlm.scorers import SCORERS

FAMILIES = model_types_with("is_vision_language")
ATTENTION = ["sdpa", "eager"]


def samples(family: str) -> dict:
    """Single-prompt inputs by kind: one image, several images, video (families with video)."""
    return adapter_for(family).tiny_inputs(family)


def batch_and_singles(family: str) -> tuple[dict, list[dict]]:
    """A left-padded batch of differently sized samples (image sizes and prompts), and each sample alone."""
    return adapter_for(family).tiny_batch(family)


def kinds(family: str) -> list[str]:
    return list(samples(family))


FAMILY_KINDS = [(family, kind) for family in FAMILIES for kind in kinds(family)]


@cache
def model_for(family: str, attention: str = "sdpa"):
    return adapter_for(family).tiny_model(family, attention)


GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def generate(model, inputs, press=None, max_new_tokens=5, **press_kwargs):
    with torch.no_grad(), press(model, **press_kwargs) if press is not None else _null():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **GREEDY)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_same_generation(actual, expected, tolerance):
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.logits) == len(expected.logits) >= 4
    for step, (a, b) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert relative_error(a, b) <= tolerance, f"step {step}"


@pytest.mark.parametrize(("family", "kind"), FAMILY_KINDS)
@pytest.mark.parametrize("method", list(SCORERS))
def test_ratio_zero_equals_unmodified_model(family, kind, method):
    model, inputs = model_for(family), samples(family)[kind]
    expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=0.0, method=method)
    assert_same_generation(generate(model, inputs, press), expected, 1e-5)
    assert press.last_stats[0].kept == press.last_stats[0].tokens


@pytest.mark.parametrize(("family", "kind"), FAMILY_KINDS)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("scope", ["vision", "all"])
@pytest.mark.parametrize("ratio", [0.3, 0.667, 0.9])
def test_matches_masked_reference(family, kind, attention, scope, ratio):
    model, inputs = model_for(family, attention), samples(family)[kind]
    reference = decoder_reference(model, ratio, scope=scope)
    with reference():
        expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=ratio, scope=scope)
    actual = generate(model, inputs, press)
    assert_same_generation(actual, expected, 1e-4)
    stats = press.last_stats[0]
    assert stats.halted_positions == reference.halted_per_sample[0]
    assert stats.tokens - stats.kept == len(stats.halted_positions) == round(ratio * stats.eligible) > 0
    ids = inputs["input_ids"][0]
    if scope == "vision":
        assert stats.eligible == int(torch.isin(ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])).sum())
        assert all(int(ids[t]) in (IMAGE_TOKEN, VIDEO_TOKEN) for t in stats.halted_positions)
    else:
        assert stats.eligible == len(ids) - 1  # protect_last=1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("method", list(SCORERS))
def test_padded_batch_sample_equals_sample_alone(family, attention, method):
    model = model_for(family, attention)
    batch, singles = batch_and_singles(family)
    press = DeltaPress(compression_ratio=0.667, method=method)
    batched = generate(model, batch, press, max_new_tokens=6)
    batch_stats = press.last_stats
    assert len({s.kept for s in batch_stats}) > 1  # samples keep different numbers of tokens
    length = batched.sequences.shape[1] - 6
    for b, sample in enumerate(singles):
        alone = generate(model, sample, press, max_new_tokens=6)
        assert torch.equal(batched.sequences[b, length:], alone.sequences[0, -6:])
        for step, (x, y) in enumerate(zip(batched.logits, alone.logits, strict=True)):
            assert relative_error(x[b], y[0]) <= 1e-4, f"sample {b} step {step}"
        single = press.last_stats[0]
        for field in ("tokens", "eligible", "kept", "decision_layer", "halted_positions", "kv_cache_bytes"):
            assert getattr(batch_stats[b], field) == getattr(single, field), field


def assert_batch_matches_reference(model, batch, singles, press, reference_for) -> None:
    """``press`` on a left-padded ``batch`` against ``reference_for(inputs)`` (a decoder reference of those inputs):
    the masked reference takes the batch whole, the subsequence one each sample alone (``singles``). Tokens, logits
    of every step, and halted positions (unpadded)."""
    actual = generate(model, batch, press)
    pads = [int((batch["attention_mask"][b] == 0).sum()) for b in range(len(singles))]
    reference = reference_for(batch)
    if not isinstance(reference, SubsequenceReference):
        with reference():
            expected = generate(model, batch)
        assert_same_generation(actual, expected, 1e-4)
        halted = [
            [t - pad for t in positions] for positions, pad in zip(reference.halted_per_sample, pads, strict=True)
        ]
        assert [stats.halted_positions for stats in press.last_stats] == halted
        return
    length = batch["input_ids"].shape[1]
    for b, sample in enumerate(singles):
        reference = reference_for(sample)
        with reference():
            expected = generate(model, sample)
        assert torch.equal(actual.sequences[b, length:], expected.sequences[0, -len(expected.logits) :])
        for step, (x, y) in enumerate(zip(actual.logits, expected.logits, strict=True)):
            assert relative_error(x[b], y[0]) <= 1e-4, f"sample {b} step {step}"
        assert press.last_stats[b].halted_positions == reference.halted_per_sample[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_reference(family):
    model = model_for(family, "sdpa")
    batch, singles = batch_and_singles(family)
    press = DeltaPress(compression_ratio=0.5)
    assert_batch_matches_reference(model, batch, singles, press, lambda inputs: decoder_reference(model, 0.5))


def record_token_counts(model):
    """Hooks recording how many tokens each layer's token mixer (attention, or a recurrent layer's linear attention)
    and FFN receive."""
    seen = {"attention": [], "mlp": []}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        mixer = layer.self_attn if hasattr(layer, "self_attn") else layer.linear_attn
        for name, module in (("attention", mixer), ("mlp", layer.mlp)):

            def hook(module, args, kwargs, name=name, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen[name].append((i, hidden.shape[1]))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("method", list(SCORERS))
def test_deeper_layers_run_on_kept_tokens_and_cache_is_compact(family, batched, method):
    model = model_for(family)
    batch, singles = batch_and_singles(family)
    inputs = batch if batched else singles[0]
    length = inputs["input_ids"].shape[1]
    press, new_tokens = DeltaPress(compression_ratio=0.667, method=method), 5
    seen, handles = record_token_counts(model)
    try:
        out = generate(model, inputs, press, max_new_tokens=new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    stats = press.last_stats
    s, num_layers = stats[0].decision_layer, len(model.model.language_model.layers)
    assert s == (1 if method == "fastv" else 2)  # fastv_layer 2 - 1; floor(0.4 * layers)
    slots = max(stat.kept for stat in stats)
    assert slots < length
    for name in ("attention", "mlp"):
        prefill = seen[name][:num_layers]
        assert prefill == [(i, length if i <= s else slots) for i in range(num_layers)], name
        assert all(tokens == 1 for _, tokens in seen[name][num_layers:])  # decode steps
    keys = cache_keys(out.past_key_values)
    decoded = new_tokens - 1  # the last generated token is never fed back
    assert [None if k is None else k.shape[-2] for k in keys] == [
        None if keys[i] is None else length + decoded if i <= s else slots + decoded for i in range(num_layers)
    ]
    assert sum(k is not None for k in keys) == num_layers - len(recurrent_layers(model))
    per_token = [0 if k is None else 2 * k.shape[1] * k.shape[-1] * 4 for k in keys]
    for stat in stats:
        expected = sum(size * (stat.tokens if i <= s else stat.kept) for i, size in enumerate(per_token))
        assert stat.kv_cache_bytes == expected
        assert stat.prefill_ms > 0


def recurrent_layers(model) -> list[int]:
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    return [index for index, kind in enumerate(kinds) if kind == "linear_attention"]


def cache_keys(cache) -> list[torch.Tensor | None]:
    """Each decoder layer's cached keys (``None`` for a recurrent layer): a ``DynamicCache``'s layers, or a hybrid
    cache's lists."""
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers]
    return [keys if keys is not None and keys.ndim == 4 else None for keys in cache.key_cache]


def forward_logits(model, family):
    inputs = samples(family)["images"]
    with torch.no_grad():
        return model(**inputs).logits


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("ratio", [0.0, 0.8])
@pytest.mark.parametrize("padded", [False, True])
def test_per_layer_hooks_run_only_in_a_halting_prefill(ratio, padded):
    """Decode steps, and a prefill at ratio 0, run the layers with no press hook. In a decode step on a halted cache
    the first deeper layer carries the cache's one-shot mask rewrite from the decision layer's cache update until it
    runs; in a padded batch (a mask to rewrite) it arms the next layer's as it runs, and so on; after an unpadded
    prompt nothing further. Between forwards, and after the block while the cache lives, the model carries no hook."""
    model = model_for("qwen2_vl")
    inputs = batch_and_singles("qwen2_vl")[0] if padded else samples("qwen2_vl")["image"]
    layers = model.model.language_model.layers
    decision = DeltaPress(compression_ratio=ratio).halting_config().decision_layer(len(layers))
    seen = {"decision": [], "next": [], "norm": []}

    def recorder(name):
        return lambda module, args: seen[name].append([len(layer._forward_pre_hooks) for layer in layers])

    recorders = [
        layers[decision].mlp.register_forward_pre_hook(recorder("decision")),
        layers[decision + 1].mlp.register_forward_pre_hook(recorder("next")),
        model.model.language_model.norm.register_forward_pre_hook(recorder("norm")),
    ]
    try:
        with torch.no_grad(), DeltaPress(compression_ratio=ratio)(model):
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    finally:
        for recorder_handle in recorders:
            recorder_handle.remove()
    halting = ratio > 0
    deeper = [int(halting and i > decision) for i in range(len(layers))]
    first = [int(halting and i == decision + 1) for i in range(len(layers))]
    second = [int(halting and padded and i == decision + 2) for i in range(len(layers))]
    none = [0] * len(layers)
    assert seen["decision"] == [deeper] + [first] * 3  # prefill: the press's hooks; decode: the first rewrite only
    assert seen["next"] == [deeper] + [second] * 3  # a mask to rewrite: the next layer's is armed as one runs
    assert seen["norm"] == [deeper] + [none] * 3  # the rewrites removed themselves as they ran
    assert hook_count(model) == 0 and output.past_key_values.get_seq_length() > 0  # no hook while the cache lives


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_restored_after_block_and_after_exception(family):
    model = model_for(family)
    before, hooks = forward_logits(model, family), hook_count(model)
    press = DeltaPress(compression_ratio=0.8)
    generate(model, samples(family)["images"], press)
    assert torch.equal(forward_logits(model, family), before)
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            with torch.no_grad():
                model(**samples(family)["images"])
            raise RuntimeError("boom")
    assert hook_count(model) == hooks
    assert torch.equal(forward_logits(model, family), before)
    bad = samples(family)["image"]
    bad["input_ids"] = torch.cat([bad["input_ids"], torch.full((1, 1), IMAGE_TOKEN)], -1)  # one token too many
    bad["attention_mask"] = torch.ones_like(bad["input_ids"])
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises when features and tokens disagree
        generate(model, bad, press)
    assert hook_count(model) == hooks
    assert torch.equal(forward_logits(model, family), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("inside_block", [True, False])
def test_next_turn_on_halted_cache_matches_reference(family, attention, inside_block):
    """A chat's next turn: a multi-token forward on the halted cache, then greedy decode steps by hand."""
    model, inputs = model_for(family, attention), samples(family)["image"]
    turn = torch.tensor([[5, 17, 29, 41, 53, 65]])

    def converse(prefill_context, outer_context):
        logits = []
        with torch.no_grad(), outer_context():
            with prefill_context():
                prefill = model(**inputs, use_cache=True)  # the family's own cache (a hybrid decoder has its own)
                logits.append(prefill.logits)
                cache = prefill.past_key_values
                if inside_block:
                    logits.append(model(input_ids=turn, past_key_values=cache).logits)
            if not inside_block:
                logits.append(model(input_ids=turn, past_key_values=cache).logits)
            token = logits[-1][:, -1:].argmax(-1)
            for _ in range(4):
                logits.append(model(input_ids=token, past_key_values=cache).logits)
                token = logits[-1][:, -1:].argmax(-1)
        return logits, cache

    reference = decoder_reference(model, 0.667)  # it has no cache to carry its decision: it wraps the whole chat
    expected, _ = converse(_null, reference)
    press = DeltaPress(compression_ratio=0.667)
    actual, cache = converse(lambda: press(model), _null)
    assert reference.halted.any()
    for step, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert relative_error(a[:, -1], b[:, -1]) <= 1e-4, f"forward {step}"
    assert relative_error(actual[0], expected[0]) <= 1e-4  # every prompt position, halted ones included
    assert torch.equal(actual[1].argmax(-1), expected[1].argmax(-1))
    kept = press.last_stats[0].kept
    assert [k for k in cache_keys(cache) if k is not None][-1].shape[-2] == kept + turn.shape[1] + 4


@pytest.mark.parametrize("family", FAMILIES)
def test_protect_mask_keeps_positions(family):
    model, inputs = model_for(family), samples(family)["image"]
    protect = inputs["input_ids"] == IMAGE_TOKEN
    protect[:, : protect.shape[1] // 2] = False  # protect the image tokens of the second half
    reference = decoder_reference(model, 0.667, protect=protect)
    with reference():
        expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=0.667)
    assert_same_generation(generate(model, inputs, press, protect=protect), expected, 1e-4)
    halted = press.last_stats[0].halted_positions
    assert halted and not protect[0, halted].any()
    assert press.last_stats[0].eligible == int((inputs["input_ids"] == IMAGE_TOKEN).sum() - protect.sum())
    with pytest.raises(ValueError, match="protect"):
        generate(model, inputs, press, protect=protect[:, :-1])


def test_clear_errors_for_unsupported_models_and_settings():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supported model types: .*qwen2_vl"):
        with DeltaPress()(gpt2):
            pass
    model = tiny_text_model("llama", attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation"):
        with DeltaPress()(model):
            pass
    with pytest.raises(ValueError, match="output_hidden_states"):
        with torch.no_grad(), DeltaPress()(model_for("qwen2_vl")):
            model_for("qwen2_vl")(**samples("qwen2_vl")["image"], output_hidden_states=True)
    assert hook_count(model_for("qwen2_vl")) == 0
    with pytest.raises(ValueError, match="scope='vision' needs a vision-language model"):
        with DeltaPress(scope="vision")(tiny_text_model()):
            pass


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_beam_search_reorders_the_halted_cache(family):
    model, (batch, _) = model_for(family), batch_and_singles(family)
    beams = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    reference = MaskedReference(model, 0.667)
    with torch.no_grad(), reference():
        expected = model.generate(**batch, **beams)
    with torch.no_grad(), DeltaPress(compression_ratio=0.667)(model):
        actual = model.generate(**batch, **beams)
    assert torch.equal(actual, expected)


def test_copied_halted_cache_continues_like_the_original():
    model, inputs = model_for("qwen2_vl"), samples("qwen2_vl")["images"]
    cache, turn = DynamicCache(), torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        with DeltaPress(compression_ratio=0.667)(model):
            model(**inputs, past_key_values=cache)
        copied = copy.deepcopy(cache)
        original_logits = model(input_ids=turn, past_key_values=cache).logits
        copied_logits = model(input_ids=turn, past_key_values=copied).logits
    assert type(copied.layers[-1]).__name__ == "HaltedLayer"
    assert copied.layers[-1].keys.shape == cache.layers[-1].keys.shape
    assert torch.equal(copied_logits, original_logits)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_random_baseline_is_seeded_per_sample(family):
    model = model_for(family, "sdpa")
    batch, singles = batch_and_singles(family)

    def halted(press, inputs):
        generate(model, inputs, press, max_new_tokens=2)
        return [stats.halted_positions for stats in press.last_stats]

    random_press = DeltaPress(compression_ratio=0.5, method="random", seed=7)
    in_batch = halted(random_press, batch)
    assert in_batch == [halted(random_press, sample)[0] for sample in singles]
    assert in_batch == halted(DeltaPress(compression_ratio=0.5, method="random", seed=7), batch)
    assert in_batch != halted(DeltaPress(compression_ratio=0.5, method="random", seed=8), batch)
    dash_press = DeltaPress(compression_ratio=0.5)
    assert in_batch != halted(dash_press, batch)
    for positions, stats in zip(in_batch, dash_press.last_stats, strict=True):
        assert len(positions) == round(0.5 * stats.eligible)  # as many as DASH halts
    with pytest.raises(ValueError, match="method must be one of"):
        DeltaPress(method="norm")


def test_layers_offloaded_by_accelerate(tmp_path):
    """A device map that offloads the deeper decoder layers to disk (accelerate's hooks move weights and inputs):
    the same tokens, logits and halted positions as the model in memory."""
    from accelerate import dispatch_model

    inputs = qwen_vl_sample([(1, 8, 8)], [5, 7], seed=1)
    press = DeltaPress(compression_ratio=0.5)
    expected = generate(tiny_qwen_vl(), inputs, press, max_new_tokens=6)
    expected_stats = press.last_stats
    device_map = {name: "cpu" for name in ("model.visual", "model.language_model.embed_tokens", "lm_head")}
    device_map |= {"model.language_model.rotary_emb": "cpu", "model.language_model.norm": "disk"}
    device_map |= {f"model.language_model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(5)}
    offloaded = dispatch_model(tiny_qwen_vl(), device_map=device_map, offload_dir=str(tmp_path))
    actual = generate(offloaded, inputs, press, max_new_tokens=6)
    assert_same_generation(actual, expected, 1e-6)
    assert press.last_stats[0].halted_positions == expected_stats[0].halted_positions
