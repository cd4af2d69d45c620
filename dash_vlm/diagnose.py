"""``dash-vlm diagnose``: does the decision-layer score follow the content or the token's place in the image?

On a supported checkpoint and a folder of images (or the dash-shapes test split, ``--dash-shapes``), under the
press's halting parameters:

- the DASH score of each image token (DESIGN.md section 1, rule 2) against its row: mean score per row band on
  blank images and on the given images, and Spearman's correlation of the score with the token's raster index;
- the vertical-flip test: each image and its upside-down copy, scores compared token by token at the same index
  (the score follows the place) and at the same content (it follows the content);
- the share of tokens halted per row band, DASH's global selection against ``selection="per_row"`` and random
  halting;
- on dash-shapes, where every shape's pixels are known: the share of shapes fully halted (every token covering
  a tenth of its cell or more halted), of all shapes and of the shapes the question names.

Row bands split each token grid's rows into ``ROW_BANDS`` equal bands (a dash-shapes image has 8 token rows: one
band per row).
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from dash_vlm.halting import token_scores
from dash_vlm.models import TokenGrid
from dash_vlm.scorers import read_decision_layer
from dash_vlm.vlm import DashVLM, open_image

ROW_BANDS = 8
BLANK_COLOURS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0)}
COVER = 0.1  # a token covers a shape when the shape fills at least this share of the token's cell
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe the image."


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long 1-D tensors (ties ranked by order)."""
    ranks = [value.float().argsort().argsort().double() for value in (x.flatten(), y.flatten())]
    centred = [rank - rank.mean() for rank in ranks]
    denominator = (centred[0].norm() * centred[1].norm()).item()
    return float((centred[0] @ centred[1]).item() / denominator) if denominator else float("nan")


def row_bands(rows: int) -> torch.Tensor:
    """The band of each of a grid's ``rows`` rows."""
    return torch.arange(rows) * ROW_BANDS // rows


def band_means(values: list[torch.Tensor]) -> list[float | None]:
    """Mean of ``[rows, cols]`` grids of values per row band, pooled over the grids (``None`` for a band no grid
    reaches: grids of fewer rows than bands)."""
    sums, counts = torch.zeros(ROW_BANDS, dtype=torch.float64), torch.zeros(ROW_BANDS, dtype=torch.float64)
    for grid in values:
        bands = row_bands(grid.shape[0])
        sums.index_add_(0, bands, grid.double().sum(-1))
        counts.index_add_(0, bands, torch.full((grid.shape[0],), float(grid.shape[1]), dtype=torch.float64))
    return [total / count if count else None for total, count in zip(sums.tolist(), counts.tolist(), strict=True)]


class _Stop(Exception):
    """Raised once the decision layer's attention has run: the layers above it have nothing to add."""


def decision_scores(vlm: DashVLM, conversations: list[list[dict]]) -> list[list[tuple[TokenGrid, torch.Tensor]]]:
    """Per conversation, each view of its images with the DASH score of each cell's token at the press's decision
    layer. The forward runs under the press at decoder ratio 0 (so a vision tower halts as the press would halt it;
    the decoder layers up to the decision layer run as without halting) and stops at the decision layer."""
    model, adapter = vlm.model, vlm.adapter
    inputs = adapter.processor_inputs(vlm.processor, conversations, vlm.min_pixels, vlm.max_pixels)
    inputs = inputs.to(model.device, dtype=model.dtype)
    layers = adapter.decoder_layers(model)
    press = dataclasses.replace(vlm.press.halting_config(), compression_ratio=0.0)
    captured = {}

    def keep(name: str, attention_output: torch.Tensor) -> None:
        captured["scores"] = token_scores(attention_output).cpu()
        raise _Stop

    decision = layers[press.decision_layer(len(layers))]
    handles = read_decision_layer(decision, adapter.token_mixer(decision), ("attention_output",), keep)
    try:
        with torch.inference_mode(), press(model):
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    grids = adapter.token_grids(model.config, vlm.processor, inputs)
    return [
        [(grid, captured["scores"][sample][grid.positions]) for grid in sample_grids]
        for sample, sample_grids in enumerate(grids)
    ]


def score_profile(vlm: DashVLM, images: list[Image.Image], prompts: list[str], batch_size: int) -> dict:
    """Mean score per row band and the mean Spearman correlation of score and raster index over the views."""
    grids, correlations = [], []
    for start in range(0, len(images), batch_size):
        chunk = zip(images[start : start + batch_size], prompts[start : start + batch_size], strict=True)
        for views in decision_scores(vlm, [conversation(image, prompt) for image, prompt in chunk]):
            for _, scores in views:
                grids.append(scores)
                correlations.append(spearman(scores.flatten(), torch.arange(scores.numel())))
    return {"score_by_row_band": band_means(grids), "spearman_with_index": float(np.nanmean(correlations))}


