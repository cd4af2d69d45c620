"""What Qwen3-VL adds to the Qwen family (DESIGN.md section 10): DeepStack's decoder layers below the decision layer
(refused through every entry point, exact at the boundary), DeepStack's taps of the vision tower seeing every patch
(against the masked vision reference, tap by tap), the mixture-of-experts decoder's routers and experts receiving only
the kept rows, and the timestamp text of a video that never halts. The generic tests (test_press_vlm.py,
test_vision.py, test_graphs.py, ...) take both model types through everything else."""

from __future__ import annotations

import pytest
import torch

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.checks import relative_error
from dash_vlm.checks.reference import MaskedReference, MaskedVisionReference
from dash_vlm.cli import main as cli_main
from dash_vlm.graphs import StaticDecoder
from dash_vlm.models.qwen3_vl import qwen3_vl_sample, tiny_qwen3_vl
from dash_vlm.models.tiny import left_pad_batch, tiny_checkpoint

GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
BLOCKS = 6  # vision decision block floor(0.3 * 6) = 1


def generate(model, inputs, press=None, max_new_tokens=4):
    with torch.no_grad():
        if press is None:
            return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **GREEDY)
        with press(model):
            return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **GREEDY)


def assert_same_generation(actual, expected, tolerance):
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert relative_error(a, b) <= tolerance, f"step {step}"


def image_batch() -> dict:
    return left_pad_batch(
        [
            qwen3_vl_sample([(1, 8, 8)], [5, 7], seed=1),
            qwen3_vl_sample([(1, 4, 8), (1, 8, 4)], [3, 2, 9], seed=2),
        ]
    )


@pytest.mark.parametrize(
    "fields, name, smallest",
    [
        (dict(start_ratio=0.4), "start_ratio", "0.6"),  # 5 layers, 3 DeepStack layers: the decision layer from 3
        (dict(start_ratio=0.5), "start_ratio", "0.6"),
        (dict(method="fastv", fastv_layer=2), "fastv_layer", "4"),
        (dict(method="random", start_ratio=0.2), "start_ratio", "0.6"),
    ],
)
def test_a_decision_layer_among_deepstack_layers_is_refused(fields, name, smallest):
    model = tiny_qwen3_vl(vision_layers=4, deepstack=[1, 2, 3])
    with pytest.raises(
        ValueError, match=rf"{name}=.*adds vision features .* decoder layers 0\.\.2.*at least {smallest}\b"
    ):
        with DeltaPress(compression_ratio=0.5, **fields)(model):
            pass
    allowed = type(DeltaPress.__dataclass_fields__[name].default)(smallest)
    assert DeltaPress(compression_ratio=0.5, **(fields | {name: allowed})).check_model(model.config) is None
    DeltaPress(compression_ratio=0.0, **fields).check_model(model.config)  # nothing halts: nothing to refuse


def test_the_deepstack_refusal_comes_before_loading_and_at_the_command_line(tmp_path, monkeypatch, capsys):
    model, processor = tiny_checkpoint("qwen3_vl", seed=0, vision_layers=4)
    model.config.vision_config.deepstack_visual_indexes = [1, 2, 3]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", no_weights)
    with pytest.raises(ValueError, match="start_ratio must be at least 0.6"):
        DashVLM.from_pretrained(tmp_path, start_ratio=0.4)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", str(tmp_path), "--prompt", "x", "--start-ratio", "0.4"])
    assert exit_info.value.code == 2
    assert "start_ratio must be at least 0.6" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_decision_layer_right_above_deepstack_matches_the_masked_reference(attention):
    """Two DeepStack layers (0 and 1) and the decision layer 2: the last addition comes before any token halts."""
    model = tiny_qwen3_vl(attn_implementation=attention, deepstack=[0, 1])
    inputs = image_batch()
    press = DeltaPress(compression_ratio=0.667)
    reference = MaskedReference(model, 0.667)
    with reference():
        expected = generate(model, inputs)
    assert_same_generation(generate(model, inputs, press), expected, 1e-4)
    assert [stat.halted_positions for stat in press.last_stats] == [
        [t - int((inputs["attention_mask"][b] == 0).sum()) for t in halted]
        for b, halted in enumerate(reference.halted_per_sample)
    ]
    assert all(stat.decision_layer == 2 and stat.kept < stat.tokens for stat in press.last_stats)


