"""Time of every vision-tower block in a whole tower pass, vanilla and halting (``dash-vlm bench --measure
tower-blocks``, on a GPU):

    dash-vlm bench --measure tower-blocks --preset qwen2.5-vl-7b --image-size 2016 --output blocks.json

CUDA events around each block (pre- and post-hooks) in passes of the tower alone, vanilla and at each nonzero vision
ratio, median of ``repeats`` passes; with the block kinds (windowed or full attention) and how many attention segments
each block runs, so that a gain below the ideal can be traced to the blocks that miss it.
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext

import torch
from torch import nn

from dash_vlm.bench.config import BenchConfig, needs_gpu, the_image_size
from dash_vlm.bench.run import batch_inputs
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress


def vision_ratios(config: BenchConfig) -> list[float]:
    """The nonzero vision ratios of ``config``, each timed against vanilla; ``ValueError`` for none."""
    ratios = [ratio for ratio in config.vision_ratios if ratio]
    if not ratios:
        raise ValueError(
            f"vision_ratios (--vision-compression-ratios): --measure tower-blocks times the tower at each nonzero "
            f"vision ratio, got {config.vision_ratios}"
        )
    return ratios


def validate(config: BenchConfig) -> None:
    """``ValueError`` for no GPU, several image sizes, or no nonzero vision ratio."""
    needs_gpu(config, "tower-blocks", "times blocks with CUDA events")
    the_image_size(config, "tower-blocks")
    vision_ratios(config)


def block_times(
    tower: nn.Module, blocks: nn.ModuleList, inputs: dict, press: DeltaPress | None, model: nn.Module
) -> tuple[list[float], list[int], float]:
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


def run(config: BenchConfig) -> dict:
    """Time every block of the preset's tower at its one image size, vanilla and at each vision ratio; the JSON
    document."""
    with torch.cuda.device(config.device):  # CUDA events record on the current device: make it the model's
        return time_blocks(config)


def time_blocks(config: BenchConfig) -> dict:
    preset = PRESETS[config.preset]
    size = the_image_size(config, "tower-blocks")
    model = preset.build(config.device, torch.bfloat16)
    inputs = batch_inputs(preset.inputs(size, config.text_tokens), 1, config.device, torch.bfloat16)
    adapter = adapter_for(model)
    tower, blocks = adapter.vision_tower(model), adapter.vision_blocks(model)
    variants = {"vanilla": None} | {
        f"vision {ratio:g}": DeltaPress(compression_ratio=0.0, vision_compression_ratio=ratio)
        for ratio in vision_ratios(config)
    }
    full = set(getattr(model.config.vision_config, "fullatt_block_indexes", None) or range(len(blocks)))
    result = {"preset": config.preset, "image_size": size, "full_attention_blocks": sorted(full)}
    for name, press in variants.items():
        block_times(tower, blocks, inputs, press, model)  # warm-up
        runs = [block_times(tower, blocks, inputs, press, model) for _ in range(config.repeats)]
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
    return result