def flip_test(vlm: DashVLM, images: list[Image.Image], prompts: list[str], batch_size: int) -> dict:
    """Scores of each image against its vertically flipped copy: correlated at the same token index, and at the same
    content (the flipped copy's grid flipped back)."""
    by_index, by_content = [], []
    for start in range(0, len(images), batch_size):
        chunk = list(zip(images[start : start + batch_size], prompts[start : start + batch_size], strict=True))
        upright = decision_scores(vlm, [conversation(image, prompt) for image, prompt in chunk])
        flipped = decision_scores(vlm, [conversation(ImageOps.flip(image), prompt) for image, prompt in chunk])
        for views, flipped_views in zip(upright, flipped, strict=True):
            for (_, scores), (_, flipped_scores) in zip(views, flipped_views, strict=True):
                by_index.append(spearman(scores, flipped_scores))
                by_content.append(spearman(scores, flipped_scores.flip(0)))
    return {"spearman_same_index": float(np.nanmean(by_index)), "spearman_same_content": float(np.nanmean(by_content))}


def halting_runs(vlm: DashVLM) -> dict[str, object]:
    """The presses compared: the press's own rule with global and per-row selection, and random halting."""
    press = vlm.press.halting_config()
    return {
        "dash global": dataclasses.replace(press, method="dash", selection="global"),
        "dash per_row": dataclasses.replace(press, method="dash", selection="per_row"),
        "random": dataclasses.replace(press, method="random", selection="global"),
    }


def halted_cells(vlm: DashVLM, images: list[Image.Image], prompts: list[str], batch_size: int) -> list[list]:
    """Per image, its views as (view, ``[rows, cols]`` bool: the cell's token halted) under ``vlm.press``."""
    cells = []
    for start in range(0, len(images), batch_size):
        results = vlm.generate(
            image=images[start : start + batch_size], prompt=prompts[start : start + batch_size], max_new_tokens=1
        )
        for result in results:
            halted = torch.tensor(result.stats.halted_positions, dtype=torch.long)
            cells.append([(grid, torch.isin(grid.positions, halted)) for grid in result.grids])
    return cells


