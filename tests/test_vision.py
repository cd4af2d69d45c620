"""Halting inside the vision tower (DESIGN.md section 6) on tiny Qwen2-VL and Qwen2.5-VL: against the unmodified
model, the masked vision reference (alone and composed with the decoder's), each sample alone, and each image or
frame group alone."""

import math
from functools import cache

import pytest
import torch

from dash_vlm import DeltaPress
from dash_vlm.checks import relative_error
from dash_vlm.checks.reference import MaskedVisionReference, decoder_reference
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.tiny import left_pad_batch
from dash_vlm.scorers import SCORERS

FAMILIES = model_types_with("halts_in_vision_tower")
ATTENTION = ["sdpa", "eager"]
BLOCKS = 6  # decision block floor(0.3 * 6) = 1; Qwen2.5-VL: full attention in block 5, 16-patch windows else
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@cache
def model_for(family: str, attention: str = "sdpa"):
    return adapter_for(family).tiny_model(family, attention, vision_layers=BLOCKS)


def sample(family: str, grids: list[tuple[int, int, int]], text_lengths: list[int], video=False, seed=0) -> dict:
    return adapter_for(family).tiny_sample(family, grids, text_lengths, video, seed)


SAMPLES = {
    "image": lambda family: sample(family, [(1, 8, 8)], [5, 7], seed=1),
    "images": lambda family: sample(family, [(1, 4, 8), (1, 8, 12)], [3, 2, 9], seed=2),
    "video": lambda family: sample(family, [(3, 8, 4)], [4, 6], video=True, seed=3),
}


def generate(model, inputs, press=None, max_new_tokens=4):
    context = press(model) if press is not None else torch.no_grad()
    with torch.no_grad(), context:
        return model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **GREEDY)


def assert_same_generation(actual, expected, tolerance):
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert relative_error(a, b) <= tolerance, f"step {step}"


def segments(inputs: dict) -> list[int]:
    grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
    return [h * w for t, h, w in grid.tolist() for _ in range(t)]


def kept_patches(lengths: list[int], ratio: float) -> int:
    """DESIGN.md section 6, written out: per segment of n patches, min(round(ratio n), n - 1) halt."""
    return sum(n - min(round(ratio * n), n - 1) for n in lengths)


def hook_counts(module: torch.nn.Module) -> tuple[int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_vision_ratio_zero_equals_unmodified_tower(family, kind):
    model, inputs = model_for(family), SAMPLES[kind](family)
    expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.0)
    with torch.no_grad(), press(model):
        assert hook_counts(model.model.visual) == (0, 0)  # the tower is left alone: no hook at all
        actual = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY)
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(actual.logits, expected.logits, strict=True))
    stats = press.last_stats[0]
    assert stats.vision_patches == stats.vision_kept == sum(segments(inputs))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("kind", list(SAMPLES))
@pytest.mark.parametrize("decoder_ratio", [0.0, 0.5])
def test_matches_masked_reference(family, attention, kind, decoder_ratio):
    model, inputs = model_for(family, attention), SAMPLES[kind](family)
    vision = MaskedVisionReference(model, 0.5)
    decoder = decoder_reference(model, decoder_ratio)
    with vision(), decoder():
        expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=decoder_ratio, vision_compression_ratio=0.5)
    assert_same_generation(generate(model, inputs, press), expected, 1e-4)
    stats = press.last_stats[0]
    assert stats.vision_patches == sum(segments(inputs)) == vision.halted_per_pass[0].numel()
    assert stats.vision_kept == kept_patches(segments(inputs), 0.5) == int((~vision.halted_per_pass[0]).sum())
    if decoder_ratio:
        assert stats.halted_positions == decoder.halted_per_sample[0]


def record_block_inputs(model):
    """Hooks recording how many patches each vision block's attention and MLP receive, and its segment lengths."""
    seen = {"attention": [], "mlp": [], "segments": []}
    handles = []
    for i, block in enumerate(model.model.visual.blocks):

        def on_attention(module, args, kwargs, i=i):
            seen["attention"].append((i, (args[0] if args else kwargs["hidden_states"]).shape[0]))
            lengths = kwargs["cu_seqlens"].diff()
            seen["segments"].append((i, lengths.tolist()))

        def on_mlp(module, args, i=i):
            seen["mlp"].append((i, args[0].shape[0]))

        handles.append(block.attn.register_forward_pre_hook(on_attention, with_kwargs=True))
        handles.append(block.mlp.register_forward_pre_hook(on_mlp))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.5, 0.95])
