"""Checks a user runs on their own GPU before trusting DASH on their model (``dash-vlm check NAME``).

- ``graphs``: the fast path (``cuda_graphs=True``) against transformers' eager ``generate``;
- ``bf16``: the press against the masked reference (:mod:`dash_vlm.checks.reference`) in the model's own dtype;
- ``split``: the checkpoint split over every GPU (``device_map="auto"``) against one GPU;
- ``leaks``: repeated ``DashVLM.generate`` calls leave no hook, no halted cache and no memory behind.

Each runs on a bench preset's real shapes with random weights, or on any supported checkpoint loaded the ordinary
Hugging Face way with the user's own image and prompt (:class:`CheckConfig`). It returns a JSON document whose
``cases`` each carry a ``verdict`` ("PASS" or "FAIL") and whose ``passed`` says whether every case passed;
:func:`verdict_table` prints them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dash_vlm.press import DeltaPress


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor, in float32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


CHECKS = ("graphs", "bf16", "split", "leaks")
# The options each check reads beyond its subject; another check's option given to it is a mistake, not a no-op.
CHECK_OPTIONS = {
    "graphs": ("batch_sizes", "steps", "repeats", "layers", "vision_layers"),
    "bf16": ("batch_sizes", "steps", "layers", "vision_layers"),
    "split": ("steps",),
    "leaks": ("steps", "calls", "cuda_graphs"),
}
DEFAULTS = {"batch_sizes": [1], "steps": 16, "repeats": 5, "calls": 200, "cuda_graphs": False}


@dataclass
class CheckConfig:
    """One ``dash-vlm check`` run: the check, its subject (``preset`` at ``image_size`` px, shortened to ``layers``
    decoder layers and ``vision_layers`` tower blocks when given; or ``model`` asked ``prompt`` about ``image`` or
    ``video``), and
    the options the check reads (``CHECK_OPTIONS``; ``None``: the check's default).

    ``batch_sizes``: each checked (graphs, bf16); ``steps``: new tokens per generation; ``repeats``: timed runs per
    case (graphs); ``calls``: ``generate`` calls measured (leaks); ``cuda_graphs``: the leaks of the fast path.
    """

    check: str
    preset: str | None = None
    model: str | None = None
    image_size: int | None = None
    image: Path | None = None
    video: Path | None = None
    prompt: str = "Describe the image."
    dtype: str = "auto"
    device: str | None = None
    batch_sizes: list[int] | None = None
    steps: int | None = None
    repeats: int | None = None
    layers: int | None = None
    vision_layers: int | None = None
    calls: int | None = None
    cuda_graphs: bool | None = None
    options: dict = field(init=False, repr=False)

    def __post_init__(self):
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}; got {self.check!r}")
        if (self.preset is None) == (self.model is None):
            raise ValueError("a check needs exactly one of preset (random weights of real shapes) and model")
        if self.model is not None:
            if (self.image is None) == (self.video is None):
                raise ValueError("a check of a model needs one of image and video, the file to ask the prompt about")
            for name in ("image_size", "layers", "vision_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} goes with a preset; a model is checked whole, on its image")
        elif self.image is not None or self.video is not None:
            raise ValueError("image and video go with a model; a preset measures a random image of image_size px")
        for name in ("steps", "repeats", "layers", "vision_layers", "calls", "image_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be at least 2 (a first token and a decode step), got {self.steps}")
        if self.batch_sizes is not None and (not self.batch_sizes or any(size < 1 for size in self.batch_sizes)):
            raise ValueError(f"batch_sizes must be whole numbers >= 1, got {self.batch_sizes!r}")
        for name in DEFAULTS | {"layers": None, "vision_layers": None}:
            if getattr(self, name) is not None and name not in CHECK_OPTIONS[self.check]:
                raise ValueError(
                    f"{name} does not apply to check {self.check}, which takes {', '.join(CHECK_OPTIONS[self.check])}"
                )
        self.options = {name: getattr(self, name) for name in CHECK_OPTIONS[self.check]}
        self.options |= {
            name: DEFAULTS[name] for name, value in self.options.items() if value is None and name in DEFAULTS
        }
        self.image_size = self.image_size or (896 if self.preset is not None else None)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def subject_name(self) -> str:
        return f"--preset {self.preset}" if self.preset is not None else f"--model {self.model}"

    def subject(self) -> Subject:
        """The model and its inputs, for the checks that run the model directly (graphs, bf16)."""
        if self.preset is not None:
            layers = {"layers": self.layers, "vision_layers": self.vision_layers}
            return preset_subject(self.preset, self.image_size, self.device, **layers)
        return model_subject(self.model, self.prompt, self.device, self.dtype, self.image, self.video)


def validate(config: CheckConfig, press: DeltaPress, model_config) -> None:
    """Refuse (``ValueError``), before any model loads, what ``config.check`` cannot run with ``press`` on a model of
    ``model_config``."""
    importlib.import_module(f"dash_vlm.checks.{config.check}").validate(config, press, model_config)


def run(config: CheckConfig, press: DeltaPress) -> dict:
    """Run ``config.check`` with ``press``: its JSON document (``passed``: every case passed)."""
    return importlib.import_module(f"dash_vlm.checks.{config.check}").check(config, press)


def columns(check: str) -> dict[str, Callable[[dict], str]]:
    """The verdict table's columns of ``check``."""
    return importlib.import_module(f"dash_vlm.checks.{check}").COLUMNS


@dataclass
class Subject:
    """What a check runs on: a model, the inputs of a batch of a given size, and a name for the report."""

    name: str
    model: nn.Module
    inputs: Callable[[int], dict]


def preset_subject(
    preset_name: str, image_size: int, device: str, layers: int | None = None, vision_layers: int | None = None
) -> Subject:
    """A bench preset (``dash_vlm.models.presets``): random weights of real shapes (``layers`` decoder layers and
    ``vision_layers`` tower blocks when given), one image of ``image_size`` px, in bf16 on a GPU and float32 on a
    CPU."""
    from dash_vlm.bench import batch_inputs
    from dash_vlm.models.presets import PRESETS

    preset = PRESETS[preset_name]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = preset.build(device, dtype, layers=layers, vision_layers=vision_layers)
    prompt = preset.inputs(image_size)
    shortened = "".join(
        f", {count} {what}" for count, what in ((layers, "layers"), (vision_layers, "tower blocks")) if count
    )
    return Subject(
        f"{preset_name}, {image_size} px{shortened}", model, lambda batch: batch_inputs(prompt, batch, device, dtype)
    )


def model_subject(
    model: str, prompt: str, device: str, dtype: str = "auto", image: Path | None = None, video: Path | None = None
) -> Subject:
    """A checkpoint loaded as ``DashVLM.from_pretrained`` loads it (hub id or folder), asked ``prompt`` about the image
    file ``image`` or the video file ``video`` (read as ``DashVLM.generate`` reads it); a batch repeats that prompt."""
    from dash_vlm.vlm import DashVLM, VisualLoader

    vlm = DashVLM.from_pretrained(model, device_map=device, dtype=dtype)
    visual = {"type": "image", "image": image} if video is None else {"type": "video", "video": video}
    chat = [{"role": "user", "content": [visual, {"type": "text", "text": prompt}]}]
    chat, _ = VisualLoader(allow_urls=False, decode_video_files=True).conversation(chat)

    def inputs(batch: int) -> dict:
        processed = vlm.adapter.processor_inputs(vlm.processor, [chat] * batch, vlm.min_pixels, vlm.max_pixels)
        return dict(processed.to(vlm.model.device, dtype=vlm.model.dtype))

    return Subject(f"{model}, {(image or video).name}", vlm.model, inputs)


def new_document(check: str, subject: Subject, press: DeltaPress, steps: int) -> dict:
    """The head of a check's JSON document: what ran, on what, with which press, on which device; no case yet."""
    device = next(subject.model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"check": check, "subject": subject.name, "steps": steps, "press": repr(press), "device": name, "cases": {}}


def all_passed(cases: dict) -> bool:
    """Whether every case of a check passed."""
    return all(case["verdict"] == "PASS" for case in cases.values())


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
