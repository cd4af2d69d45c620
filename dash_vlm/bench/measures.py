"""The measurements of ``dash-vlm bench --measure NAME`` and what each reads.

``speed`` is the harness itself (``bench.run_bench``); the others measure one thing each: ``attention`` (the attention
settings timed), ``attention-check`` (checked against SDPA), ``kernels`` (the fast path's GPU kernels), ``syncs``
(host synchronisations), ``tower-blocks`` (each vision block's time), ``video-memory`` (peak memory against a
video's frames). Every one takes the shared :class:`~dash_vlm.bench.config.BenchConfig` and a few options of its own
(``Measure.options``), and returns its JSON document; each reads only some of the config's fields
(``Measure.reads``, with the defaults of the script it replaced, so that published commands reproduce), and a flag
for a field it does not read is a usage error, not a no-op. A measurement's module has ``validate(config,
**options)``, which refuses with ``ValueError`` before any model is built, and ``run(config, **options)``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from dash_vlm.bench import attention, attention_check, kernels, syncs, tower_blocks, video_memory
from dash_vlm.bench.config import BenchConfig


@dataclass(frozen=True)
class Measure:
    """One measurement: its module (``None``: the speed harness), the ``BenchConfig`` fields it reads beyond
    ``preset`` and ``image_sizes`` (each with its default, ``None`` for ``BenchConfig``'s own; ``halting``: the
    halting fields that are not swept), its own options with their defaults, whether it draws a plot
    (``module.plot``) and whether its document records the command line that made it."""

    module: ModuleType | None
    reads: dict[str, object]
    options: dict[str, object] = field(default_factory=dict)
    plots: bool = False
    records_command: bool = False


ONE_RATIO = {"ratios": [0.667], "vision_ratios": [0.5]}  # DASH, and DASH with the tower halting, as the scripts had
MEASURES = {
    "speed": Measure(
        None,
        {"ratios": [0.0, 0.5, 0.667, 0.8]}
        | dict.fromkeys(("vision_ratios", "methods", "halting", "batch_size", "new_tokens", "repeats", "warmup"))
        | dict.fromkeys(("attn", "device", "device_map", "paths", "video_frames")),
        plots=True,
    ),
    "attention": Measure(
        attention,
        ONE_RATIO | dict.fromkeys(("batch_size", "repeats", "warmup", "device")),
        {"settings": list(attention.SETTINGS)},
        records_command=True,
    ),
    "attention-check": Measure(
        attention_check,
        ONE_RATIO | {"new_tokens": 8, "device": None},
        {"settings": list(attention.SETTINGS)},
        records_command=True,
    ),
    "kernels": Measure(
        kernels,
        {"ratios": [0.667], "batch_size": None, "repeats": 5, "new_tokens": 16, "device": None},
        {"stage": "prefill"},
    ),
    "syncs": Measure(syncs, ONE_RATIO | {"device": None}),
    "tower-blocks": Measure(tower_blocks, {"vision_ratios": [0.5], "repeats": None, "device": None}),
    "video-memory": Measure(
        video_memory,
        ONE_RATIO | {"new_tokens": 8, "device": None, "video_frames": None, "halting": None},
        {"prefill_only": False, "variants": list(video_memory.DEFAULT_VARIANTS), "decoder_layers": None},
        plots=True,
        records_command=True,
    ),
}


def readers(field: str) -> list[str]:
    """The measurements that read ``field``: a ``BenchConfig`` field, a measurement's option, or ``plot``."""
    return [
        name
        for name, measure in MEASURES.items()
        if field in measure.reads or field in measure.options or (field == "plot" and measure.plots)
    ]


def configure(name: str, preset: str, image_sizes: list[int], given: dict, halting: dict) -> tuple[BenchConfig, dict]:
    """Measurement ``name``'s config and options: the values ``given`` (by field or option name) that it reads, over
    its defaults (copied: the table stays as it is); ``ValueError`` from ``BenchConfig``'s checks."""
    measure = MEASURES[name]
    # BenchConfig needs decoder ratios even where the measurement reads none (tower-blocks): 0 halts nothing
    fields = {"ratios": [0.0]} | copy.deepcopy(
        {field: value for field, value in measure.reads.items() if value is not None}
    )
    fields |= {field: value for field, value in given.items() if field in measure.reads}
    options = copy.deepcopy(measure.options) | {
        option: value for option, value in given.items() if option in measure.options
    }
    return BenchConfig(preset=preset, image_sizes=image_sizes, halting=halting, **fields), options


def validate(name: str, config: BenchConfig, options: dict) -> None:
    """``ValueError`` for what measurement ``name`` cannot run with ``config`` and its ``options``; builds no
    model."""
    module = MEASURES[name].module
    if module is not None:
        module.validate(config, **options)


def run(name: str, config: BenchConfig, options: dict) -> dict:
    """Measurement ``name``'s JSON document, after :func:`validate`."""
    validate(name, config, options)
    module = MEASURES[name].module
    if module is None:
        from dash_vlm import bench

        return bench.run_bench(config)
    return module.run(config, **options)


def main(name: str, config: BenchConfig, options: dict, output: Path, plot_path: Path | None, command: str) -> dict:
    """Run measurement ``name``, write its JSON to ``output`` (with ``command`` where the measurement records it) and
    its plot to ``plot_path``; the speed harness's: ``bench.main``, which also prints its table."""
    measure = MEASURES[name]
    if measure.module is None:
        from dash_vlm import bench

        return bench.main(config, output, plot_path)
    document = run(name, config, options)
    if measure.records_command:
        document["command"] = command
    output.write_text(json.dumps(document, indent=1))
    if plot_path is not None:
        measure.module.plot(document, plot_path)
    return document