def test_blocks_above_the_decision_block_run_on_the_kept_patches(family, ratio):
    model, inputs = model_for(family), SAMPLES["images"](family)
    patches, kept = sum(segments(inputs)), kept_patches(segments(inputs), ratio)
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=ratio)
    seen, handles = record_block_inputs(model)
    try:
        with torch.no_grad(), press(model):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    decision = math.floor(0.3 * BLOCKS)
    expected = [(i, patches if i <= decision else kept) for i in range(BLOCKS)]
    assert seen["attention"] == seen["mlp"] == expected
    for i, lengths in seen["segments"]:
        assert sum(lengths) == (patches if i <= decision else kept)
        assert min(lengths) > 0  # a window left without a kept patch is dropped
    assert press.last_stats[0].vision_kept == kept
    if family == "qwen2_5_vl" and ratio == 0.95:  # 3 patches of 32, 5 of 96 stay: some 16-patch windows lose all
        windows_below = dict(seen["segments"])[0]
        windows_above = dict(seen["segments"])[BLOCKS - 2]
        assert len(windows_above) < len(windows_below)


@pytest.mark.parametrize("family", FAMILIES)
def test_window_dropping_matches_masked_reference(family):
    model, inputs = model_for(family, "eager"), SAMPLES["images"](family)
    vision = MaskedVisionReference(model, 0.95)
    with vision():
        expected = generate(model, inputs)
    assert_same_generation(
        generate(model, inputs, DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.95)), expected, 1e-4
    )


