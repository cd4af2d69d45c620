"""Long videos within GPU memory: peak memory, KV cache and speed of one generation at batch 1 against the video's
frame count, vanilla against DASH (and DASH with vision-tower halting), on real-shape bf16 models (run on a GPU).

    python tests/video_memory.py --preset qwen2-vl-7b --side 448 --frames 128,256,512,1024 \
        --output video_memory.json --plot video_memory.png
    python tests/video_memory.py --preset qwen2-vl-7b --frames 4608,5120 --variants vanilla --prefill-only \
        --output limit.json   # the limit itself: does a prefill of that many frames fit?
    python tests/video_memory.py --merge video_memory.json limit.json --plot limits.png   # one plot of several runs

Frame counts are measured in increasing order; a variant that runs out of memory is recorded as ``oom`` and not
tried at larger counts. Each run is ``bench.run_once`` (``new_tokens`` greedy tokens): its peak is the prefill's (the
decode steps add a few tokens of cache); with ``--prefill-only``, one prefill (``logits_to_keep=1``), for probing the
largest count that fits, where a prefill takes minutes. The KV cache of vanilla is the dynamic cache's size (every
layer holds every token); DASH's is its press's ``kv_cache_bytes``. A straight line through each variant's peaks
gives the frame count at which it would reach the GPU's memory: an extrapolation, reported as such next to the
largest count measured. A run that fails records the allocator's account (free, reserved but unallocated), where in
the model it failed and the peak reached before; every document records ``PYTORCH_CUDA_ALLOC_CONF``, which decides
whether fragmentation or the memory itself sets the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dash_vlm import DeltaPress
from dash_vlm.bench import StageTimers, batch_inputs, device_name, run_once
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS

VARIANTS = {
    "vanilla": None,
    "dash": dict(compression_ratio=0.667),
    "dash+vision": dict(compression_ratio=0.667, vision_compression_ratio=0.5),
}


def cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token in every attention layer of the decoder (a hybrid decoder's recurrent layers hold
    states of a fixed size instead)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = text.num_hidden_layers - len(adapter_for(config).recurrent_layers(config))
    return 2 * layers * text.num_key_value_heads * head_dim * dtype.itemsize


def measure(args) -> dict:
    preset = PRESETS[args.preset]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = preset.build(args.device, dtype)
    on_gpu = args.device.startswith("cuda")
    weights = torch.cuda.memory_allocated() if on_gpu else 0
    capacity = torch.cuda.get_device_properties(args.device).total_memory if on_gpu else 0
    timers = StageTimers(model)
    rows, failed = [], set()
    for frames in tqdm(args.frames, desc=f"{args.preset} video memory"):
        if failed >= set(args.variants):
            rows += [{"frames": frames, "variant": name, "oom": True, "skipped": True} for name in args.variants]
            continue
        inputs = batch_inputs(preset.inputs(args.side, 64, frames=frames), 1, args.device, dtype)
        tokens = inputs["input_ids"].shape[1]
        for name in args.variants:
            settings = VARIANTS[name]
            row = {"frames": frames, "tokens": tokens, "variant": name}
            if name in failed:
                rows.append(row | {"oom": True, "skipped": True})
                continue
            press = None if settings is None else DeltaPress(**settings)
            try:
                if args.prefill_only:
                    figures = prefill_once(model, inputs, press, timers)
                else:
                    figures = run_once(model, inputs, press, timers, args.new_tokens)
            except torch.OutOfMemoryError as error:
                failed.add(name)
                rows.append(row | {"oom": True} | describe_oom(error, args.device if on_gpu else None))
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
        "preset": args.preset,
        "device": device_name(model),
        "side": args.side,
        "new_tokens": args.new_tokens,
        "weights_bytes": weights,
        "capacity_bytes": capacity,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default",
        "rows": rows,
        "fits": extrapolate(rows, capacity),
    }


def prefill_once(model, inputs: dict, press: DeltaPress | None, timers: StageTimers) -> dict:
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


def extrapolate(rows: list[dict], capacity: int) -> dict:
    """Per variant: the largest frame count measured, and where a line through its peaks reaches ``capacity``."""
    result = {}
    for name in VARIANTS:
        points = [
            (row["frames"], row["peak_memory_bytes"]) for row in rows if row["variant"] == name and "oom" not in row
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
    """One document of the rows of several runs of one preset and side, each row tagged with its allocator."""
    first = documents[0]
    for document in documents[1:]:
        if (document["preset"], document["side"]) != (first["preset"], first["side"]):
            raise ValueError("--merge needs runs of one preset and frame side")
    rows = [
        row | {"allocator": document.get("allocator", "default")} for document in documents for row in document["rows"]
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
    for name, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
        rows = [row for row in document["rows"] if row["variant"] == name]
        fitted = [row for row in rows if "oom" not in row]
        failed = [row for row in rows if row.get("oom") and not row.get("skipped")]
        frames = [row["frames"] for row in fitted]
        if fitted:
            axis.plot(
                frames, [row["peak_memory_bytes"] / gib for row in fitted], "-o", color=color, label=f"{name}: peak"
            )
        if fitted and name != "dash+vision":  # its cache is DASH's
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--side", type=int, default=448, help="frame side in px")
    parser.add_argument("--frames", type=lambda text: sorted(int(v) for v in text.split(",")))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS))
    parser.add_argument("--prefill-only", action="store_true", help="one prefill per run, no decoding")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="plot these result files, measure nothing")
    args = parser.parse_args()
    if args.merge:
        if args.plot is None:
            parser.error("--merge needs --plot")
        plot(merge([json.loads(path.read_text()) for path in args.merge]), args.plot)
        return
    if args.preset is None or args.frames is None or args.output is None:
        parser.error("measuring needs --preset, --frames and --output")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"--variants must be among {list(VARIANTS)}, got {sorted(unknown)}")
    document = measure(args) | {"command": " ".join(sys.argv)}
    args.output.write_text(json.dumps(document, indent=1))
    if args.plot is not None:
        plot(document, args.plot)


if __name__ == "__main__":
    main()
