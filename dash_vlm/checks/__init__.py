"""Checks a user runs on their own GPU before trusting DASH on their model (``dash-vlm check NAME``).

Each check takes a :class:`Subject`: a bench preset's real shapes with random weights (``preset_subject``), or any
supported checkpoint loaded the ordinary Hugging Face way with the user's own image and prompt (``model_subject``).
It returns a JSON document whose ``cases`` each carry a ``verdict`` ("PASS" or "FAIL") and whose ``passed`` says
whether every case passed; :func:`verdict_table` prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor, in float32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@dataclass
class Subject:
    """What a check runs on: a model, the inputs of a batch of a given size, and a name for the report."""

    name: str
    model: nn.Module
    inputs: Callable[[int], dict]


def preset_subject(preset_name: str, image_size: int, device: str) -> Subject:
    """A bench preset (``dash_vlm.models.presets``): random weights of real shapes, one image of ``image_size`` px, in
    bf16 on a GPU and float32 on a CPU."""
    from dash_vlm.bench import batch_inputs
    from dash_vlm.models.presets import PRESETS

    preset = PRESETS[preset_name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = preset.build(device, dtype)
    prompt = preset.inputs(image_size)
    return Subject(f"{preset_name}, {image_size} px", model, lambda batch: batch_inputs(prompt, batch, device, dtype))


def model_subject(model: str, image: Path, prompt: str, device: str, dtype: str = "auto") -> Subject:
    """A checkpoint loaded as ``DashVLM.from_pretrained`` loads it (hub id or folder), asked ``prompt`` about the image
    file ``image``; a batch repeats that prompt."""
    from PIL import Image

    from dash_vlm.vlm import DashVLM

    vlm = DashVLM.from_pretrained(model, device_map=device, dtype=dtype)
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": prompt}]}]

    def inputs(batch: int) -> dict:
        processed = vlm.adapter.processor_inputs(vlm.processor, [chat] * batch, vlm.min_pixels, vlm.max_pixels)
        return dict(processed.to(vlm.model.device, dtype=vlm.model.dtype))

    return Subject(f"{model}, {image.name}", vlm.model, inputs)


def verdict_table(document: dict, columns: dict[str, Callable[[dict], str]]) -> str:
    """A line per case of ``document``: its name, the ``columns`` (title: how to read it from the case) and its
    verdict; then the overall verdict."""
    width = max(len(name) for name in document["cases"])
    lines = [f"{'case':<{width}}  " + "  ".join(f"{title:>22}" for title in columns) + "  verdict"]
    for name, case in document["cases"].items():
        cells = "  ".join(f"{read(case):>22}" for read in columns.values())
        lines.append(f"{name:<{width}}  {cells}  {case['verdict']}")
    lines.append(f"{document['check']} on {document['subject']}: {'PASS' if document['passed'] else 'FAIL'}")
    return "\n".join(lines)
