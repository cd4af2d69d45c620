"""``selection="per_row"`` and ``"per_frame"`` (DESIGN.md section 1): the selection function against a Python
reference, and the press on every family against the masked reference with rows and frame groups derived
independently of ``dash_vlm``'s token grids."""

from __future__ import annotations

import math

import pytest
import torch
from test_press_vlm import (
    assert_batch_matches_reference,
    assert_same_generation,
    batch_and_singles,
    generate,
    model_for,
    samples,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from dash_vlm import DeltaPress
from dash_vlm.checks.reference import decoder_reference
from dash_vlm.halting import select_halted_in_groups
from dash_vlm.models import model_types_with

FAMILIES = model_types_with("is_vision_language")


def python_per_row(scores, eligible, n_halt, groups, ratio) -> torch.Tensor:
    halted = torch.zeros_like(eligible)
    for b in range(scores.shape[0]):
        members = {}
        for t in range(scores.shape[1]):
            if eligible[b, t] and groups[b, t] >= 0:
                members.setdefault(int(groups[b, t]), []).append(t)
        numbers = sorted(members)  # numbered in order of first position
        quotas = {g: math.floor(ratio * len(members[g])) for g in numbers}
        fractions = {g: ratio * len(members[g]) - quotas[g] for g in numbers}
        for g in sorted(numbers, key=lambda g: (-fractions[g], g))[: int(n_halt[b]) - sum(quotas.values())]:
            quotas[g] += 1
        for g in numbers:
            for t in sorted(members[g], key=lambda t: (scores[b, t].item(), t))[: quotas[g]]:
                halted[b, t] = True
    return halted


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.667, 0.9])
def test_select_halted_in_groups_equals_a_python_reference(ratio):
    generator = torch.Generator().manual_seed(int(ratio * 1000))
    batch, length = 4, 60
    scores = torch.randint(0, 6, (batch, length), generator=generator).float()  # many ties
    eligible = torch.rand(batch, length, generator=generator) < 0.8
    groups = torch.randint(-1, 7, (batch, length), generator=generator).sort(-1).values  # rows in prompt order
    counts = (eligible & (groups >= 0)).sum(-1)
    n_halt = torch.round(counts.double() * ratio).long()
    halted = select_halted_in_groups(scores, eligible, n_halt, groups, ratio)
    assert torch.equal(halted, python_per_row(scores, eligible, n_halt, groups, ratio))
    assert torch.equal(halted.sum(-1), n_halt)