def tower_output(model, pixels: torch.Tensor, grid: list[tuple[int, int, int]], press: DeltaPress) -> torch.Tensor:
    with torch.no_grad(), press(model):
        return model.model.visual(pixels, grid_thw=torch.tensor(grid)).pooler_output


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_frame_groups_halt_apart(family):
    """Each image, and each frame group of a video, is its own segment: alone it gives the same merged tokens."""
    model, press = model_for(family), DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5)
    inputs = SAMPLES["images"](family)
    pixels, grids = inputs["pixel_values"], [tuple(row) for row in inputs["image_grid_thw"].tolist()]
    together = tower_output(model, pixels, grids, press)
    parts, start = [], 0
    for grid in grids:
        count = math.prod(grid)
        parts.append(tower_output(model, pixels[start : start + count], [grid], press))
        start += count
    assert relative_error(together, torch.cat(parts)) <= 1e-5
    video = SAMPLES["video"](family)
    pixels, (frames, height, width) = video["pixel_values_videos"], video["video_grid_thw"][0].tolist()
    whole = tower_output(model, pixels, [(frames, height, width)], press)
    groups = [tower_output(model, chunk, [(1, height, width)], press) for chunk in pixels.split(height * width)]
    assert relative_error(whole, torch.cat(groups)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("method", [name for name, scorer in SCORERS.items() if scorer.vision_tower])
def test_padded_batch_sample_equals_sample_alone(family, attention, method):
    model = model_for(family, attention)
    singles = [SAMPLES["images"](family), SAMPLES["image"](family), sample(family, [(1, 4, 4)], [2, 3], seed=12)]
    batch = left_pad_batch(singles)
    press = DeltaPress(compression_ratio=0.5, vision_compression_ratio=0.5, method=method)
    batched = generate(model, batch, press)
    batch_stats = press.last_stats
    length = batched.sequences.shape[1] - 4
    for b, single_inputs in enumerate(singles):
        alone = generate(model, single_inputs, press)
        assert torch.equal(batched.sequences[b, length:], alone.sequences[0, -4:])
        for step, (x, y) in enumerate(zip(batched.logits, alone.logits, strict=True)):
            assert relative_error(x[b], y[0]) <= 1e-4, f"sample {b} step {step}"
        single = press.last_stats[0]
        assert (batch_stats[b].vision_patches, batch_stats[b].vision_kept) == (
            single.vision_patches,
            single.vision_kept,
        )
        assert single.vision_kept == kept_patches(segments(single_inputs), 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_of_a_batch_with_images_and_a_video(family):
    model = model_for(family)
    batch = left_pad_batch([SAMPLES["images"](family), SAMPLES["image"](family)])
    video = SAMPLES["video"](family)
    pad = batch["input_ids"].shape[1] - video["input_ids"].shape[1]
    batch["input_ids"][1, pad:] = video["input_ids"][0]  # sample 1 now holds the video instead of the image
    batch["attention_mask"][1] = torch.arange(batch["input_ids"].shape[1]) >= pad
    batch["pixel_values"] = SAMPLES["images"](family)["pixel_values"]
    batch["image_grid_thw"] = SAMPLES["images"](family)["image_grid_thw"]
    batch["pixel_values_videos"], batch["video_grid_thw"] = video["pixel_values_videos"], video["video_grid_thw"]
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.3)
    with torch.no_grad(), press(model):
        model(**batch)
    images, frames = segments(SAMPLES["images"](family)), segments(video)
    assert [(s.vision_patches, s.vision_kept) for s in press.last_stats] == [
        (sum(images), kept_patches(images, 0.3)),
        (sum(frames), kept_patches(frames, 0.3)),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_are_removed_even_when_the_tower_fails(family):
    model, inputs = model_for(family), SAMPLES["image"](family)
    modules = [model.model.visual, model.model.visual.merger, *model.model.visual.blocks]
    modules += [block.attn for block in model.model.visual.blocks]
    modules += adapter_for(family).vision_taps(model.model.visual).values()  # Qwen3-VL's DeepStack mergers
    before = [hook_counts(module) for module in modules]
    expected = generate(model, inputs)

    def fail(module, args):
        raise RuntimeError("block failed")

    handle = model.model.visual.blocks[-1].register_forward_pre_hook(fail)
    press = DeltaPress(vision_compression_ratio=0.5)
    with pytest.raises(RuntimeError, match="block failed"), torch.no_grad(), press(model):
        model(**inputs)
    handle.remove()
    assert [hook_counts(module) for module in modules] == before
    assert_same_generation(generate(model, inputs), expected, 0.0)


def test_vision_halting_is_refused_where_the_tower_cannot_halt():
    from dash_vlm.models.llava import tiny_llava

    with pytest.raises(ValueError, match="vision_compression_ratio > 0 needs a model whose vision tower can halt"):
        with DeltaPress(vision_compression_ratio=0.5)(tiny_llava()):
            pass
    for name in ("vision_compression_ratio", "vision_start_ratio"):
        with pytest.raises(ValueError, match=f"{name} must be a number in \\[0, 1\\), got 1.0"):
            DeltaPress(**{name: 1.0})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("start_ratio", [0.0, 0.5, 0.9])
def test_other_decision_blocks_match_masked_reference(family, start_ratio):
    model, inputs = model_for(family, "eager"), SAMPLES["images"](family)
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5, vision_start_ratio=start_ratio)
    if math.floor(start_ratio * BLOCKS) == BLOCKS - 1:  # no block above the decision block: nothing could halt
        with pytest.raises(ValueError, match=f"vision_start_ratio={start_ratio} .* last of {BLOCKS} blocks"):
            generate(model, inputs, press)
        return
    vision = MaskedVisionReference(model, 0.5, start_ratio)
    with vision():
        expected = generate(model, inputs)
    assert_same_generation(generate(model, inputs, press), expected, 1e-4)
    assert press.last_stats[0].vision_kept == kept_patches(segments(inputs), 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tower_called_alone_returns_every_patch(family):
    model, inputs = model_for(family), SAMPLES["images"](family)
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        vanilla = model.model.visual(pixels, grid_thw=grid)
        with DeltaPress(vision_compression_ratio=0.5)(model):
            halted = model.model.visual(pixels, grid_thw=grid)
    assert halted.last_hidden_state.shape == vanilla.last_hidden_state.shape
    assert halted.pooler_output.shape == vanilla.pooler_output.shape
    assert relative_error(halted.pooler_output, vanilla.pooler_output) > 1e-3  # halting changed the merged tokens


def test_the_press_keeps_no_model_alive():
    import gc
    import weakref

    model, inputs = adapter_for("qwen2_vl").tiny_model("qwen2_vl", vision_layers=BLOCKS), SAMPLES["image"]("qwen2_vl")
    press = DeltaPress(compression_ratio=0.5, vision_compression_ratio=0.5)
    with torch.no_grad(), press(model):
        model(**inputs)
    assert press.last_stats[0].vision_kept < press.last_stats[0].vision_patches
    alive = weakref.ref(model.model.visual.blocks[0])
    del model
    gc.collect()
    assert alive() is None and press._last_prefill is not None
