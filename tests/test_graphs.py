"""The fast path's static decode (DESIGN.md section 8) with capture off: the same greedy tokens and logits as
``generate`` on the eager path, vanilla and halted, for every vision-language family."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dash_vlm import DeltaPress
from dash_vlm.cache import HaltedLayer
from dash_vlm.checks import relative_error
from dash_vlm.graphs import BUCKET, GROUPED_DECODE, StaticDecoder, bucket, grouped_decode_attention
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.text import tiny_text_model

HYBRID = model_types_with("hybrid_decoder")  # refused by the fast path (DESIGN.md section 11 item 6)
FAMILIES = [family for family in model_types_with("is_vision_language") if family not in HYBRID]
STEPS = 6
PRESSES = {
    "vanilla": None,
    "vision": DeltaPress(compression_ratio=0.5),
    "all": DeltaPress(compression_ratio=0.667, scope="all"),
    "fastv": DeltaPress(compression_ratio=0.5, method="fastv"),
    "layer_delta": DeltaPress(compression_ratio=0.5, method="layer_delta"),
    "per_row": DeltaPress(compression_ratio=0.5, selection="per_row"),
    "per_frame": DeltaPress(compression_ratio=0.5, selection="per_frame"),
}


def eager_generation(model, inputs, press):
    context = press(model) if press is not None else torch.no_grad()
    with torch.inference_mode(), context:
        return model.generate(
            **inputs,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def assert_same(fast, eager, prompt_length):
    assert torch.equal(fast.tokens, eager.sequences[:, prompt_length:])
    assert len(fast.logits) == len(eager.logits) == STEPS
    for step, (a, b) in enumerate(zip(fast.logits, eager.logits, strict=True)):
        assert relative_error(a, b) <= 1e-4, f"step {step}"


def cases(family):
    adapter = adapter_for(family)
    batch, _ = adapter.tiny_batch(family)
    return {"padded batch": batch} | adapter.tiny_inputs(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("press_name", list(PRESSES))
def test_static_decode_equals_eager_generate(family, attention, press_name):
    model = adapter_for(family).tiny_model(family, attention)
    decoder = StaticDecoder(model, capture=False)
    press = PRESSES[press_name]
    for kind, inputs in cases(family).items():
        fast = decoder.generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
        assert_same(fast, eager_generation(model, inputs, press), inputs["input_ids"].shape[1])
        if press is not None:
            stats = press.last_stats
            assert any(s.kept < s.tokens for s in stats), kind
    tables = decoder.tower_tables
    assert tables.grid_reads == 0  # every grid was read once, on the host, before the model ran
    assert bool(tables.tables) == bool(adapter_for(family).vision_grid_keys)


@pytest.mark.parametrize(
    "family", [family for family in model_types_with("halts_in_vision_tower") if family not in HYBRID]
)
def test_static_decode_with_vision_tower_halting(family):
    model = adapter_for(family).tiny_model(family)
    press = DeltaPress(compression_ratio=0.5, vision_compression_ratio=0.5)
    for inputs in cases(family).values():
        fast = StaticDecoder(model, capture=False).generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
        assert_same(fast, eager_generation(model, inputs, press), inputs["input_ids"].shape[1])


def test_text_model_static_decode():
    model = tiny_text_model("llama")
    inputs = {"input_ids": torch.randint(2, 100, (2, 40)), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    inputs["attention_mask"][1, :7] = 0
    for press in (None, DeltaPress(compression_ratio=0.5)):
        fast = StaticDecoder(model, capture=False).generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
        assert_same(fast, eager_generation(model, inputs, press), 40)


def test_static_cache_lengths_and_graph_reuse():
    family = "qwen2_vl"
    model = adapter_for(family).tiny_model(family)
    decoder = StaticDecoder(model, capture=False, max_graphs=1)
    batch, singles = adapter_for(family).tiny_batch(family)
    press = DeltaPress(compression_ratio=0.5)
    decoder.generate(batch, press, STEPS, stop_at_end=False)
    graph = next(iter(decoder.graphs.values()))
    kept = max(s.kept for s in press.last_stats)
    tokens = batch["input_ids"].shape[1]
    layers = adapter_for(model).decoder_layers(model)
    decision = press.decision_layer(len(layers))
    lengths = [layer.max_cache_len for layer in graph.cache.layers]
    assert lengths == [bucket(tokens) + STEPS] * (decision + 1) + [bucket(kept) + STEPS] * (len(layers) - decision - 1)
    assert bucket(1) == bucket(BUCKET) == BUCKET and bucket(BUCKET + 1) == 2 * BUCKET
    decoder.generate(singles[0], press, STEPS, stop_at_end=False)  # batch 1: another shape
    assert [shape.batch for shape in decoder.graphs] == [1]  # the batch's shape was dropped, least recently used


@pytest.mark.parametrize("family", FAMILIES)
def test_bucketed_prefill_runs_deeper_layers_on_the_kept_slots(family):
    """The prefill's graph pads the prompt and the kept slots to the prefill bucket: every layer up to the decision
    layer runs on the padded prompt, every layer above on the padded kept slots, without a mask (causal attention
    keeps the real tokens from the trailing padding and filler), and the answers stay the eager ones."""
    model = adapter_for(family).tiny_model(family)
    layers = adapter_for(model).decoder_layers(model)
    press = DeltaPress(compression_ratio=0.667, scope="all")
    decision = press.decision_layer(len(layers))
    decoder = StaticDecoder(model, capture=False, prefill_bucket=8)
    _, singles = adapter_for(family).tiny_batch(family)
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].shape[1], kwargs["attention_mask"] is None))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        for inputs in singles:
            seen.clear()
            fast = decoder.generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
            tokens, kept = press.last_stats[0].tokens, press.last_stats[0].kept
            padded, slots = bucket(tokens, 8), bucket(kept, 8)
            prefill = seen[: len(layers)]  # a prompt alone has no padding: no layer needs a mask (trailing filler)
            assert prefill == [(padded, True)] * (decision + 1) + [(slots, True)] * (len(layers) - decision - 1)
            assert slots < padded
            assert_same(fast, eager_generation(model, inputs, press), tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert {shape.length for shape in decoder.prefill_graphs} == {bucket(s["input_ids"].shape[1], 8) for s in singles}


def test_prefill_graph_replays_a_second_prompt_of_its_shape():
    """Two prompts of one shape share a graph's buffers: the second's answer is its own eager answer."""
    family = "qwen2_vl"
    model = adapter_for(family).tiny_model(family)
    decoder = StaticDecoder(model, capture=False, prefill_bucket=64)
    press = DeltaPress(compression_ratio=0.5)
    _, singles = adapter_for(family).tiny_batch(family)
    for inputs in singles:
        fast = decoder.generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
        assert_same(fast, eager_generation(model, inputs, press), inputs["input_ids"].shape[1])
    assert len(decoder.prefill_graphs) == 1


@pytest.mark.parametrize("kind", ["boolean", "additive"])
def test_grouped_decode_attention_equals_repeated_key_value_heads(kind):
    torch.manual_seed(0)
    batch, heads, key_value_heads, slots, dim = 3, 8, 2, 37, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // key_value_heads, True
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(2, batch, key_value_heads, slots, dim).unbind(0)
    mask = torch.rand(batch, 1, 1, slots) < 0.6
    mask[..., -1] = True  # the new token's own slot
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    grouped, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    repeated, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)  # transformers' repeat_kv
    assert grouped.shape == repeated.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-6)
    prompt = torch.randn(batch, heads, 5, dim)  # several query tokens: transformers' function, unchanged
    expected, _ = sdpa_attention_forward(module, prompt, key, value, None)
    torch.testing.assert_close(grouped_decode_attention(module, prompt, key, value, None)[0], expected)


def test_decode_steps_run_grouped_attention_and_restore_the_attention_setting(monkeypatch):
    family = "qwen2_vl"
    model = adapter_for(family).tiny_model(family)
    config = adapter_for(model).decoder(model).config
    layers = len(adapter_for(model).decoder_layers(model))
    inputs = adapter_for(family).tiny_inputs(family)["image"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])  # the query tokens
        if len(calls) > layers * (STEPS - 1):
            raise RuntimeError("attention failed")
        return grouped_decode_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, GROUPED_DECODE, counted)
    decoder = StaticDecoder(model, capture=False)
    decoder.generate(inputs, None, STEPS, stop_at_end=False)
    assert calls == [1] * layers * (STEPS - 1)  # every layer of every decode step, one query token each
    assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="attention failed"):
        decoder.generate(inputs, None, STEPS, stop_at_end=False)
    assert config._attn_implementation == "sdpa"


def test_decoder_layers_are_restored_and_no_graph_kept_when_a_prefill_fails():
    family = "llava"
    model = adapter_for(family).tiny_model(family)
    decoder_module = adapter_for(model).decoder(model)
    layers = decoder_module.layers
    inputs = adapter_for(family).tiny_inputs(family)["image"]
    press = DeltaPress(compression_ratio=0.5)

    def fail(*args, **kwargs):
        raise RuntimeError("layer failed")

    layers[-1].forward = fail
    decoder = StaticDecoder(model, capture=False)
    with pytest.raises(RuntimeError, match="layer failed"):
        decoder.generate(inputs, press, STEPS)
    del layers[-1].forward
    assert decoder_module.layers is layers
    assert not decoder.prefill_graphs  # a graph that failed is not kept for the next prompt of its shape
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    fast = StaticDecoder(model, capture=False).generate(inputs, press, STEPS, keep_logits=True, stop_at_end=False)
    assert_same(fast, eager_generation(model, inputs, press), inputs["input_ids"].shape[1])


def test_prefill_cache_is_halted_where_the_press_halts():
    family = "llava"
    model = adapter_for(family).tiny_model(family)
    inputs = adapter_for(family).tiny_inputs(family)["image"]
    cache, _, _ = StaticDecoder(model, capture=False).prefill(inputs, DeltaPress(compression_ratio=0.5))
    decision = DeltaPress().decision_layer(len(cache.layers))
    assert [isinstance(layer, HaltedLayer) for layer in cache.layers] == [
        i > decision for i in range(len(cache.layers))
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(capture=True), "cuda_graphs needs the model on a CUDA GPU; it is on cpu"),
        (dict(capture=False, max_graphs=0), "max_graphs must be an int >= 1"),
    ],
)
def test_static_decoder_errors(kwargs, match):
    model = adapter_for("llava").tiny_model("llava")
    with pytest.raises(ValueError, match=match):
        StaticDecoder(model, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        StaticDecoder(model, capture=False).generate(adapter_for("llava").tiny_inputs("llava")["image"], None, 0)


def test_dashvlm_fast_path_gives_the_eager_answers_and_statistics():
    """DashVLM's fast path (its StaticDecoder run without capture on this CPU) against its eager generate."""
    from dash_vlm import DashVLM
    from dash_vlm.shapes.data import read_test_split
    from dash_vlm.shapes.evaluate import model_folder

    samples = read_test_split()[:6]
    images, questions = [s.image for s in samples], [s.question for s in samples]
    for halting in (dict(compression_ratio=0.0), dict(compression_ratio=0.667, vision_compression_ratio=0.5)):
        vlm = DashVLM.from_pretrained(model_folder("qwen2-vl"), device_map="cpu", **halting)
        eager = vlm.generate(image=images, prompt=questions, max_new_tokens=4)
        vlm.fast = StaticDecoder(vlm.model, capture=False)
        fast = vlm.generate(image=images, prompt=questions, max_new_tokens=4)
        assert [r.text for r in fast] == [r.text for r in eager]
        assert [r.generated_tokens for r in fast] == [r.generated_tokens for r in eager]
        for a, b in zip(fast, eager, strict=True):
            assert (a.stats.kept, a.stats.halted_positions, a.stats.vision_kept) == (
                b.stats.kept,
                b.stats.halted_positions,
                b.stats.vision_kept,
            )
        with pytest.raises(ValueError, match="cuda_graphs=True decodes greedily; it does not take \\{'do_sample'"):
            vlm.generate(image=images[0], prompt=questions[0], do_sample=True)