def independent_rows(family: str, model, inputs: dict, frames: bool = False) -> list[list[list[int]]]:
    """Per sample, the prompt positions of each token row (with ``frames``: of each whole grid, a frame group or an
    image view), from the model's own token order: Qwen2-VL's merged grid (``grid_thw``: frame groups x rows x cols
    per item, items in order), LLaVA-1.5's square patch grid, LLaVA-NeXT's ``pack_image_features`` fed each patch's
    (view, canvas row) coordinates (newline tokens get NaN)."""
    config, ids = model.config, inputs["input_ids"]
    rows = [[] for _ in ids]
    if family.startswith("qwen"):
        merge = config.vision_config.spatial_merge_size
        for token_id, key in ((config.image_token_id, "image_grid_thw"), (config.video_token_id, "video_grid_thw")):
            if inputs.get(key) is None:
                continue
            tokens = [(b, t) for b, t in (ids == token_id).nonzero().tolist()]
            start = 0
            for groups, height, width in inputs[key].tolist():
                width //= merge
                size = width * height // merge if frames else width  # a frame group's tokens, or a row's
                for row in range(groups * height * width // merge // size):
                    chunk = tokens[start + row * size : start + (row + 1) * size]
                    rows[chunk[0][0]].append([t for _, t in chunk])
                start += groups * height * width // merge
        return rows
    side = config.vision_config.image_size // config.vision_config.patch_size
    tokens = (ids == config.image_token_id).nonzero().tolist()
    if family == "llava":
        size = side * side if frames else side
        for row in range(len(tokens) // size):
            chunk = tokens[row * size : (row + 1) * size]
            rows[chunk[0][0]].append([t for _, t in chunk])
        return rows
    features, sizes = [], inputs["image_sizes"]
    patch_rows = torch.arange(side).repeat_interleave(side).float()  # each patch's row within its tile
    for size in sizes:
        _, across = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) - 1
        coordinates = [torch.stack([torch.zeros(side * side), patch_rows], -1)]  # the base view
        for tile in range(tiles):  # tiles row by row: a patch's row on the canvas of tiles
            coordinates.append(torch.stack([torch.ones(side * side), patch_rows + tile // across * side], -1))
        features.append(torch.stack(coordinates))
    packed, _ = model.model.pack_image_features(features, sizes, "default", torch.full((2,), float("nan")))
    tokens_of = iter(tokens)
    for coordinates in packed:
        by_row = {}
        for view, row in coordinates.tolist():
            b, t = next(tokens_of)
            if not math.isnan(view):
                by_row.setdefault(view if frames else (view, row), []).append(t)
        rows[b] += list(by_row.values())
    return rows


FAMILY_KINDS = [(family, kind) for family in FAMILIES for kind in samples(family)]


@pytest.mark.parametrize(("family", "kind"), FAMILY_KINDS)
@pytest.mark.parametrize("scope", ["vision", "all"])
@pytest.mark.parametrize("ratio", [0.3, 0.667])
def test_per_row_matches_masked_reference(family, kind, scope, ratio):
    model, inputs = model_for(family), samples(family)[kind]
    rows = independent_rows(family, model, inputs)
    reference = decoder_reference(model, ratio, scope=scope, rows=rows)
    with reference():
        expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=ratio, scope=scope, selection="per_row")
    assert_same_generation(generate(model, inputs, press), expected, 1e-4)
    stats = press.last_stats[0]
    assert stats.halted_positions == reference.halted_per_sample[0]
    assert stats.eligible == len(reference.eligible[0])
    assert len(stats.halted_positions) == round(ratio * stats.eligible) > 0
    global_press = DeltaPress(compression_ratio=ratio, scope=scope)
    generate(model, inputs, global_press)
    in_rows = sum(len(row) for row in rows[0])
    if scope == "vision":  # every row token is eligible; LLaVA-NeXT's row-end newline tokens are not
        assert stats.eligible == in_rows
        assert (global_press.last_stats[0].eligible > in_rows) == (family == "llava_next")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selection", ["per_row", "per_frame"])
def test_grouped_padded_batch_equals_samples_alone_and_reference(family, selection):
    model = model_for(family)
    batch, singles = batch_and_singles(family)
    press = DeltaPress(compression_ratio=0.5, selection=selection)
    frames = selection == "per_frame"
    assert_batch_matches_reference(
        model,
        batch,
        singles,
        press,
        lambda inputs: decoder_reference(model, 0.5, rows=independent_rows(family, model, inputs, frames=frames)),
    )
    batch_stats = press.last_stats
    for b, sample in enumerate(singles):
        generate(model, sample, press)
        assert press.last_stats[0].halted_positions == batch_stats[b].halted_positions


@pytest.mark.parametrize(("family", "kind"), FAMILY_KINDS)
@pytest.mark.parametrize("scope", ["vision", "all"])
def test_per_frame_matches_masked_reference(family, kind, scope):
    """Every frame group (every image view) halts its own share: the masked reference given the grids as groups."""
    model, inputs = model_for(family), samples(family)[kind]
    frames = independent_rows(family, model, inputs, frames=True)
    reference = decoder_reference(model, 0.667, scope=scope, rows=frames)
    with reference():
        expected = generate(model, inputs)
    press = DeltaPress(compression_ratio=0.667, scope=scope, selection="per_frame")
    assert_same_generation(generate(model, inputs, press), expected, 1e-4)
    halted = press.last_stats[0].halted_positions
    assert halted == reference.halted_per_sample[0]
    for frame in frames[0]:  # each frame's share, to within the one token the remainder may add
        assert abs(sum(t in halted for t in frame) - 0.667 * len(frame)) < 1 + 1e-9


def test_per_frame_spreads_a_clip_over_its_frame_groups():
    """On a video, per_frame halts the same share of every frame group (to within the one token of the remainder)."""
    family = "qwen2_vl"
    model, inputs = model_for(family), samples(family)["video"]
    frames = independent_rows(family, model, inputs, frames=True)[0]
    assert len(frames) >= 2
    press = DeltaPress(compression_ratio=0.5, selection="per_frame")
    generate(model, inputs, press)
    halted = set(press.last_stats[0].halted_positions)
    shares = [len(halted & set(frame)) / len(frame) for frame in frames]
    assert max(shares) - min(shares) <= 1 / min(map(len, frames)) + 1e-9


def test_per_row_is_refused_for_text_models_and_checked():
    from dash_vlm.models.text import tiny_text_model

    with pytest.raises(ValueError, match="selection must be one of"):
        DeltaPress(selection="rows")
    for selection in ("per_row", "per_frame"):
        with pytest.raises(ValueError, match=f"selection='{selection}' needs a vision-language model"):
            with DeltaPress(selection=selection)(tiny_text_model()):
                pass
