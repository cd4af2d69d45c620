"""Host synchronisations of one prefill, per press, counted with ``torch.profiler`` (run on a GPU):

    python tests/host_syncs.py --preset qwen2-vl-7b --image-size 1344 --output syncs.json

For each variant (vanilla, decoder halting, vision-tower halting, both) it counts the CUDA calls that make the host
wait for the GPU (stream, event and device synchronisations, blocking copies) in a ``generate`` of one token and in
one call of the vision tower alone, so that a sync added per layer or per block would show as a multiple of the
depth; and the tower alone as the fast path runs it, on its tables (``dash_vlm.tower``, made in the warm-up).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

from dash_vlm import DeltaPress
from dash_vlm.bench import batch_inputs
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS
from dash_vlm.tower import TowerTables

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
VARIANTS = {
    "vanilla": None,
    "decoder 0.667": DeltaPress(compression_ratio=0.667),
    "vision 0.5": DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5),
    "decoder 0.667 + vision 0.5": DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5),
}


def count_syncs(run) -> dict[str, int]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():  # the CUDA runtime calls are recorded with the CUDA activity
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
    return dict(Counter(event.name for event in profile.events() if event.name in SYNCS))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=1344)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    preset = PRESETS[args.preset]
    model = preset.build(args.device, dtype)
    inputs = batch_inputs(preset.inputs(args.image_size), 1, args.device, dtype)
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model)
    result = {
        "preset": args.preset,
        "image_size": args.image_size,
        "vision_blocks": len(adapter.vision_blocks(model)),
        "decoder_layers": len(adapter.decoder_layers(model)),
        "counts": {},
    }
    tables = TowerTables(model)
    for name, press in VARIANTS.items():

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
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
