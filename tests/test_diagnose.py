"""``dash-vlm diagnose`` (``dash_vlm.diagnose``): its statistics, its scores against the press's own decision, and the
command on a folder of images and on dash-shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dash_vlm import DashVLM
from dash_vlm.cli import main as cli_main
from dash_vlm.diagnose import ROW_BANDS, band_means, covered_cells, decision_scores, spearman
from dash_vlm.models import TokenGrid
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.shapes.data import split_samples
from dash_vlm.shapes.evaluate import model_folder


def test_spearman_and_row_bands():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert abs(spearman(x, torch.tensor([3.0, 9, 1, 7, 5, 0, 8, 2, 6, 4]))) < 0.2
    grid = torch.arange(16.0).view(16, 1).expand(16, 2)  # 16 rows: two per band
    assert band_means([grid]) == [2 * band + 0.5 for band in range(ROW_BANDS)]


def test_covered_cells_counts_a_tenth_of_a_cell():
    grid = TokenGrid(np.zeros((8, 8, 3), dtype=np.uint8), torch.arange(4).view(2, 2), 0)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[0:2, 0:2] = 255  # a quarter of cell (0, 0)
    mask[4, 4] = 255  # a sixteenth of cell (1, 1): below a tenth
    assert covered_cells(grid, mask).tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_scores_are_the_ones_the_press_halts_by(family, tmp_path):
    """In a padded batch of two, each sample's lowest-scoring cells are the cells of the tokens the press halts (on
    Qwen3-VL: 32 px cells, DeepStack below the decision layer)."""
    if family == "llava":
        folder = model_folder("llava")
    else:
        folder = tmp_path / family
        for part in tiny_checkpoint(family, "what colour is the circle where red blue square".split(), seed=1):
            part.save_pretrained(folder)
    vlm = DashVLM.from_pretrained(folder, compression_ratio=0.5)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in (0, 1)]
    prompts = ["what colour is the circle ?", "where is the red circle relative to the blue square ?"]  # padded
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        for image, prompt in zip(images, prompts, strict=True)
    ]
    scored = decision_scores(vlm, chats)
    results = vlm.generate(image=images, prompt=prompts, max_new_tokens=1)
    assert results[0].stats.tokens < results[1].stats.tokens  # the first sample is left-padded in the batch
    for ((_, scores),), result in zip(scored, results, strict=True):
        lowest = scores.flatten().argsort(stable=True)[: len(result.stats.halted_positions)]
        assert sorted(result.grids[0].positions.flatten()[lowest].tolist()) == result.stats.halted_positions


def test_diagnose_command_on_a_folder_and_on_dash_shapes(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    output = tmp_path / "folder.json"
    cli_main(["diagnose", "--model", str(model_folder("qwen2-vl")), "--images", str(folder), "--output", str(output)])
    document = json.loads(output.read_text())
    assert document["images"] == 3 and document["decision_layer"] == 3
    assert set(document["halted_by_row_band"]) == {"dash global", "dash per_row", "random"}
    assert all(len(values) == ROW_BANDS for values in document["halted_by_row_band"].values())
    assert document["fully_halted"] == {}
    assert -1 <= document["flip"]["spearman_same_index"] <= 1
    shapes = tmp_path / "shapes.json"
    plot = tmp_path / "shapes.png"
    argv = ["diagnose", "--model", str(model_folder("llava")), "--dash-shapes", "--limit", "20", "--ratio", "0.5"]
    cli_main([*argv, "--output", str(shapes), "--plot", str(plot)])
    document = json.loads(shapes.read_text())
    assert document["press"]["compression_ratio"] == 0.5
    shares = document["fully_halted"]["random"]
    assert 0 <= shares["all_shapes"] <= 1 and 0 <= shares["asked_shapes"] <= 1
    per_row = document["halted_by_row_band"]["dash per_row"]
    assert max(per_row) - min(per_row) <= 1 / 8 + 1e-9  # 8 tokens a row: each row halts 4, give or take one
    samples = split_samples("test")[:20]  # the global rule's shares, recounted from the press's halted positions
    vlm = DashVLM.from_pretrained(model_folder("llava"), compression_ratio=0.5)
    results = vlm.generate(image=[s.image for s in samples], prompt=[s.question for s in samples], max_new_tokens=1)
    halted_rows = torch.zeros(8)
    for result in results:
        first = int(result.grids[0].positions.min())  # 64 image tokens in raster order, 8 a row
        for position in result.stats.halted_positions:
            halted_rows[(position - first) // 8] += 1
    expected = (halted_rows / (8 * len(samples))).tolist()
    assert document["halted_by_row_band"]["dash global"] == pytest.approx(expected)
    assert plot.stat().st_size > 0
    assert "shapes fully halted, dash global" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["diagnose", "--model", str(model_folder("llava")), "--output", str(shapes)])