def test_the_fast_path_adds_every_deepstack_layer_and_reuses_its_graph():
    """Two DeepStack layers in the captured prefill (uncaptured here: the same buffers and work), with decoder and
    tower halting, against eager ``generate``; prompts of one bucket but different image sizes share one graph."""
    model = tiny_qwen3_vl(deepstack=[0, 1])
    model.generation_config.eos_token_id = None  # eager generate's min_new_tokens would mask it, the fast path not
    press = DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5)
    decoder = StaticDecoder(model, capture=False, prefill_bucket=64)
    singles = [
        qwen3_vl_sample([(1, 8, 8)], [5, 7], seed=11),
        qwen3_vl_sample([(1, 4, 4)], [2, 3], seed=12),
        qwen3_vl_sample([(1, 4, 8), (1, 8, 8)], [3, 4, 6], seed=13),
    ]
    for inputs in [*singles, left_pad_batch(singles)]:
        fast = decoder.generate(inputs, press, 4, keep_logits=True, stop_at_end=False)
        eager = generate(model, inputs, press)
        assert torch.equal(fast.tokens, eager.sequences[:, inputs["input_ids"].shape[1] :])
        for step, (a, b) in enumerate(zip(fast.logits, eager.logits, strict=True)):
            assert relative_error(a, b) <= 1e-4, f"step {step}"
    shapes = list(decoder.prefill_graphs)
    assert [shape.additions for shape in shapes] == [(2, 64), (2, 64)]  # 16, 4 and 24 rows; the batch's 44
    assert [shape.batch for shape in shapes] == [1, 3]


def record_tap_inputs(model) -> tuple[dict, list]:
    """What each DeepStack merger consumes (a forward hook sees its input after every pre-hook)."""
    seen, handles = {}, []
    tower = model.model.visual
    for index, merger in zip(tower.deepstack_visual_indexes, tower.deepstack_merger_list, strict=True):

        def record(module, args, output, index=index):
            seen.setdefault(index, []).append(args[0].clone())

        handles.append(merger.register_forward_hook(record))
    return seen, handles


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["images", "video"])
def test_every_tap_sees_every_patch_as_the_masked_reference_does(attention, kind):
    """Taps at the decision block (1), at a compact block (3) and at the last block (5): each reads every patch, the
    halted ones at their decision-block state, as in the masked reference (decoder ratio 0: three DeepStack layers)."""
    model = tiny_qwen3_vl(attn_implementation=attention, vision_layers=BLOCKS, deepstack=[1, 3, 5])
    if kind == "images":
        inputs = qwen3_vl_sample([(1, 4, 8), (1, 8, 12)], [3, 2, 9], seed=2)
    else:
        inputs = qwen3_vl_sample([(3, 8, 4)], [4, 6], video=True, seed=3)
    patches = int(inputs.get("image_grid_thw", inputs.get("video_grid_thw")).prod(-1).sum())
    reference = MaskedVisionReference(model, 0.5)
    seen_reference, handles = record_tap_inputs(model)
    try:
        with reference():
            expected = generate(model, inputs, max_new_tokens=2)
    finally:
        for handle in handles:
            handle.remove()
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5)
    seen, handles = record_tap_inputs(model)
    try:
        actual = generate(model, inputs, press, max_new_tokens=2)
    finally:
        for handle in handles:
            handle.remove()
    assert_same_generation(actual, expected, 1e-4)
    assert press.last_stats[0].vision_kept < press.last_stats[0].vision_patches == patches
    for index in (1, 3, 5):
        prefill, prefill_reference = seen[index][0], seen_reference[index][0]
        assert prefill.shape[0] == patches  # every patch, though block 3 ran on the kept ones
        assert relative_error(prefill, prefill_reference) <= 1e-4, f"tap of block {index}"
    assert all(not module._forward_pre_hooks for module in model.model.visual.deepstack_merger_list)


def record_moe_rows(model) -> tuple[dict, list]:
    """Rows reaching each sparse block's router and experts, per layer, in order."""
    seen, handles = {"router": [], "experts": []}, []
    for index, layer in enumerate(model.model.language_model.layers):
        for name, module in (("router", layer.mlp.gate), ("experts", layer.mlp.experts)):
            handles.append(
                module.register_forward_pre_hook(
                    lambda module, args, name=name, index=index: seen[name].append((index, args[0].shape[0]))
                )
            )
    return seen, handles


@pytest.mark.parametrize("batched", [False, True])
def test_halted_tokens_reach_no_router_and_no_expert(batched):
    model = tiny_qwen3_vl("qwen3_vl_moe")
    inputs = image_batch() if batched else qwen3_vl_sample([(1, 8, 8)], [5, 7], seed=1)
    batch, length = inputs["input_ids"].shape
    press = DeltaPress(compression_ratio=0.667)
    seen, handles = record_moe_rows(model)
    try:
        generate(model, inputs, press, max_new_tokens=2)
    finally:
        for handle in handles:
            handle.remove()
    layers = len(model.model.language_model.layers)
    s, slots = press.last_stats[0].decision_layer, max(stat.kept for stat in press.last_stats)
    assert s == 2 and slots < length
    for name in ("router", "experts"):
        prefill = seen[name][:layers]
        assert prefill == [(i, batch * (length if i <= s else slots)) for i in range(layers)], name
        assert all(rows == batch for _, rows in seen[name][layers:])  # the decode step: one token a sample


