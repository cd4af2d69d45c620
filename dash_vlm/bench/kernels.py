"""Where the fast path spends its GPU time (``dash-vlm bench --measure kernels``, on a GPU): kernel times of the
decoder prefill or of one decode step, by kernel, from the PyTorch profiler.

    dash-vlm bench --measure kernels --stage prefill --preset qwen2-vl-7b --image-size 896 --output prefill.json
    dash-vlm bench --measure kernels --stage decode --preset qwen2-vl-7b --image-size 1344 --batch-size 8 \
        --output decode.json

Prefill: the prefill graph's ``run``, uncaptured (``capture=False``: the same kernels, launched one by one), vanilla
against DASH at the one nonzero decoder ratio, after warm-up calls; totals are the sums of the kernels' own GPU times
over ``repeats`` prefills, per prefill. Decode: one step of our decode graph (uncaptured, vanilla and DASH) against
transformers' compiled static-cache step (``generate(..., cache_implementation="static")``, the same greedy work) over
``new_tokens`` tokens; a marker kernel launched before every step splits the trace into steps, and the figures are
per step, the mean over the profiled steps.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StoppingCriteria

from dash_vlm.bench.config import BenchConfig, needs_gpu, the_image_size, the_ratio
from dash_vlm.bench.run import batch_inputs
from dash_vlm.graphs import StaticDecoder, _DecodeGraph
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress

STAGES = ("prefill", "decode")
KINDS = (  # first match wins; kernel names of cuBLAS, cuDNN, SDPA's backends, inductor and ATen
    ("attention", ("fmha", "flash", "attention", "softmax", "cudnn")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")),
    ("copy", ("copy", "cat", "index", "scatter", "gather")),
)


def validate(config: BenchConfig, stage: str) -> None:
    """``ValueError`` for what :func:`run` cannot profile: no GPU, several image sizes or decoder ratios, a hybrid
    decoder (the fast path refuses it), an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"stage (--stage) must be one of {', '.join(STAGES)}, got {stage!r}")
    needs_gpu(config, "kernels", "profiles CUDA kernels")
    the_image_size(config, "kernels")
    the_ratio(config, "kernels")
    model_type = PRESETS[config.preset].model_classes()[0].model_type
    if adapter_for(model_type).hybrid_decoder:
        raise ValueError(
            f"--measure kernels profiles the fast path, which refuses a hybrid decoder; preset {config.preset!r} is "
            f"{model_type!r}"
        )


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, words in KINDS if any(word in name for word in words)), "elementwise")


def by_kind(kernels: dict[str, float]) -> dict[str, float]:
    totals = defaultdict(float)
    for name, milliseconds in kernels.items():
        totals[kind_of(name)] += milliseconds
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def prefill_kernels(decoder: StaticDecoder, inputs: dict, press: DeltaPress | None, repeats: int) -> dict:
    """Per-kernel GPU milliseconds of one prefill (the mean over ``repeats``), largest first."""
    for _ in range(2):
        decoder.prefill(inputs, press)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            decoder.prefill(inputs, press)
        torch.cuda.synchronize()
    kernels = {}
    for event in profiler.key_averages():
        milliseconds = event.device_time_total / 1000 / repeats
        if milliseconds > 0:
            kernels[event.key] = milliseconds
    return dict(sorted(kernels.items(), key=lambda item: -item[1]))