def test_cuda_graphs_switch_errors(monkeypatch, capsys):
    from dash_vlm import DashVLM
    from dash_vlm.cli import main as cli_main
    from dash_vlm.lmms.models import DashQwen2VL
    from dash_vlm.shapes.evaluate import model_folder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = model_folder("qwen2-vl")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA GPU; this machine has none"):
        DashVLM.from_pretrained(folder, cuda_graphs=True)
    with pytest.raises(SystemExit) as exit_info:  # a usage error
        cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--cuda-graphs"])
    assert exit_info.value.code == 2 and "cuda_graphs=True needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA GPU"):
        DashQwen2VL(pretrained=str(folder), cuda_graphs="true")
    with pytest.raises(ValueError, match="cuda_graphs must be true or false, got 'maybe'"):
        DashQwen2VL(pretrained=str(folder), cuda_graphs="maybe")
    vlm = DashVLM.from_pretrained(folder, device_map="cpu")
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        DashVLM(vlm.model, vlm.processor, cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA GPU; it is on cpu"):
        DashVLM(vlm.model, vlm.processor, cuda_graphs=True)


def test_repetition_penalty_of_the_generation_config_is_applied():
    """Qwen2-VL's instruct checkpoints set repetition_penalty=1.05: the fast path scores as generate does."""
    family = "qwen2_vl"
    model = adapter_for(family).tiny_model(family)
    model.generation_config.repetition_penalty = 1.3
    try:
        for inputs in cases(family).values():
            with torch.inference_mode():
                eager = model.generate(
                    **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True,
                    return_dict_in_generate=True,
                )  # fmt: skip
            fast = StaticDecoder(model, capture=False).generate(
                inputs, None, STEPS, keep_logits=True, stop_at_end=False
            )
            assert torch.equal(fast.tokens, eager.sequences[:, inputs["input_ids"].shape[1] :])
            for a, b in zip(fast.logits, eager.scores, strict=True):
                kept = b.isfinite()  # generate's min_new_tokens sets the end token's score to -inf
                assert relative_error(a[kept], b[kept]) <= 1e-4
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_unsupported_generation_settings_are_refused():
    model = adapter_for("llava").tiny_model("llava")
    model.generation_config.no_repeat_ngram_size = 3
    with pytest.raises(NotImplementedError, match="no_repeat_ngram_size"):
        StaticDecoder(model, capture=False)


def test_generation_stops_once_every_sample_has_ended():
    from dash_vlm import DashVLM
    from dash_vlm.graphs import CHUNK
    from dash_vlm.shapes.data import read_test_split
    from dash_vlm.shapes.evaluate import model_folder

    samples = read_test_split()[:4]
    vlm = DashVLM.from_pretrained(model_folder("qwen2-vl"), device_map="cpu")
    inputs = vlm.adapter.processor_inputs(
        vlm.processor,
        [[{"role": "user", "content": [{"type": "image", "image": s.image}, {"type": "text", "text": s.question}]}]
         for s in samples],
    )  # fmt: skip
    output = StaticDecoder(vlm.model, capture=False).generate(dict(inputs), vlm.press, 64)
    assert output.tokens.shape[1] <= 1 + CHUNK  # the answers are a word and an end token: one chunk, not 64 steps
    eos = vlm.model.generation_config.eos_token_id
    assert all(torch.isin(row, torch.tensor(eos).flatten()).any() for row in output.tokens)


TABLE_FAMILIES = [family for family in model_types_with("is_vision_language") if adapter_for(family).vision_grid_keys]


def tower_outputs(model, sample: dict) -> list[torch.Tensor]:
    """The tower's output for each kind of visual input of ``sample``: its merged tokens, last hidden state and
    DeepStack features."""
    tower = adapter_for(model).vision_tower(model)
    outputs = []
    for pixels_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if sample.get(grid_key) is not None:
            with torch.inference_mode():
                output = tower(sample[pixels_key], grid_thw=sample[grid_key])
            outputs += [output.pooler_output, output.last_hidden_state, *getattr(output, "deepstack_features", [])]
    return outputs


@pytest.mark.parametrize("family", TABLE_FAMILIES)
@pytest.mark.parametrize("vision_ratio", [0.0, 0.5])
def test_tower_on_its_tables_equals_its_own_forward(family, vision_ratio):
    """The fast path's tower (tables made once per grid from the host grid) against transformers' forward, with and
    without halting inside the tower; the tables are made once per grid and the tower's forward is restored."""
    from dash_vlm.tower import TowerTables

    adapter = adapter_for(family)
    model = adapter.tiny_model(family, vision_layers=4)
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=vision_ratio)
    tables = TowerTables(model)
    tower = adapter.vision_tower(model)
    for kind, sample in adapter.tiny_inputs(family).items():
        with press(model):
            expected = tower_outputs(model, sample)
            with tables.installed(sample):
                assert "forward" in vars(tower)
                got = tower_outputs(model, sample)
                made = dict(tables.tables)
                assert tower_outputs(model, sample) and all(tables.tables[grid] is made[grid] for grid in made)
        assert "forward" not in vars(tower), kind
        assert len(got) == len(expected) and tables.grid_reads == 0
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and relative_error(a, b) <= 1e-5, kind
        halted = not torch.equal(tower_outputs(model, sample)[0], expected[0])  # against the tower without the press
        assert halted == (vision_ratio > 0), kind