@pytest.mark.parametrize("experts", ["eager", "batched_mm", "grouped_mm"])
def test_moe_matches_transformers_and_the_reference_with_each_experts_implementation(experts):
    model = tiny_qwen3_vl("qwen3_vl_moe")
    if experts == "grouped_mm":
        try:
            model._grouped_mm_can_dispatch()
        except (ImportError, ValueError) as error:
            pytest.skip(f"transformers' grouped_mm cannot run here: {error}")
    model.set_experts_implementation(experts)
    assert model.model.language_model.layers[0].mlp.experts.config._experts_implementation == experts
    inputs = image_batch()
    expected = generate(model, inputs)
    zero = generate(model, inputs, DeltaPress(compression_ratio=0.0))
    assert torch.equal(zero.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(zero.logits, expected.logits, strict=True))
    reference = MaskedReference(model, 0.667)
    with reference():
        expected = generate(model, inputs)
    assert_same_generation(generate(model, inputs, DeltaPress(compression_ratio=0.667)), expected, 1e-4)


def test_a_videos_timestamps_never_halt():
    """Through Qwen3-VL's real processor: the timestamp texts before each frame group are text, never eligible
    under the vision scope; the frame tokens are, and only they halt."""
    import numpy as np
    from PIL import Image

    from dash_vlm.models import adapter_for

    model, processor = tiny_checkpoint("qwen3_vl", seed=0)
    frames = [Image.fromarray(np.full((32, 48, 3), 20 * i, np.uint8)) for i in range(6)]
    chat = [[{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what"}]}]]
    inputs = dict(adapter_for("qwen3_vl").processor_inputs(processor, chat))
    ids = inputs["input_ids"][0]
    text = [processor.tokenizer.convert_ids_to_tokens(int(token)) for token in ids]
    stamps = [t for t, token in enumerate(text) if token == "seconds"]
    frame_tokens = (ids == model.config.video_token_id).nonzero()[:, 0].tolist()
    assert len(stamps) == 3 and len(frame_tokens) == 3 * 24  # 3 frame groups of 8 x 12 patches, 4 x 6 tokens
    press = DeltaPress(compression_ratio=0.9)
    generate(model, inputs, press, max_new_tokens=1)
    stats = press.last_stats[0]
    assert stats.eligible == len(frame_tokens)
    assert len(stats.halted_positions) == round(0.9 * len(frame_tokens))
    assert set(stats.halted_positions) <= set(frame_tokens) and not set(stats.halted_positions) & set(stamps)


def test_a_decoded_videos_timestamps_follow_its_frames(tmp_path):
    """``generate(video=file)`` decodes at 2 frames a second and keeps ``max_frames`` evenly spaced: the timestamps
    the processor writes before each frame group follow the kept frames' times (at their mean rate, so to within their
    uneven spacing), not those of 2 frames a second (0.25 and 1.25 s here)."""
    import re

    import av
    import numpy as np

    model, processor = tiny_checkpoint("qwen3_vl", seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:  # 16 frames at 4 a second: read at 2 a second, frames 0, 2, ..., 14
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * index, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    vlm = DashVLM.from_pretrained(tmp_path / "model", compression_ratio=0.5)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("ids", kwargs["input_ids"][0])

    handle = vlm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        vlm.generate(video=str(path), prompt="what", max_frames=4, max_new_tokens=1)
    finally:
        handle.remove()
    text = vlm.processor.tokenizer.decode(seen["ids"])
    stamps = [float(f"{whole}.{tenth}") for whole, tenth in re.findall(r"< (\d+) \. (\d) seconds >", text)]
    # kept: frames 0, 4, 8 and 14 of the file (0, 1, 2 and 3.5 s); a group's true time is its two frames' mean, and
    # the stamps (0.6 and 2.9 s) take the kept frames as evenly spaced at their mean rate, 0.857 a second
    assert stamps == pytest.approx([0.5, 2.75], abs=0.2)


def test_a_scorer_of_no_single_field_is_refused_by_its_method(monkeypatch):
    """A method whose decision layer no one press field places (a scorer without ``setting_for_layer``) is named
    with the layer it must reach."""
    from dataclasses import dataclass

    from dash_vlm.scorers import SCORERS, Scorer

    @dataclass(frozen=True)
    class FirstLayer(Scorer):
        reads = ("attention_output",)

        def layer(self, num_layers: int) -> int:
            return 0

        def score(self, reading):
            return reading.attention_output.float().norm(dim=-1)

    monkeypatch.setitem(SCORERS, "first_layer", FirstLayer)
    model = tiny_qwen3_vl()
    with pytest.raises(ValueError, match=r"method='first_layer' .* its decision layer must be at least 1 for this"):
        DeltaPress(compression_ratio=0.5, method="first_layer").check_model(model.config)
