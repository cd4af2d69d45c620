"""Long videos within GPU memory (``dash-vlm bench --measure video-memory``): peak memory, KV cache and speed of one
generation at batch 1 against the video's frame count, vanilla against DASH (and DASH with vision-tower halting), on
real-shape bf16 models (meant for a GPU).

    dash-vlm bench --measure video-memory --preset qwen2-vl-7b --image-size 448 --video-frames 128,256,512,1024 \
        --output video_memory.json --plot video_memory.png
    dash-vlm bench --measure video-memory --preset qwen2-vl-7b --image-size 448 --video-frames 4608,5120 \
        --variants vanilla --prefill-only --output limit.json   # the limit itself: does a prefill that long fit?
    dash-vlm bench --measure video-memory --merge video_memory.json limit.json --plot limits.png   # several runs

Frame counts are measured in increasing order; a variant that runs out of memory is recorded as ``oom`` and not
tried at larger counts. Each run is ``bench.run_once`` (``new_tokens`` greedy tokens): its peak is the prefill's (the
decode steps add a few tokens of cache); with ``prefill_only``, one prefill (``logits_to_keep=1``), for probing the
largest count that fits, where a prefill takes minutes. The KV cache of vanilla is the dynamic cache's size (every
layer holds every token); DASH's is its press's ``kv_cache_bytes``. A straight line through each variant's peaks
gives the frame count at which it would reach the GPU's memory: an extrapolation, reported as such next to the
largest count measured. A run that fails records the allocator's account (free, reserved but unallocated), where in
the model it failed and the peak reached before; every document records ``PYTORCH_CUDA_ALLOC_CONF``, which decides
whether fragmentation or the memory itself sets the limit.
"""

from __future__ import annotations

import json
import os
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dash_vlm.bench.config import BenchConfig, dash_variants, model_dtype
from dash_vlm.bench.run import batch_inputs, run_once
from dash_vlm.bench.timers import StageTimers, device_name
from dash_vlm.chunking import ALLOCATOR_SETTINGS
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress

VARIANTS = ("vanilla", "control", "dash", "dash+vision")  # control: the ratio-0 press, its prefill chunks alone
DEFAULT_VARIANTS = ("vanilla", "dash", "dash+vision")
COLORS = dict(zip(VARIANTS, ("C0", "C3", "C1", "C2"), strict=True))
MERGED_KEYS = ("preset", "side", "rows", "capacity_bytes")  # what a result file must hold to be merged


def validate(config: BenchConfig, prefill_only: bool, variants: list[str], decoder_layers: int | None) -> None:
    """``ValueError`` for no frame counts, variants that are not distinct names of ``VARIANTS``, or not one nonzero
    decoder and vision ratio."""
    if not config.video_frames:
        raise ValueError("video_frames (--video-frames): --measure video-memory needs the frame counts to measure")
    if not variants or any(name not in VARIANTS for name in variants) or len(set(variants)) < len(variants):
        raise ValueError(f"variants (--variants) must be distinct names among {', '.join(VARIANTS)}, got {variants}")
    dash_variants(config, "video-memory")


def cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token in every attention layer of the decoder (a hybrid decoder's recurrent layers hold
    states of a fixed size instead)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = text.num_hidden_layers - len(adapter_for(config).recurrent_layers(config))
    return 2 * layers * text.num_key_value_heads * head_dim * dtype.itemsize