def test_tower_forward_is_restored_when_the_tower_fails():
    from dash_vlm.tower import TowerTables

    family = TABLE_FAMILIES[0]
    adapter = adapter_for(family)
    model = adapter.tiny_model(family)
    sample = adapter.tiny_inputs(family)["image"]
    tables = TowerTables(model)
    tower = adapter.vision_tower(model)
    with pytest.raises(RuntimeError), tables.installed(sample):
        tower(sample["pixel_values"][:-1], sample["image_grid_thw"])  # one patch short of its grid
    assert "forward" not in vars(tower) and not tower._forward_pre_hooks
    with tables.installed(sample):  # the grid given by position
        by_position = tower(sample["pixel_values"], sample["image_grid_thw"]).pooler_output
    assert torch.equal(by_position, tower_outputs(model, sample)[0])
    asked = dict(output_hidden_states=True, return_dict=True)  # only transformers' own forward records these
    with tables.installed(sample):
        recorded = tower(sample["pixel_values"], grid_thw=sample["image_grid_thw"], **asked)
    assert len(recorded.hidden_states) == len(adapter.vision_blocks(model)) + 1
    assert torch.equal(recorded.pooler_output, by_position) and tables.grid_reads == 0
    with tables.installed({}):  # a grid the tables were not given is read, and counted
        tower(sample["pixel_values"], grid_thw=sample["image_grid_thw"])
    assert tables.grid_reads == 1