def traced_kernels(work: Callable[[], object]) -> list[dict]:
    """The GPU kernels ``work()`` ran, as chrome-trace events (``name``, ``ts``, ``dur`` in microseconds), in order."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        work()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    return sorted((event for event in events if event.get("cat") == "kernel"), key=lambda event: event["ts"])


def step_kernels(generate: Callable[[], object]) -> tuple[dict, int, float]:
    """Per-kernel GPU milliseconds of one decode step, the number of steps profiled and the mean span of a step on the
    GPU (first kernel to last), from a call of ``generate`` that launches the marker kernel before every decode step."""
    (marker,) = {event["name"] for event in traced_kernels(lambda: torch.cuda._sleep(1))}
    kernels = traced_kernels(generate)
    markers = [index for index, event in enumerate(kernels) if event["name"] == marker]
    if len(markers) < 3:
        names = sorted({event["name"][:60] for event in kernels})[:40]
        raise RuntimeError(f"found {len(markers)} markers {marker!r} in the trace; kernels seen: {names}")
    steps = len(markers) - 1  # the kernels between the first and the last marker: whole steps only
    totals = defaultdict(float)
    for event in kernels[markers[0] + 1 : markers[-1]]:
        if event["name"] != marker:
            totals[event["name"]] += event["dur"] / 1000 / steps
    span = (kernels[markers[-1]]["ts"] - kernels[markers[0]]["ts"]) / 1000 / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1])), steps, span


class StepMarker(StoppingCriteria):
    """Launches the marker kernel after every token of ``generate``."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        torch.cuda._sleep(1)  # the marker
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def marked_run_step(run_step: Callable) -> Callable:
    def run(self):
        torch.cuda._sleep(1)
        run_step(self)

    return run


def report(document: dict, name: str, kernels: dict, extra: str = "") -> None:
    document[name] = {"total_ms": sum(kernels.values()), "by_kind": by_kind(kernels), "kernels": kernels}
    kinds = ", ".join(f"{kind} {milliseconds:.2f}" for kind, milliseconds in document[name]["by_kind"].items())
    print(f"{name}: {document[name]['total_ms']:.2f} ms of kernels {extra}({kinds})", flush=True)
    for key, milliseconds in list(kernels.items())[:25]:
        print(f"  {milliseconds:8.3f}  {key[:110]}")


def run(config: BenchConfig, stage: str) -> dict:
    """Profile ``stage`` of the fast path on the preset at its one image size, vanilla against DASH; the JSON
    document."""
    # the profiler's synchronisations and the marker kernels act on the current device: make it the model's
    with torch.cuda.device(config.device):
        return profile_stage(config, stage)


def profile_stage(config: BenchConfig, stage: str) -> dict:
    preset = PRESETS[config.preset]
    model = preset.build(config.device, torch.bfloat16)
    size, ratio = the_image_size(config, "kernels"), the_ratio(config, "kernels")
    inputs = batch_inputs(preset.inputs(size, config.text_tokens), config.batch_size, config.device, torch.bfloat16)
    decoder = StaticDecoder(model, capture=False)
    document = {
        "stage": stage,
        "preset": config.preset,
        "image_size": size,
        "batch_size": config.batch_size,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "device": torch.cuda.get_device_name(),
    }
    presses = (("vanilla", None), (f"DASH {ratio:g}", DeltaPress(compression_ratio=ratio)))
    with torch.inference_mode():
        if stage == "prefill":
            for name, press in presses:
                report(document, name, prefill_kernels(decoder, inputs, press, config.repeats))
            return document
        run_step = _DecodeGraph.run_step
        _DecodeGraph.run_step = marked_run_step(run_step)
        try:
            for name, press in presses:
                decoder.generate(inputs, press, config.new_tokens, stop_at_end=False)  # buffers, warm-up
                kernels, steps, span = step_kernels(
                    lambda press=press: decoder.generate(inputs, press, config.new_tokens, stop_at_end=False)
                )
                report(document, f"graphs, {name}", kernels, f"per step over {steps} steps, span {span:.2f} ms ")
                document[f"graphs, {name}"]["gpu_span_ms"] = span
        finally:
            _DecodeGraph.run_step = run_step
        settings = dict(
            max_new_tokens=config.new_tokens,
            min_new_tokens=config.new_tokens,
            do_sample=False,
            cache_implementation="static",
            stopping_criteria=[StepMarker()],
        )
        for _ in range(2):  # compiles the step, then runs it compiled
            model.generate(**inputs, **settings)
        kernels, steps, span = step_kernels(lambda: model.generate(**inputs, **settings))
        report(document, "static, vanilla", kernels, f"per step over {steps} steps, span {span:.2f} ms ")
        document["static, vanilla"]["gpu_span_ms"] = span
    return document
