"""Halting maps: each image as the model saw it, the cells of its halted tokens shaded (DESIGN.md section 2)."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch
from PIL import Image

from dash_vlm.models import TokenGrid

DECODER_SHADE = (25, 25, 25)  # cells of tokens that halted in the decoder
VISION_SHADE = (40, 90, 230)  # patches that halted in the vision tower
OPACITY = 0.7
GAP = 4  # pixels between the views of one item


def shade_cells(pixels: np.ndarray, cells: np.ndarray, colour: tuple[int, int, int] = DECODER_SHADE) -> np.ndarray:
    """``pixels`` (``[height, width, 3]`` uint8) with the cells where ``cells`` (``[rows, cols]`` bool) is True blended
    toward ``colour``; the picture divides evenly into the cells."""
    rows, columns = cells.shape
    height, width = pixels.shape[:2]
    if height % rows or width % columns:
        raise ValueError(f"a {height}x{width} picture does not divide into {rows}x{columns} cells")
    mask = np.repeat(np.repeat(cells, height // rows, axis=0), width // columns, axis=1)
    shaded = pixels.astype(np.float32)
    shaded[mask] = (1 - OPACITY) * shaded[mask] + OPACITY * np.asarray(colour, dtype=np.float32)
    return shaded.round().astype(np.uint8)


def scaled(picture: np.ndarray, factor: int) -> np.ndarray:
    """``picture`` with every pixel repeated ``factor`` times in both directions."""
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def side_by_side(pictures: list[np.ndarray]) -> np.ndarray:
    """The pictures in a row, each scaled (by whole pixels) toward the tallest one's height, on white."""
    height = max(picture.shape[0] for picture in pictures)
    scaled_pictures = [scaled(picture, max(1, height // picture.shape[0])) for picture in pictures]
    width = sum(picture.shape[1] for picture in scaled_pictures) + GAP * (len(scaled_pictures) - 1)
    canvas = np.full((max(p.shape[0] for p in scaled_pictures), width, 3), 255, dtype=np.uint8)
    left = 0
    for picture in scaled_pictures:
        canvas[: picture.shape[0], left : left + picture.shape[1]] = picture
        left += picture.shape[1] + GAP
    return canvas


def halting_maps(
    grids: list[TokenGrid],
    halted_positions: Collection[int],
    halted_patches: Collection[int] = (),
    min_height: int = 0,
) -> list[Image.Image]:
    """One picture per image or video frame group of a prompt: its views (``grids``) side by side, the tower patches
    at ``halted_patches`` shaded blue, then the cells of the tokens at ``halted_positions`` shaded dark, the rest as
    the model saw it; scaled up by whole pixels to at least ``min_height`` rows."""
    halted = torch.as_tensor(sorted(halted_positions), dtype=torch.long)
    halted_in_tower = torch.as_tensor(sorted(halted_patches), dtype=torch.long)
    views: dict[int, list[np.ndarray]] = {}
    for grid in grids:
        pixels = grid.pixels
        if grid.patches is not None and len(halted_in_tower):
            pixels = shade_cells(pixels, torch.isin(grid.patches, halted_in_tower).numpy(), VISION_SHADE)
        cells = torch.isin(grid.positions, halted).numpy()
        views.setdefault(grid.item, []).append(shade_cells(pixels, cells))
    pictures = []
    for item in sorted(views):
        picture = side_by_side(views[item])
        pictures.append(Image.fromarray(scaled(picture, max(1, -(-min_height // picture.shape[0])))))
    return pictures