def run(config: BenchConfig, prefill_only: bool, variants: list[str], decoder_layers: int | None) -> dict:
    """Measure each variant at each frame count (``config.video_frames``, frames of ``config.image_sizes[0]`` px),
    every press with the halting fields of ``config.halting`` (``prefill_chunk``: the chunks of its prefill), on the
    preset's decoder or one of ``decoder_layers`` layers; the JSON document."""
    presses = dash_variants(config, "video-memory")
    preset = PRESETS[config.preset]
    side = config.image_sizes[0]
    dtype = model_dtype(config.device)
    model = preset.build(config.device, dtype, layers=decoder_layers)
    on_gpu = config.device.startswith("cuda")
    weights = torch.cuda.memory_allocated() if on_gpu else 0
    capacity = torch.cuda.get_device_properties(config.device).total_memory if on_gpu else 0
    timers = StageTimers(model)
    rows, failed = [], set()
    for frames in tqdm(sorted(config.video_frames), desc=f"{config.preset} video memory"):
        if failed >= set(variants):
            rows += [{"frames": frames, "variant": name, "oom": True, "skipped": True} for name in variants]
            continue
        inputs = batch_inputs(preset.inputs(side, config.text_tokens, frames=frames), 1, config.device, dtype)
        tokens = inputs["input_ids"].shape[1]
        for name in variants:
            row = {"frames": frames, "tokens": tokens, "variant": name}
            if name in failed:
                rows.append(row | {"oom": True, "skipped": True})
                continue
            press = None if presses[name] is None else DeltaPress(**presses[name] | config.halting)
            try:
                if prefill_only:
                    figures = prefill_once(model, inputs, press, timers)
                else:
                    figures = run_once(model, inputs, press, timers, config.new_tokens)
            except torch.OutOfMemoryError as error:
                failed.add(name)
                rows.append(row | {"oom": True} | describe_oom(error, config.device if on_gpu else None))
                print(json.dumps(rows[-1]), flush=True)
                continue
            finally:
                if on_gpu:  # every run starts from an empty cache, so that its peak is its own
                    torch.cuda.empty_cache()
            stats = None if press is None else press.last_stats[0]
            row |= {key: value for key, value in figures.items() if key.endswith("_ms")}
            row["peak_memory_bytes"] = figures["peak_memory_bytes"]
            row["kept"] = tokens if stats is None else stats.kept
            row["kv_cache_bytes"] = (
                tokens * cache_bytes_per_token(model.config, dtype) if stats is None else stats.kv_cache_bytes
            )
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    timers.remove()
    return {
        "preset": config.preset,
        "device": device_name(model),
        "side": side,
        "new_tokens": config.new_tokens,
        "weights_bytes": weights,
        "capacity_bytes": capacity,
        "allocator": next(filter(None, map(os.environ.get, ALLOCATOR_SETTINGS)), "default"),
        "prefill_chunk": DeltaPress(**config.halting).prefill_chunk,
        "decoder_layers": model.config.get_text_config().num_hidden_layers,
        "rows": rows,
        "fits": extrapolate(rows, capacity),
    }