def covered_cells(grid: TokenGrid, mask: np.ndarray) -> torch.Tensor:
    """``[rows, cols]`` bool: the cells of ``grid`` that ``mask`` (``[height, width]``, non-zero on the shape, over
    the image as given; scaled to the view) covers for at least ``COVER`` of the cell."""
    rows, columns = grid.positions.shape
    height, width = grid.pixels.shape[:2]
    resized = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST)) > 0
    share = resized.reshape(rows, height // rows, columns, width // columns).mean((1, 3))
    return torch.from_numpy(share >= COVER)


def fully_halted(cells: list, samples: list) -> dict:
    """Share of dash-shapes shapes whose every covering token halted (a shape covering no cell never counts): all
    shapes, and those the question names."""
    from dash_vlm.shapes.data import asked_about, shape_mask

    counts = {"all_shapes": [0, 0], "asked_shapes": [0, 0]}
    for views, sample in zip(cells, samples, strict=True):
        asked = set(asked_about(sample.scene, sample.question))
        for shape in sample.scene:
            mask = np.asarray(shape_mask(shape), dtype=np.uint8)
            covers = [(covered_cells(grid, mask), halt) for grid, halt in views]
            halted = any(cover.any() for cover, _ in covers) and all(bool(halt[cover].all()) for cover, halt in covers)
            for key in ("all_shapes", *(("asked_shapes",) if shape in asked else ())):
                counts[key][0] += halted
                counts[key][1] += 1
    return {key: halted / total if total else float("nan") for key, (halted, total) in counts.items()}


def conversation(image: Image.Image, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def _check_count(name: str, value: object) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def load_images(folder: Path, limit: int | None = None) -> list[Image.Image]:
    """The image files of ``folder`` (by ``IMAGE_SUFFIXES``), the first ``limit`` of them by name, as the RGB pictures
    a viewer shows: EXIF orientation applied and 16-bit pixels scaled, as ``DashVLM.generate`` opens them."""
    if limit is not None:
        _check_count("limit", limit)  # a slice would take a negative limit as "all but the last"
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist or is not a folder")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [open_image(path, str(path)) for path in paths]  # by path: PIL reads only what it needs


def diagnose(
    vlm: DashVLM,
    images: list[Image.Image],
    prompts: list[str],
    batch_size: int = 50,
    shapes_samples: list | None = None,
) -> dict:
    """Every measurement of this module on ``images`` (one prompt each), blank images of the first image's size and,
    given the dash-shapes samples the images come from, the shares of shapes fully halted."""
    _check_count("batch_size", batch_size)  # a batch size < 1 would measure nothing and report NaN
    if not images or len(prompts) != len(images):
        raise ValueError(
            f"images must hold one image or more and prompts one per image, got {len(images)} and {len(prompts)}"
        )
    if not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
        raise ValueError(f"prompts must be non-empty strings, got {prompts!r:.200}")
    # decision_scores builds the processor inputs itself: a placeholder typed in a prompt would meet no image there
    vlm.check_text(prompts)
    size = images[0].size
    blanks = [Image.new("RGB", size, colour) for colour in BLANK_COLOURS.values()]
    press = vlm.press.halting_config()
    document = {
        "model": vlm.model.name_or_path,
        "images": len(images),
        "press": {name: getattr(press, name) for name in press.parameter_names()},
        "decision_layer": press.decision_layer(len(vlm.adapter.decoder_layers(vlm.model))),
        "row_bands": ROW_BANDS,
    }
    runs = halting_runs(vlm)
    with tqdm(total=3 + len(runs), desc="diagnose") as progress:
        document["blank"] = score_profile(vlm, blanks, [prompts[0]] * len(blanks), batch_size)
        progress.update()
        document["images_scores"] = score_profile(vlm, images, prompts, batch_size)
        progress.update()
        document["flip"] = flip_test(vlm, images, prompts, batch_size)
        progress.update()
        document["halted_by_row_band"], document["fully_halted"] = {}, {}
        original = vlm.press
        try:
            for name, run_press in runs.items():
                vlm.press = run_press
                cells = halted_cells(vlm, images, prompts, batch_size)
                document["halted_by_row_band"][name] = band_means([halt for views in cells for _, halt in views])
                if shapes_samples is not None:
                    document["fully_halted"][name] = fully_halted(cells, shapes_samples)
                progress.update()
        finally:
            vlm.press = original
    return document


def summary(document: dict) -> str:
    """The measurements as text, one line each."""
    bands = " ".join(_number(value, 7) for value in document["blank"]["score_by_row_band"])
    image_bands = " ".join(_number(value, 7) for value in document["images_scores"]["score_by_row_band"])
    lines = [
        f"{document['model']}: {document['images']} images, decision layer {document['decision_layer']}, "
        f"compression ratio {document['press']['compression_ratio']:g}",
        f"score by row band, blank images:  {bands}   "
        f"(Spearman with index {document['blank']['spearman_with_index']:+.2f})",
        f"score by row band, given images:  {image_bands}   "
        f"(Spearman with index {document['images_scores']['spearman_with_index']:+.2f})",
        f"vertical flip: Spearman at the same index {document['flip']['spearman_same_index']:+.2f}, "
        f"at the same content {document['flip']['spearman_same_content']:+.2f}",
        "halted share by row band:",
    ]
    for name, values in document["halted_by_row_band"].items():
        lines.append(f"  {name:<13} " + " ".join(_number(value, 5) for value in values))
    for name, shares in document["fully_halted"].items():
        lines.append(
            f"shapes fully halted, {name:<13}: {shares['all_shapes']:.1%} of all, "
            f"{shares['asked_shapes']:.1%} of those the question names"
        )
    return "\n".join(lines)


def _number(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.2f}"


def plot(document: dict, path: Path) -> None:
    """Score by row band (blank and given images) and halted share by row band per run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = list(range(ROW_BANDS))
    figure, (scores, halted) = plt.subplots(1, 2, figsize=(11, 4))
    scores.plot(bands, document["blank"]["score_by_row_band"], "-o", label="blank images")
    scores.plot(bands, document["images_scores"]["score_by_row_band"], "-o", label="given images")
    scores.set_title(f"DASH score at layer {document['decision_layer']} by token row band", fontsize=10)
    scores.set_xlabel("row band (top to bottom)")
    scores.set_ylabel("mean attention-output norm")
    for name, values in document["halted_by_row_band"].items():
        halted.plot(bands, values, "-o", label=name)
    ratio = document["press"]["compression_ratio"]
    halted.axhline(ratio, color="grey", linestyle=":", label=f"flat {ratio:g}")
    halted.set_title("share of image tokens halted by row band", fontsize=10)
    halted.set_xlabel("row band (top to bottom)")
    halted.set_ylim(0, 1.02)
    for axis in (scores, halted):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(Path(document["model"]).name, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
