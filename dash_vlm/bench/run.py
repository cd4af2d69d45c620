"""The bench's run loop: every prompt shape, path and variant in turns, and the rows and latency entries made from
the runs."""

from __future__ import annotations

import datetime
import gc
import logging
import statistics
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from tqdm import tqdm

from dash_vlm.attention import attention_of, load_implementation, use_attention
from dash_vlm.bench.config import NOISE, UNPADDED, BenchConfig, model_dtype
from dash_vlm.bench.floor import COUNTED_ATTENTION, DevicePeak, Work, count_prefill, measure_peak
from dash_vlm.bench.ideal import (
    decoder_ideal_speedup,
    ideal_speedup,
    layer_kinds,
    layer_milliseconds,
    vision_block_milliseconds,
)
from dash_vlm.bench.timers import StageTimers, TokenTimer, device_name, model_devices
from dash_vlm.graphs import StaticDecoder
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS, Preset
from dash_vlm.press import DeltaPress

logger = logging.getLogger(__name__)


def dispatch_over_gpus(model: nn.Module) -> dict[str, int]:
    """Spread ``model`` (on the first GPU) over every visible GPU, balanced as transformers' ``device_map="auto"``;
    returns the device map."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = model._no_split_modules
    memory = get_balanced_memory(model, no_split_module_classes=no_split, dtype=model.dtype)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=model.dtype)
    dispatch_model(model, device_map=device_map)
    return device_map


def batch_inputs(inputs: dict, batch_size: int, device: str | torch.device, dtype: torch.dtype) -> dict:
    """``batch_size`` copies of one prompt (equal lengths, so no padding), on the device."""
    batched = {key: torch.cat([value] * batch_size) for key, value in inputs.items()}
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in batched.items()
    }


def run_once(
    model: nn.Module,
    inputs: dict,
    press: DeltaPress | None,
    timers: StageTimers,
    new_tokens: int,
    path: str = "eager",
    decoder: StaticDecoder | None = None,
) -> dict:
    """One timed generation of exactly ``new_tokens`` tokens on ``path`` (on ``decoder``'s fast path when given);
    returns the figures of that run.

    The decode speed comes from the median decode step (eager and static paths: a shared host stalls now and then for
    a few milliseconds, and a mean over a few dozen host-bound steps would carry each stall into the figure) or from
    the replayed steps together (graphs path: one timer around them). ``answer_ms`` is the time to the last token.
    """
    gc.collect()  # every run starts collected: halted caches of earlier runs remove their layer hooks when collected,
    # which transformers' compiled static-cache step needs (a stale hook would make it recompile)
    devices = model_devices(model)
    gpus = [device for device in devices if device.type == "cuda"]
    for device in gpus:
        torch.cuda.reset_peak_memory_stats(device)
    timers.reset()
    if decoder is not None:
        output = decoder.generate(inputs, press, new_tokens, stop_at_end=False)
        figures = timers.milliseconds()
        figures["ttft_ms"] = output.first_token.milliseconds()
        figures["decode_step_ms"] = output.decode.milliseconds() / (new_tokens - 1)
        figures["answer_ms"] = output.answer.milliseconds()
        figures["captured"] = output.captured
    else:
        tokens = TokenTimer(devices[0], timers.new_timer)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, stopping_criteria=[tokens])
        if path == "static":
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode(), press(model) if press is not None else nullcontext():
            model.generate(**inputs, **kwargs)
        tokens.finish()
        figures = timers.milliseconds()
        figures["ttft_ms"] = tokens.timer.milliseconds()
        figures["decode_step_ms"] = statistics.median(step.milliseconds() for step in tokens.steps)
        figures["answer_ms"] = tokens.answer.milliseconds()
        figures["captured"] = False
    figures["decode_tokens_per_s"] = 1000 / figures["decode_step_ms"]
    figures["peak_memory_bytes"] = max((torch.cuda.max_memory_allocated(device) for device in gpus), default=0)
    return figures


def run_bench(config: BenchConfig) -> dict:
    """Measure every image size (or video frame count): on each path, vanilla and DASH at each (decoder ratio, vision
    ratio), in turns; returns the JSON document.

    Each repeat runs every (path, variant) once, the order rotated by one each repeat, so that drift of the shared
    machine spreads evenly; every variant's gain is against the vanilla runs of its path. A graphs-path run that
    captured a new graph is not counted (the warm-up rounds capture every shape).
    """
    preset: Preset = PRESETS[config.preset]
    dtype = model_dtype(config.device)
    model = preset.build(config.device, dtype, load_implementation(config.attn))
    use_attention(model, config.attn)  # as DashVLM.from_pretrained sets it
    device_map = dispatch_over_gpus(model) if config.device_map is not None else None
    sizes = config.image_sizes
    if not preset.dynamic_resolution and len(sizes) > 1:
        logger.warning("%s has a fixed input resolution: --image-size is ignored, one size is measured", preset.name)
        sizes = sizes[:1]
    # (side, frames) of each prompt measured: an image of each side, or a video of each frame count (frames 0: image)
    shapes = [(sizes[0], frames) for frames in config.video_frames] or [(size, 0) for size in sizes]
    timers = StageTimers(model)
    peak = measure_peak(model_devices(model)[0], dtype)
    decoders = {}
    if "graphs" in config.paths:  # on a CPU its static steps run uncaptured
        capture, max_graphs = config.device.startswith("cuda"), len(config.variants()) + 1
        decoders["graphs"] = StaticDecoder(model, capture=capture, max_graphs=max_graphs)
        decoders[UNPADDED] = StaticDecoder(model, capture=capture, max_graphs=1, prefill_bucket=1)
    rows, latency = [], []
    presses = {variant: config.press(variant) for variant in config.variants()}
    measured = config.runs()
    steps = len(shapes) * (config.warmup + config.repeats) * len(measured)
    try:
        with tqdm(total=steps, desc=f"bench {preset.name}") as progress:
            for size, frames in shapes:
                prompt = preset.inputs(size, config.text_tokens, frames=frames)
                inputs = batch_inputs(prompt, config.batch_size, config.device, dtype)
                # counted before the timed runs, whose halting statistics the rows then report
                works = {None: count_prefill(model, inputs, None)}
                works |= {variant: count_prefill(model, inputs, press) for variant, press in presses.items()}
                floors = Floors(works, peak, config.new_tokens)
                runs = {run: [] for run in measured}
                for repeat in range(config.warmup + config.repeats):
                    shift = repeat % len(measured)
                    for path, variant in measured[shift:] + measured[:shift]:
                        press = None if variant is None else presses[variant]
                        figures = run_once(model, inputs, press, timers, config.new_tokens, path, decoders.get(path))
                        if repeat >= config.warmup and not figures.pop("captured"):
                            runs[(path, variant)].append(figures)
                        progress.update()
                shape_latency = latency_entries(size, runs, floors)
                shape_rows = size_rows(model, inputs, size, config, presses, runs, shape_latency, floors)
                if frames:
                    for entry in [*shape_latency, *shape_rows]:
                        entry["video_frames"] = frames
                latency += shape_latency
                rows += shape_rows
    finally:
        timers.remove()
    return {
        "preset": preset.name,
        "config": {key: value for key, value in vars(config).items()},
        "device": device_name(model),
        "device_map": device_map,
        "dtype": str(dtype).removeprefix("torch."),
        "device_peak": peak.as_dict(),
        "attention_counted": {part: name in COUNTED_ATTENTION for part, name in attention_of(model).items()},
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "attention": attention_of(model),
        "linear_attention_kernels": adapter_for(model).recurrent_kernels(model),
        "graph_captures": {path: decoder.captures for path, decoder in decoders.items()},
        "graph_memory_bytes": {path: decoder.graph_memory_bytes for path, decoder in decoders.items()},
        "rows": rows,
        "latency": latency,
    }


@dataclass(frozen=True)
class Floors:
    """The work of each variant's prefill (``None``: vanilla) of one prompt shape and the device's measured peak: the
    floor beside every row (``bench.floor``)."""

    works: dict[tuple[float, float, str] | None, Work]
    peak: DevicePeak
    new_tokens: int

    def figures(self, variant: tuple[float, float, str] | None, measured: dict[str, float]) -> dict:
        return self.works[variant].figures(self.peak, self.new_tokens, measured)


def latency_entries(size: int, runs: dict, floors: Floors) -> list[dict]:
    """What users wait for, per (path, variant): median TTFT, decode step and answer time, their gains against eager
    vanilla when it was measured, and the floor (``floor``: the variant's work, its floor and the fraction of it
    reached). ``noisy``: the path's ratio-0 control departs from its vanilla by more than ``NOISE`` in prefill or
    TTFT."""
    medians = {run: median_figures(figures) for run, figures in runs.items() if figures}
    reference = medians.get(("eager", None))
    control_of = {path: variant for path, variant in runs if variant is not None and not any(variant[:2])}
    entries = []
    for (path, variant), figures in medians.items():
        vanilla, control = medians.get((path, None)), medians.get((path, control_of.get(path)))
        noisy = control is not None and any(
            abs(control[key] / vanilla[key] - 1) > NOISE for key in ("prefill_ms", "ttft_ms")
        )
        entry = {"image_size": size, "path": path, "variant": variant, "noisy": noisy}
        entry |= {key: figures[key] for key in ("ttft_ms", "decode_step_ms", "answer_ms", "prefill_ms")}
        if reference is not None:
            entry["ttft_speedup_vs_eager"] = reference["ttft_ms"] / figures["ttft_ms"]
            entry["answer_speedup_vs_eager"] = reference["answer_ms"] / figures["answer_ms"]
        entry["floor"] = floors.figures(variant, figures)
        entries.append(entry)
    return entries


def size_rows(
    model: nn.Module,
    inputs: dict,
    size: int,
    config: BenchConfig,
    presses: dict[tuple[float, float, str], DeltaPress],
    runs: dict,
    latency: list[dict],
    floors: Floors,
) -> list[dict]:
    """The rows of one prompt shape (image size, or video), one per path with halting and variant, from its runs,
    with the ideal gains of the decoder and the vision tower from per-layer and per-block timings (taken once, on the
    eager path's modules) and the floor of vanilla and of the variant (``floor``)."""
    adapter = adapter_for(model)
    kinds = layer_kinds(model)
    stats = {variant: press.last_stats[0] for variant, press in presses.items()}
    lengths = sorted({length for s in stats.values() for length in (s.tokens, s.kept)})
    layer_ms = layer_milliseconds(model, inputs, lengths, config.repeats)
    if any(config.vision_ratios):
        vision_presses = {0.0: None} | {  # the tower's gain is timed without decoder halting, with DASH's score
            vision_ratio: config.press((0.0, vision_ratio, "dash"))
            for vision_ratio in config.vision_ratios
            if vision_ratio > 0
        }
        block, block_ms = vision_block_milliseconds(model, inputs, vision_presses, config.repeats)
    num_blocks = len(adapter.vision_blocks(model) or ())
    noisy = {entry["path"] for entry in latency if entry["noisy"]}
    rows = []
    for path in config.paths:
        if path == "static":
            continue
        for (ratio, vision_ratio, method), press in presses.items():
            variant_stats = stats[(ratio, vision_ratio, method)]
            tokens, kept = variant_stats.tokens, variant_stats.kept
            at_tokens = {kind: times[tokens] for kind, times in layer_ms.items()}
            at_kept = {kind: times[kept] for kind, times in layer_ms.items()}
            ideal = decoder_ideal_speedup(kinds, variant_stats.decision_layer, at_tokens, at_kept)
            row = {"path": path, "method": method, "noisy": path in noisy}
            row |= summarize(
                size, ratio, config.batch_size, runs[(path, None)], runs[(path, (ratio, vision_ratio, method))]
            )
            row |= {"tokens": variant_stats.tokens, "kept": variant_stats.kept}
            row |= {"kv_cache_bytes": variant_stats.kv_cache_bytes * config.batch_size}
            row["floor"] = {
                "vanilla": floors.figures(None, row["vanilla"]),
                "dash": floors.figures((ratio, vision_ratio, method), row["dash"]),
            }
            row |= {"ideal_decoder_speedup": ideal, "fraction_of_ideal": row["decoder_speedup"] / ideal}
            deeper = kinds[variant_stats.decision_layer + 1 :]
            row["layer_ms"] = {  # one layer of each kind at T and K; how many layers of the kind, how many above s
                kind: {
                    "T": at_tokens[kind],
                    "K": at_kept[kind],
                    "layers": kinds.count(kind),
                    "deeper": deeper.count(kind),
                }
                for kind in layer_ms
            }
            if path == "graphs" and runs.get((UNPADDED, None)):
                unpadded = median_figures(runs[(UNPADDED, None)])
                row["vs_unpadded"] = {key: unpadded[key] / row["dash"][key] for key in ("decoder_ms", "ttft_ms")}
            vision_speedup = row["vanilla"]["vision_ms"] / row["dash"]["vision_ms"]
            ideal_vision = 1.0
            if vision_ratio > 0:
                decision = press.vision_scorer().layer(num_blocks)
                ideal_vision = ideal_speedup(num_blocks, decision, block_ms[0.0], block_ms[vision_ratio])
                row["vision_block_ms"] = {"block": block, "every_patch": block_ms[0.0], "kept": block_ms[vision_ratio]}
            row |= {
                "vision_ratio": vision_ratio,
                "vision_patches": variant_stats.vision_patches,
                "vision_kept": variant_stats.vision_kept,
                "vision_speedup": vision_speedup,
                "ideal_vision_speedup": ideal_vision,
                "fraction_of_ideal_vision": vision_speedup / ideal_vision,
            }
            rows.append(row)
    return rows


def median_figures(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def summarize(size: int, ratio: float, batch_size: int, vanilla_runs: list, dash_runs: list) -> dict:
    """The measured part of a row: medians of the repeats, the gains as ratios of medians, and every repeat's figures
    (``runs``)."""
    vanilla, dash = median_figures(vanilla_runs), median_figures(dash_runs)
    return {
        "image_size": size,
        "ratio": ratio,
        "batch_size": batch_size,
        "vanilla": vanilla,
        "dash": dash,
        "decoder_speedup": vanilla["decoder_ms"] / dash["decoder_ms"],
        "prefill_speedup": vanilla["prefill_ms"] / dash["prefill_ms"],
        "ttft_speedup": vanilla["ttft_ms"] / dash["ttft_ms"],
        "answer_speedup": vanilla["answer_ms"] / dash["answer_ms"],
        "decode_speed_ratio": dash["decode_tokens_per_s"] / vanilla["decode_tokens_per_s"],
        "runs": {"vanilla": vanilla_runs, "dash": dash_runs},
    }