def prefill_once(model: torch.nn.Module, inputs: dict, press: DeltaPress | None, timers: StageTimers) -> dict:
    """One prefill and its stage times and peak memory."""
    device = inputs["input_ids"].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timers.reset()
    with torch.inference_mode(), press(model) if press is not None else nullcontext():
        model(**inputs, use_cache=True, logits_to_keep=1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return timers.milliseconds() | {"peak_memory_bytes": peak}


def describe_oom(error: torch.OutOfMemoryError, device: str | None) -> dict:
    """The allocator's account of a failed allocation, where in the model it failed, and the peak reached before."""
    frames = traceback.extract_tb(error.__traceback__)
    model_frames = [
        f"{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in frames
        if "transformers" in f.filename or "dash_vlm" in f.filename
    ]
    return {
        "error": str(error).split(" If reserved")[0],
        "failed_in": model_frames[-3:],
        "peak_before_failure_bytes": torch.cuda.max_memory_allocated(device) if device else 0,
    }


SETTINGS = ("allocator", "prefill_chunk")  # what a merged run's rows are tagged with


def series(row: dict, rows: list[dict]) -> str:
    """The name of a row's line in tables and plots: its variant, and each of ``SETTINGS`` that differs among
    ``rows``."""
    differing = [key for key in SETTINGS if len({str(other.get(key)) for other in rows}) > 1]
    return ", ".join([row["variant"], *(f"{key} {row.get(key)}" for key in differing)])


def extrapolate(rows: list[dict], capacity: int) -> dict:
    """Per series (:func:`series`): the largest frame count measured, and where a line through its peaks reaches
    ``capacity``; ``bytes_per_frame``, the slope, lets a user predict their own limit."""
    result = {}
    for name in sorted({series(row, rows) for row in rows}, key=lambda name: name.split(",")[0]):
        points = [
            (row["frames"], row["peak_memory_bytes"]) for row in rows if series(row, rows) == name and "oom" not in row
        ]
        entry = {"largest_measured": max((frames for frames, _ in points), default=None)}
        if len(points) >= 2 and capacity:
            slope, intercept = np.polyfit(*zip(*points, strict=True), 1)
            entry |= {"bytes_per_frame": float(slope), "fixed_bytes": float(intercept)}
            if slope > 0:
                entry["frames_at_capacity_extrapolated"] = int((capacity - intercept) / slope)
        result[name] = entry
    return result


def merge(documents: list[dict]) -> dict:
    """One document of the rows of several runs of one preset and side, each row tagged with its run's allocator and
    ``prefill_chunk``."""
    for number, document in enumerate(documents, 1):
        missing = [key for key in MERGED_KEYS if key not in document]
        if missing:
            raise ValueError(f"result {number} of {len(documents)} is no video-memory result: it lacks {missing}")
    first = documents[0]
    for document in documents[1:]:
        if (document["preset"], document["side"]) != (first["preset"], first["side"]):
            raise ValueError("--merge needs runs of one preset and frame side")
    unset = {"allocator": "default", "prefill_chunk": 0}  # a run from before prefill_chunk existed chunked nothing
    rows = [
        {key: document.get(key, unset[key]) for key in SETTINGS} | row
        for document in documents
        for row in document["rows"]
    ]
    return first | {
        "rows": sorted(rows, key=lambda row: row["frames"]),
        "fits": extrapolate(rows, first["capacity_bytes"]),
    }


def plot(document: dict, path: Path) -> None:
    """Peak memory and KV cache against frames per variant; runs out of memory marked where they failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    gib = 2**30
    names = sorted({series(row, document["rows"]) for row in document["rows"]})
    for number, name in enumerate(names):
        rows = [row for row in document["rows"] if series(row, document["rows"]) == name]
        variant = rows[0]["variant"]
        color = COLORS[variant] if len(names) <= len(VARIANTS) else f"C{number % 10}"
        fitted = [row for row in rows if "oom" not in row]
        failed = [row for row in rows if row.get("oom") and not row.get("skipped")]
        frames = [row["frames"] for row in fitted]
        if fitted:
            axis.plot(
                frames, [row["peak_memory_bytes"] / gib for row in fitted], "-o", color=color, label=f"{name}: peak"
            )
        if fitted and variant != "dash+vision":  # its cache is DASH's
            axis.plot(
                frames, [row["kv_cache_bytes"] / gib for row in fitted], ":", color=color, label=f"{name}: KV cache"
            )
        if failed:
            peaks = [(row.get("peak_before_failure_bytes") or document["capacity_bytes"]) / gib for row in failed]
            axis.plot(
                [row["frames"] for row in failed],
                peaks,
                "x",
                color=color,
                markersize=10,
                mew=2,
                label=f"{name}: out of memory (peak before)",
            )
    if document["capacity_bytes"]:
        axis.axhline(document["capacity_bytes"] / gib, color="k", linewidth=0.8, label="GPU memory")
    axis.set_xlabel(f"video frames ({document['side']} px)")
    axis.set_ylabel("GiB")
    allocators = sorted({row.get("allocator", document.get("allocator", "default")) for row in document["rows"]})
    axis.set_title(
        f"{document['preset']}, {document['device']}, batch 1; allocator: {', '.join(allocators)}", fontsize=9
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
