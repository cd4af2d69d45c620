"""Host synchronisations of one prefill, per press, counted with ``torch.profiler`` (``dash-vlm bench --measure
syncs``, meant for a GPU):

    dash-vlm bench --measure syncs --preset qwen2-vl-7b --image-size 1344 --output syncs.json

For each variant (vanilla, decoder halting at the decoder ratio, vision-tower halting at the vision ratio, both) it
counts the CUDA calls that make the host wait for the GPU (stream, event and device synchronisations, blocking copies)
in a ``generate`` of one token and in one call of the vision tower alone, so that a sync added per layer or per block
would show as a multiple of the depth; and the tower alone as the fast path runs it, on its tables
(``dash_vlm.tower``, made in the warm-up). On a CPU nothing is counted: the run only shows that every variant runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext

import torch

from dash_vlm.bench.config import BenchConfig, model_dtype, the_image_size, the_ratio
from dash_vlm.bench.run import batch_inputs
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress
from dash_vlm.tower import TowerTables

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def variants(config: BenchConfig) -> dict[str, DeltaPress | None]:
    """The presses counted, by name (``None``: vanilla)."""
    ratio, vision = the_ratio(config, "syncs"), the_ratio(config, "syncs", vision=True)
    return {
        "vanilla": None,
        f"decoder {ratio:g}": DeltaPress(compression_ratio=ratio),
        f"vision {vision:g}": DeltaPress(compression_ratio=0.0, vision_compression_ratio=vision),
        f"decoder {ratio:g} + vision {vision:g}": DeltaPress(compression_ratio=ratio, vision_compression_ratio=vision),
    }


def validate(config: BenchConfig) -> None:
    """``ValueError`` for several image sizes, or not one nonzero decoder and vision ratio."""
    the_image_size(config, "syncs")
    variants(config)


def count_syncs(run: Callable[[], None]) -> dict[str, int]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():  # the CUDA runtime calls are recorded with the CUDA activity
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
    return dict(Counter(event.name for event in profile.events() if event.name in SYNCS))


def run(config: BenchConfig) -> dict:
    """Count the host syncs of every variant on the preset at its one image size; the JSON document."""
    dtype = model_dtype(config.device)
    preset = PRESETS[config.preset]
    model = preset.build(config.device, dtype)
    size = the_image_size(config, "syncs")
    inputs = batch_inputs(preset.inputs(size, config.text_tokens), 1, config.device, dtype)
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model)
    result = {
        "preset": config.preset,
        "image_size": size,
        "vision_blocks": len(adapter.vision_blocks(model)),
        "decoder_layers": len(adapter.decoder_layers(model)),
        "counts": {},
    }
    tables = TowerTables(model)
    for name, press in variants(config).items():

        def prefill(press=press):
            with torch.inference_mode(), press(model) if press is not None else nullcontext():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)

        def tower_alone(press=press):
            with torch.inference_mode(), press(model) if press is not None else nullcontext():
                tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

        def tower_on_tables(press=press):
            with tables.installed(inputs):
                tower_alone(press)

        prefill(), tower_alone(), tower_on_tables()  # warm-up
        result["counts"][name] = {
            "prefill": count_syncs(prefill),
            "vision_tower": count_syncs(tower_alone),
            "vision_tower_on_tables": count_syncs(tower_on_tables),
        }
        print(name, result["counts"][name], flush=True)
    return result
