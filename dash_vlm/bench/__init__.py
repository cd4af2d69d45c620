"""Speed harness: vanilla against DASH on real model shapes with random weights (``dash-vlm bench``).

For every image size, vanilla (no press) and DASH at every pair of a decoder compression ratio and a vision-tower
compression ratio run in the same process, in turns, after warm-up; each run is one ``generate`` call timed by CUDA
events on a GPU (``perf_counter`` on a CPU) through hooks on the vision tower, the decoder and the prefill module,
plus a stopping criterion that marks the first token. The ideal decoder gain comes from timing one decoder layer at
the prompt length ``T`` and at the kept length ``K``: ``L t(T) / ((s + 1) t(T) + (L - s - 1) t(K))`` (a hybrid
decoder: one layer of each kind, each layer counted at its kind's time, ``decoder_ideal_speedup``); the ideal
tower gain likewise from one vision block at every patch and at the kept patches (the block's arguments in a vanilla
and in a halting pass): ``B t(N) / ((s_v + 1) t(N) + (B - s_v - 1) t(K_v))``. Medians of the repeats are reported.

With ``device_map="auto"`` the model is built on the first GPU and dispatched over every visible GPU by accelerate
(balanced, as transformers' ``device_map="auto"``); CUDA events of one device do not wait for another, so every
timer then synchronises all the GPUs the model uses and reads the wall clock.

Modules, one concern each: ``config`` (``BenchConfig`` and its checks), ``timers`` (stage, token and replay clocks),
``run`` (the run loop, rows and latency entries), ``ideal`` (layer and block timings, ideal gains), ``floor`` (the
physical floor beside every row), ``report`` (text table and plot).

The other measurements of ``dash-vlm bench --measure`` take the same ``BenchConfig``: ``measures`` (what each reads,
and its defaults), ``attention`` (the attention settings timed), ``attention_check`` (the settings checked against
SDPA), ``kernels`` (the fast path's GPU kernels, by the PyTorch profiler), ``syncs`` (host synchronisations of a
prefill), ``tower_blocks`` (each vision block's time in a tower pass), ``video_memory`` (peak memory and KV cache
against a video's frames, and the longest video that fits).
"""

from __future__ import annotations

import json
from pathlib import Path

from dash_vlm.bench.config import (
    DEVICE_MAPS,
    MAX_IMAGE_SIDE,
    NOISE,
    PATHS,
    STAGES,
    UNPADDED,
    BenchConfig,
    check_device,
    preset_config,
)
from dash_vlm.bench.ideal import (
    decoder_ideal_speedup,
    ideal_speedup,
    layer_kinds,
    layer_milliseconds,
    vision_block_milliseconds,
)
from dash_vlm.bench.report import plot, shape_label, table
from dash_vlm.bench.run import batch_inputs, dispatch_over_gpus, latency_entries, run_bench, run_once, size_rows
from dash_vlm.bench.timers import (
    StageTimers,
    TokenTimer,
    WallTimer,
    device_name,
    model_devices,
    replay_milliseconds,
    timer_factory,
)

__all__ = [
    "DEVICE_MAPS",
    "MAX_IMAGE_SIDE",
    "NOISE",
    "PATHS",
    "STAGES",
    "UNPADDED",
    "BenchConfig",
    "StageTimers",
    "TokenTimer",
    "WallTimer",
    "batch_inputs",
    "check_device",
    "decoder_ideal_speedup",
    "device_name",
    "dispatch_over_gpus",
    "ideal_speedup",
    "latency_entries",
    "layer_kinds",
    "layer_milliseconds",
    "main",
    "model_devices",
    "plot",
    "preset_config",
    "replay_milliseconds",
    "run_bench",
    "run_once",
    "shape_label",
    "size_rows",
    "table",
    "timer_factory",
    "vision_block_milliseconds",
]


def main(config: BenchConfig, output: Path, plot_path: Path | None) -> dict:
    """Run the bench of ``config``, write its JSON to ``output`` (and its plot), print its table."""
    document = run_bench(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1))
    if plot_path is not None:
        plot(document, plot_path)
    print(table(document))
    return document
