"""Time of every vision-tower block in a whole tower pass, vanilla and halting (run on a GPU):

    python tests/vision_block_times.py --preset qwen2.5-vl-7b --image-size 2016 --output blocks.json

CUDA events around each block (pre- and post-hooks) in passes of the tower alone, vanilla and at each vision ratio,
median of ``--repeats`` passes; with the block kinds (windowed or full attention) and how many attention segments
each block runs, so that a gain below the ideal can be traced to the blocks that miss it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from pathlib import Path

import torch

from dash_vlm import DeltaPress
from dash_vlm.bench import batch_inputs
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS


def block_times(tower, blocks, inputs: dict, press: DeltaPress | None, model) -> tuple[list[float], list[int], float]:
    """Per-block milliseconds, per-block segment counts and the whole pass's milliseconds of one tower pass."""
    events, segments = [], []

    def start(module, args):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append([event])

    def stop(module, args, kwargs, output):  # kwargs as the block ran them: compact ones above the decision
        segments.append(int(kwargs["cu_seqlens"].numel()) - 1)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events[-1].append(event)

    handles = [block.register_forward_pre_hook(start) for block in blocks]
    handles += [block.register_forward_hook(stop, with_kwargs=True) for block in blocks]
    try:
        with torch.inference_mode(), press(model) if press is not None else nullcontext():
            first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            first.record()
            tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            last.record()
    finally:
        for handle in handles:
            handle.remove()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events], segments, first.elapsed_time(last)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=2016)
    parser.add_argument("--vision-ratios", default="0.5")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    model = preset.build("cuda", torch.bfloat16)
    inputs = batch_inputs(preset.inputs(args.image_size), 1, "cuda", torch.bfloat16)
    adapter = adapter_for(model)
    tower, blocks = adapter.vision_tower(model), adapter.vision_blocks(model)
    variants = {"vanilla": None} | {
        f"vision {ratio}": DeltaPress(compression_ratio=0.0, vision_compression_ratio=float(ratio))
        for ratio in args.vision_ratios.split(",")
    }
    full = set(getattr(model.config.vision_config, "fullatt_block_indexes", None) or range(len(blocks)))
    result = {"preset": args.preset, "image_size": args.image_size, "full_attention_blocks": sorted(full)}
    for name, press in variants.items():
        block_times(tower, blocks, inputs, press, model)  # warm-up
        runs = [block_times(tower, blocks, inputs, press, model) for _ in range(args.repeats)]
        per_block = [statistics.median(run[0][i] for run in runs) for i in range(len(blocks))]
        result[name] = {
            "tower_ms": statistics.median(run[2] for run in runs),
            "block_ms": per_block,
            "segments": runs[0][1],
            "windowed_blocks_ms": sum(t for i, t in enumerate(per_block) if i not in full),
            "full_blocks_ms": sum(t for i, t in enumerate(per_block) if i in full),
        }
        summary = {key: value for key, value in result[name].items() if key.endswith("_ms") and key != "block_ms"}
        print(name, json.dumps(summary), flush=True)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
