"""Token grids and halting maps (DESIGN.md section 2) through each family's real processor: every cell of a view
holds the pixels of the token the model itself puts at that prompt position, and a halting map shades exactly the
cells of the halted tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.checks.reference import MaskedVisionReference
from dash_vlm.maps import DECODER_SHADE, GAP, OPACITY, VISION_SHADE, halting_maps
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.tiny import tiny_checkpoint

FAMILIES = model_types_with("is_vision_language")


def noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def conversations(family: str) -> list[list[dict]]:
    """A padded batch: one image of a size the Qwen processor resizes, then two images; Qwen2-VL adds a video."""
    first = [{"type": "image", "image": noise(45, 70, 1)}, {"type": "text", "text": "what colour"}]
    second = [
        {"type": "image", "image": noise(64, 40, 2)},
        {"type": "text", "text": "how many"},
        {"type": "image", "image": noise(30, 90, 3)},
        {"type": "text", "text": "red"},
    ]
    if adapter_for(family).video:
        second.append({"type": "video", "video": [noise(32, 48, 10 + frame) for frame in range(4)]})
    return [[{"role": "user", "content": first}], [{"role": "user", "content": second}]]


def patch_colours(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """Mean RGB in [0, 1] over the last two (pixel) dimensions of normalised pixels ``[..., 3, h, w]``."""
    mean = torch.tensor(image_processor.image_mean)
    std = torch.tensor(image_processor.image_std)
    return pixels.float().mean((-1, -2)) * std + mean


def expected_colours(family: str, model, processor, inputs: dict) -> dict[tuple[int, int], torch.Tensor]:
    """The mean colour of the pixels behind each vision token, keyed by (sample, prompt position), derived from the
    model's own token order: Qwen's merger takes ``merge**2`` consecutive patch rows per token, CLIP's patch
    embedding reads a tile row by row, and LLaVA-NeXT's ``pack_image_features`` lays out base, tiles and newlines
    (fed per-patch colours; newline tokens get NaN)."""
    config, image_processor = model.config, processor.image_processor
    colours = []  # per kind of placeholder, the colours of its tokens in order
    if family.startswith("qwen"):
        merge, patch = config.vision_config.spatial_merge_size, image_processor.patch_size
        temporal = image_processor.temporal_patch_size
        for token_id, key in ((config.image_token_id, "pixel_values"), (config.video_token_id, "pixel_values_videos")):
            if key in inputs:
                rows = inputs[key].reshape(-1, merge * merge, 3, temporal, patch, patch)[:, :, :, 0]
                colours.append((token_id, patch_colours(rows.transpose(1, 2).flatten(-3, -2), image_processor)))
    else:
        side = config.vision_config.image_size // config.vision_config.patch_size
        patch = config.vision_config.patch_size
        pixels = inputs["pixel_values"]
        tiles = pixels if family == "llava_next" else pixels[:, None]
        cells = tiles.unflatten(-2, (side, patch)).unflatten(-1, (side, patch)).transpose(-3, -2)  # [.., 3, r, c, p, p]
        per_patch = patch_colours(cells.movedim(-5, -3), image_processor).flatten(-3, -2)  # [images, tiles, r*c, 3]
        if family == "llava_next":  # the model's own layout; the processor pads every image to as many tiles
            sizes = inputs["image_sizes"]
            tiles = [
                image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in sizes
            ]
            features = [per_patch[image, :count] for image, count in enumerate(tiles)]
            packed, _ = model.model.pack_image_features(features, sizes, "default", torch.full((3,), float("nan")))
            colours.append((config.image_token_id, torch.cat(packed)))
        else:
            colours.append((config.image_token_id, per_patch.flatten(0, 2)))
    expected = {}
    for token_id, token_colours in colours:
        positions = (inputs["input_ids"] == token_id).nonzero().tolist()
        assert len(positions) == len(token_colours)
        expected.update({tuple(position): colour for position, colour in zip(positions, token_colours, strict=True)})
    return expected


def assert_patch_cells(views, sample: int, family: str, processor, inputs: dict) -> None:
    """Every tower-patch cell of a Qwen view shows the pixels of the patch its index names: the sample's image
    patches, then its video patches, each in the processor's row order."""
    image_processor = processor.image_processor
    patch, temporal = image_processor.patch_size, image_processor.temporal_patch_size
    rows = []
    for kind, key, grid_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if key in inputs:
            parts = inputs[key].split(inputs[grid_key].prod(-1).tolist())
            rows += [part for part, owner in zip(parts, owners(family, kind), strict=True) if owner == sample]
    colours = patch_colours(torch.cat(rows).reshape(-1, 3, temporal, patch, patch)[:, :, 0], image_processor)
    for view in views:
        height, width = view.pixels.shape[:2]
        rows_, columns = view.patches.shape
        cells = (
            torch.from_numpy(view.pixels).float().div(255).reshape(rows_, height // rows_, columns, width // columns, 3)
        )
        for (row, column), index in np.ndenumerate(view.patches.numpy()):
            torch.testing.assert_close(cells[row, :, column].mean((0, 1)), colours[index], atol=1 / 255, rtol=0)


def owners(family: str, kind: str) -> list[int]:
    """The sample of each image (or video) of :func:`conversations`, in order."""
    chats = conversations(family)
    return [sample for sample, chat in enumerate(chats) for item in chat[0]["content"] if item["type"] == kind]


@pytest.fixture(scope="module", params=[*FAMILIES, "qwen3_vl-16px"])
def family_inputs(request):
    """Each family's tiny checkpoint, and Qwen3-VL once more at its published geometry: 16 px patches merged 2x2,
    a token covering 32 px."""
    family, _, geometry = request.param.partition("-")
    model, processor = tiny_checkpoint(family, ["what", "colour", "how", "many", "red"], seed=5)
    if geometry:
        model.config.vision_config.patch_size = processor.image_processor.patch_size = 16
        processor.video_processor.patch_size = 16
        model = type(model)(model.config).eval()
    processor.tokenizer.padding_side = "left"
    inputs = dict(adapter_for(family).processor_inputs(processor, conversations(family)))
    return family, model, processor, inputs


def test_every_cell_shows_the_pixels_of_its_token(family_inputs):
    family, model, processor, inputs = family_inputs
    grids = adapter_for(family).token_grids(model.config, processor, inputs)
    expected = expected_colours(family, model, processor, inputs)
    seen = set()
    for sample, views in enumerate(grids):
        assert [view.positions.min() for view in views] == sorted(view.positions.min() for view in views)
        for view in views:
            rows, columns = view.positions.shape
            height, width = view.pixels.shape[:2]
            assert height % rows == 0 and width % columns == 0
            if family.startswith("qwen"):  # a token is merge x merge patches: 32 px at Qwen3-VL's published geometry
                side = processor.image_processor.patch_size * model.config.vision_config.spatial_merge_size
                assert height // rows == width // columns == side
            cells = (
                torch.from_numpy(view.pixels)
                .float()
                .div(255)
                .reshape(rows, height // rows, columns, width // columns, 3)
            )
            for (row, column), position in np.ndenumerate(view.positions.numpy()):
                colour = cells[row, :, column].mean((0, 1))
                torch.testing.assert_close(colour, expected[(sample, position)], atol=1 / 255, rtol=0)
                seen.add((sample, position))
        if family.startswith("qwen"):  # each tower patch's cell shows that patch's pixels (images', then videos')
            assert_patch_cells(views, sample, family, processor, inputs)
    with_cells = {key for key, colour in expected.items() if not colour.isnan().any()}
    assert seen == with_cells  # every vision token has one cell (LLaVA-NeXT's newline tokens none)
    frame_groups = int(inputs["video_grid_thw"][0, 0]) if "video_grid_thw" in inputs else 0
    assert [len({view.item for view in views}) for views in grids] == [1, 2 + frame_groups]
    views_per_item = 2 if family == "llava_next" else 1  # the base view and the tiled view
    assert [len(views) for views in grids] == [views_per_item, views_per_item * 2 + frame_groups]


def shade_where(pixels: np.ndarray, cells: np.ndarray, colour) -> np.ndarray:
    """``pixels`` with every cell of the ``[rows, cols]`` bool grid ``cells`` blended toward ``colour``."""
    rows, columns = cells.shape
    out = pixels.astype(np.float32).copy()
    height, width = pixels.shape[0] // rows, pixels.shape[1] // columns
    for row, column in zip(*np.nonzero(cells), strict=True):
        block = out[row * height : (row + 1) * height, column * width : (column + 1) * width]
        block[:] = ((1 - OPACITY) * block + OPACITY * np.asarray(colour, np.float32)).round()
    return out.astype(np.uint8)


def test_halting_map_shades_exactly_the_cells_of_halted_tokens_and_patches(family_inputs):
    family, model, processor, inputs = family_inputs
    tower = adapter_for(family).halts_in_vision_tower
    press = DeltaPress(compression_ratio=0.5, vision_compression_ratio=0.5 if tower else 0.0)
    results = DashVLM(model, processor, press).generate_conversations(conversations(family), max_new_tokens=2)
    for result in results:
        halted = torch.tensor(result.stats.halted_positions)
        halted_patches = torch.tensor(result.stats.vision_halted_patches or [], dtype=torch.long)
        assert len(halted_patches) == (result.stats.vision_patches - result.stats.vision_kept if tower else 0)
        assert (len(halted_patches) > 0) == tower
        pictures = result.halting_map()
        items = sorted({grid.item for grid in result.grids})
        assert len(pictures) == len(items)
        shaded = {"tokens": 0, "patches": 0}
        for item, picture in zip(items, pictures, strict=True):
            picture = np.asarray(picture)
            views = [grid for grid in result.grids if grid.item == item]
            tallest, left = max(view.pixels.shape[0] for view in views), 0
            for view in views:  # side by side, each scaled by whole pixels toward the tallest
                height, width = view.pixels.shape[:2]
                factor = max(1, tallest // height)
                part = picture[: height * factor : factor, left : left + width * factor : factor]
                left += width * factor + GAP
                expected = view.pixels
                if view.patches is not None:
                    patch_cells = torch.isin(view.patches, halted_patches).numpy()
                    expected = shade_where(expected, patch_cells, VISION_SHADE)
                    shaded["patches"] += patch_cells.sum()
                token_cells = torch.isin(view.positions, halted).numpy()
                np.testing.assert_array_equal(part, shade_where(expected, token_cells, DECODER_SHADE))
                shaded["tokens"] += token_cells.sum()
        with_cells = torch.cat([grid.positions.flatten() for grid in result.grids])
        assert shaded["tokens"] == torch.isin(halted, with_cells).sum() > 0
        assert shaded["patches"] == len(halted_patches)  # every halted patch shows, once
    scaled = results[0].halting_map(min_height=100)[0]
    assert scaled.height >= 100 and scaled.height % results[0].halting_map()[0].height == 0


def test_halting_map_of_a_prompt_without_images_is_empty():
    assert halting_maps([], [1, 2]) == []


@pytest.mark.parametrize("family", [f for f in FAMILIES if adapter_for(f).halts_in_vision_tower])
def test_tower_halted_patches_are_counted_in_the_processors_order(family):
    """Qwen2.5-VL's tower runs merge units window by window: the masked reference's choice, in the tower's order,
    mapped through the model's own window index, is the press's ``vision_halted_patches``."""
    model = adapter_for(family).tiny_model(family)
    inputs = adapter_for(family).tiny_inputs(family)["images"]
    reference = MaskedVisionReference(model, 0.5)
    with torch.no_grad(), reference():
        model(**inputs)
    tower = model.model.visual
    in_tower_order = reference.halted_per_pass[0]
    unit = model.config.vision_config.spatial_merge_size**2
    units = torch.arange(len(in_tower_order) // unit)
    if hasattr(tower, "get_window_index"):
        units = tower.get_window_index(inputs["image_grid_thw"])[0]
    processor_index = (units[:, None] * unit + torch.arange(unit)).flatten()
    expected = sorted(processor_index[in_tower_order].tolist())
    press = DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5)
    with torch.no_grad(), press(model):
        model(**inputs)
    assert press.last_stats[0].vision_halted_patches == expected
    if family == "qwen2_5_vl":  # the window order differs from the processor's here
        assert expected != in_tower_order.nonzero()[:, 0].tolist()
