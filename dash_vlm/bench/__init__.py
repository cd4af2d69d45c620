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
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import logging
import numbers
import platform
import statistics
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm import tqdm

from dash_vlm.attention import ATTENTION_CHOICES, attention_of, load_implementation, use_attention
from dash_vlm.bench.floor import COUNTED_ATTENTION, DevicePeak, Work, count_prefill, measure_peak
from dash_vlm.compact import take_tokens
from dash_vlm.graphs import StaticDecoder
from dash_vlm.models import MAX_FRAMES_LIMIT, adapter_for, model_types_with
from dash_vlm.models.presets import PRESETS, Preset
from dash_vlm.press import DeltaPress, Timer
from dash_vlm.scorers import SCORERS, DashScorer
from dash_vlm.vlm import FirstTokenTimer, gpu_index

logger = logging.getLogger(__name__)

STAGES = ("vision", "decoder", "prefill")
DEVICE_MAPS = (None, "auto")
PATHS = ("eager", "static", "graphs")  # HF generate; HF generate over its static cache; DashVLM's fast path
# With the graphs path, vanilla also runs on a fast path whose prefill is not padded to a bucket: the gains of the
# graphs path are given against it too, so that padding cannot inflate them.
UNPADDED = "unpadded"
NOISE = 0.03  # a ratio-0 control further than this from vanilla (prefill or TTFT) flags its rows noisy
MAX_IMAGE_SIDE = 8192  # the largest image (or frame) side measured: a larger one would not fit a GPU's memory


class WallTimer:
    """Wall time between construction and ``stop``, each taken after synchronising ``devices``: the timer of a model
    split over several GPUs (a host sync at both ends, so only for measuring)."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self._synchronize()
        self.start_time = time.perf_counter()

    def _synchronize(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

    def stop(self) -> None:
        self._synchronize()
        self.end_time = time.perf_counter()

    def milliseconds(self) -> float:
        return (self.end_time - self.start_time) * 1000


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters, in first-use order."""
    return list(dict.fromkeys(parameter.device for parameter in model.parameters()))


def timer_factory(model: nn.Module) -> Callable[[], Timer | WallTimer]:
    """Timers for ``model``: CUDA events (or ``perf_counter``) on one device, synchronised wall time on several."""
    devices = model_devices(model)
    if len(devices) > 1:
        return lambda: WallTimer(devices)
    return lambda: Timer(devices[0])


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


def check_device(device: str, name: str = "device", maps: Collection[str] = ()) -> None:
    """``ValueError`` naming ``name`` unless ``device`` is "cpu", "cuda" or "cuda:N" of a GPU torch sees, or one of
    ``maps`` (device maps such as "auto"): torch's own errors for other names ("meta") or a missing GPU come late and
    name neither the argument nor what it accepts."""
    if device in ("cpu", *maps):
        return
    index = None if isinstance(device, int) else gpu_index(device)  # a bare GPU index is no device name here
    if index is None:
        raise ValueError(f"{name} must be one of {', '.join(('cpu', 'cuda', 'cuda:N', *maps))}; got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ValueError(f"{name} {device!r} asks for GPU {index}, but torch sees {count} GPU(s); use cpu")


@functools.cache
def preset_config(name: str) -> transformers.PretrainedConfig:
    """The config of the model of preset ``name``, built on the meta device (no weights allocated)."""
    with torch.random.fork_rng(devices=[]):  # the tiny preset seeds torch when it builds
        return PRESETS[name].build("meta", torch.float32).config


@dataclass
class BenchConfig:
    """What ``dash-vlm bench`` measures; validated with ``ValueError``."""

    preset: str
    image_sizes: list[int]
    ratios: list[float]
    vision_ratios: list[float] = field(default_factory=lambda: [0.0])
    methods: list[str] = field(default_factory=lambda: ["dash"])
    halting: dict = field(default_factory=dict)  # every other DeltaPress field, by name; the press's defaults else
    batch_size: int = 1
    new_tokens: int = 32
    repeats: int = 10
    warmup: int = 2
    text_tokens: int = 64
    attn: str = "sdpa"
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    device_map: str | None = None
    paths: list[str] = field(default_factory=lambda: ["eager"])
    video_frames: list[int] = field(default_factory=list)  # a video of each frame count instead of an image

    def __post_init__(self) -> None:
        check_device(self.device)
        # new_tokens >= 2: a decode step to measure; a negative warmup would cut the counted rounds short
        for name, minimum in (("batch_size", 1), ("new_tokens", 2), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not self.paths or any(path not in PATHS for path in self.paths) or len(set(self.paths)) < len(self.paths):
            raise ValueError(f"paths must be distinct entries of {PATHS}, got {self.paths}")
        if "static" in self.paths and not {"eager", "graphs"} & set(self.paths):
            # the static path runs vanilla only (the press needs a dynamic cache): alone, no DASH variant would run
            raise ValueError(
                f"paths {self.paths}: 'static' measures vanilla only; add 'eager' or 'graphs', which measure DASH"
            )
        if "graphs" in self.paths and self.device_map is not None:
            raise ValueError("paths 'graphs' needs the model on one GPU; it cannot run with device_map")
        if "graphs" in self.paths and self.device.startswith("cuda") and self.warmup < 1:
            raise ValueError("paths 'graphs' on a GPU needs warmup >= 1: the runs that capture graphs are not counted")
        if self.device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map must be one of {DEVICE_MAPS}, got {self.device_map!r}")
        if self.device_map is not None and (not self.device.startswith("cuda") or torch.cuda.device_count() < 2):
            raise ValueError(
                f"device_map={self.device_map!r} splits the model over several GPUs; this machine has "
                f"{torch.cuda.device_count()} and device is {self.device!r}"
            )
        if self.attn not in ATTENTION_CHOICES:
            raise ValueError(f"attn must be one of {ATTENTION_CHOICES}, got {self.attn!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if not self.image_sizes or any(
            isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 28 <= size <= MAX_IMAGE_SIDE
            for size in self.image_sizes
        ):
            raise ValueError(
                f"image_sizes must be whole pixel sides from 28 to {MAX_IMAGE_SIDE} (MAX_IMAGE_SIDE), got "
                f"{self.image_sizes}"
            )
        model_type = PRESETS[self.preset].model_classes()[0].model_type
        if adapter_for(model_type).hybrid_decoder and {"static", "graphs"} & set(self.paths):
            # transformers 5.2 ignores cache_implementation for a model with its own cache class (Qwen3.5's); the
            # fast path refuses a hybrid decoder (DESIGN.md section 11)
            raise ValueError(
                f"paths {self.paths}: preset {self.preset!r} has a hybrid decoder, which runs on the 'eager' path only "
                "(transformers keeps its own cache class, no static cache; cuda_graphs refuses it)"
            )
        if self.video_frames:
            if not adapter_for(model_type).video:
                raise ValueError(
                    f"video_frames needs a model that takes video ({', '.join(model_types_with('video'))}); "
                    f"preset {self.preset!r} is {model_type!r}"
                )
            if len(self.image_sizes) != 1:
                raise ValueError(f"video_frames takes one frame side in image_sizes, got {self.image_sizes}")
            if any(frames < 2 or frames % 2 for frames in self.video_frames) or len(set(self.video_frames)) < len(
                self.video_frames
            ):
                raise ValueError(
                    f"video_frames must be distinct even counts >= 2 (frame pairs), got {self.video_frames}"
                )
            if max(self.video_frames) > MAX_FRAMES_LIMIT:
                raise ValueError(
                    f"video_frames must be at most {MAX_FRAMES_LIMIT} (MAX_FRAMES_LIMIT), got {max(self.video_frames)}"
                )
        sweeps = (("compression_ratio", "ratios"), ("vision_compression_ratio", "vision_ratios"), ("method", "methods"))
        for name, sweep in sweeps:
            if name in self.halting:
                raise ValueError(f"halting must not hold {name}: {sweep} sweeps it")
            if not getattr(self, sweep):
                raise ValueError(f"{sweep} must hold at least one value")
        for method in self.methods:  # also a method that no variant measures
            self.press((0.0, 0.0, method))
        for variant in self.variants():
            self.press(variant)  # validates every field
        if any(self.vision_ratios) and not adapter_for(model_type).halts_in_vision_tower:
            raise ValueError(
                f"vision_ratios > 0 need a model whose vision tower can halt "
                f"({', '.join(model_types_with('halts_in_vision_tower'))}); preset {self.preset!r} is {model_type!r}"
            )
        self._check_every_method_measured()
        config = preset_config(self.preset)
        for variant in self.variants():  # FastV's layer inside the decoder, decision layers with a deeper one left
            self.press(variant).check_model(config)

    def _check_every_method_measured(self) -> None:
        """``ValueError`` naming a method of ``methods`` that no variant measures: the sweep would report vanilla
        alone for it and look like a result."""
        measured = {method for _, _, method in self.variants()}
        for method in self.methods:
            if method in measured:
                continue
            if not SCORERS[method].vision_tower:
                raise ValueError(
                    f"methods: {method!r} cannot halt in the vision tower, so it runs only at vision ratio 0 with a "
                    f"decoder ratio above 0, which vision_ratios {self.vision_ratios} and ratios {self.ratios} lack"
                )
            raise ValueError(
                f"methods: {method!r} has nothing to measure: ratios {self.ratios} and vision_ratios "
                f"{self.vision_ratios} hold only 0, which halts nothing and is measured once, with the first method"
            )

    def variants(self) -> list[tuple[float, float, str]]:
        """Every (decoder ratio, vision ratio, method) measured against vanilla; ratios (0, 0), which halt nothing
        whatever the method, are measured once, with the first method: the noise control. A method that cannot halt
        in the vision tower (FastV) is measured at vision ratio 0 only."""
        return [
            (ratio, vision_ratio, method)
            for method in self.methods
            for vision_ratio in self.vision_ratios
            for ratio in self.ratios
            if (ratio or vision_ratio or method == self.methods[0])
            and (not vision_ratio or SCORERS.get(method, DashScorer).vision_tower)
        ]

    def press(self, variant: tuple[float, float, str]) -> DeltaPress:
        """The press of a variant: its ratios and method, and the other halting fields of ``halting``."""
        ratio, vision_ratio, method = variant
        return DeltaPress(**self.halting, compression_ratio=ratio, vision_compression_ratio=vision_ratio, method=method)

    def runs(self) -> list[tuple[str, tuple[float, float, str] | None]]:
        """Every (path, variant) measured in a round; variant ``None`` is vanilla. transformers' static cache path
        runs vanilla only: the press needs a dynamic cache; so does the unpadded fast path (``UNPADDED``)."""
        runs = [
            (path, variant) for path in self.paths for variant in [None, *([] if path == "static" else self.variants())]
        ]
        return runs + ([(UNPADDED, None)] if "graphs" in self.paths else [])


class StageTimers:
    """Times the first forward of the vision tower, the decoder and the prefill module in each run.

    Its hooks exist only from :meth:`reset` to the end of the first prefill: later forwards (decode steps, which
    transformers' static-cache path compiles) see the model without them.
    """

    def __init__(self, model: nn.Module):
        adapter = adapter_for(model)
        self.modules = {"vision": adapter.vision_tower(model), "decoder": adapter.decoder(model)}
        self.modules["prefill"] = adapter.prefill_module(model)
        self.new_timer = timer_factory(model)
        self.timers: dict[str, Timer | WallTimer] = {}
        self.handles = []

    def _starter(self, stage: str) -> Callable:
        def start(module, args):
            if stage not in self.timers:
                self.timers[stage] = self.new_timer()

        return start

    def _stopper(self, stage: str) -> Callable:
        def stop(module, args, output):
            timer = self.timers.get(stage)
            if timer is not None and not getattr(timer, "stopped", False):
                timer.stop()
                timer.stopped = True
            if stage == "prefill":  # the outermost module: every stage has run
                self.remove()

        return stop

    def reset(self) -> None:
        """Forget the last run's timers and watch the next prefill."""
        self.remove()
        self.timers = {}
        for stage, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._starter(stage)))
            self.handles.append(module.register_forward_hook(self._stopper(stage)))

    def milliseconds(self) -> dict[str, float]:
        return {f"{stage}_ms": self.timers[stage].milliseconds() for stage in STAGES}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def batch_inputs(inputs: dict, batch_size: int, device: str | torch.device, dtype: torch.dtype) -> dict:
    """``batch_size`` copies of one prompt (equal lengths, so no padding), on the device."""
    batched = {key: torch.cat([value] * batch_size) for key, value in inputs.items()}
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in batched.items()
    }


class TokenTimer(FirstTokenTimer):
    """A :class:`FirstTokenTimer` that also times every later token: ``steps`` holds one timer per decode step.

    ``new_timer`` makes the timers (default: CUDA events, or ``perf_counter``, on ``device``)."""

    def __init__(self, device: torch.device, new_timer: Callable[[], Timer | WallTimer] | None = None):
        super().__init__(device)
        self.new_timer = new_timer or (lambda: Timer(device))
        self.timer, self.answer, self.steps = self.new_timer(), self.new_timer(), []
        self._current: Timer | WallTimer | None = None  # the step in progress; the one after the last never ends

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._current is not None:
            self._current.stop()
            self.steps.append(self._current)
        self._current = self.new_timer()
        return super().__call__(input_ids, scores, **kwargs)

    def finish(self) -> None:
        """Mark the end of generation: ``answer`` then times the whole call."""
        self.answer.stop()


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


def layer_kinds(model: nn.Module) -> list[str]:
    """Each decoder layer's kind: "recurrent" (a hybrid decoder's linear-attention layers) or "attention"."""
    adapter = adapter_for(model)
    recurrent = adapter.recurrent_layers(model.config)
    return ["recurrent" if index in recurrent else "attention" for index in range(len(adapter.decoder(model).layers))]


def layer_milliseconds(model: nn.Module, inputs: dict, lengths: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Time of one decoder layer of each kind (:func:`layer_kinds`; a middle one of the kind, all have the same shape)
    at each sequence length, replaying the arguments the first layer of its kind receives in a vanilla prefill, cut to
    the first ``length`` positions (moved to the timed layer's device first, when the model is split over several
    GPUs); :func:`replay_milliseconds` times it."""
    layers = adapter_for(model).decoder(model).layers
    kinds = layer_kinds(model)
    captured = {}
    handles = [
        layers[kinds.index(kind)].register_forward_pre_hook(
            lambda module, args, kwargs, kind=kind: captured.setdefault(kind, (args, kwargs)), with_kwargs=True
        )
        for kind in dict.fromkeys(kinds)
    ]
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for kind, (args, kwargs) in captured.items():
        of_kind = [index for index, other in enumerate(kinds) if other == kind]
        layer = layers[of_kind[len(of_kind) // 2]]
        result[kind] = _replay_layer(layer, args, kwargs, lengths, repeats)
    return result


def _replay_layer(layer: nn.Module, args: tuple, kwargs: dict, lengths: list[int], repeats: int) -> dict[int, float]:
    device = next(layer.parameters()).device  # in a split model the inputs move to it once, before any timing

    def to_layer(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    hidden = to_layer(args[0] if args else kwargs["hidden_states"])
    kwargs = {
        key: tuple(map(to_layer, value)) if isinstance(value, tuple) else to_layer(value)
        for key, value in kwargs.items()
    }
    result = {}
    for length in lengths:
        index = torch.arange(length, device=device).expand(hidden.shape[0], -1)
        layer_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("hidden_states", "past_key_values", "attention_mask")
        }
        layer_kwargs["position_embeddings"] = tuple(take_tokens(part, index) for part in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = take_tokens(kwargs["position_ids"], index, trailing_dims=0)
        mask = kwargs.get("attention_mask")  # 4-D for attention, 2-D padding for a recurrent layer
        layer_kwargs["attention_mask"] = (
            None if mask is None else mask[:, :length] if mask.ndim == 2 else mask[..., :length, :length]
        )
        layer_kwargs["use_cache"] = False
        result[length] = replay_milliseconds(layer, (hidden[:, :length],), layer_kwargs, repeats, captured=True)
    return result


def replay_milliseconds(module: nn.Module, args: tuple, kwargs: dict, repeats: int, captured: bool = False) -> float:
    """Time of one call of ``module`` on recorded arguments: ``repeats`` calls back to back per timing, as in a whole
    forward, where the host queues the next kernels while the GPU works (one call after an idle GPU would add the
    launch latency); the median of three timings. ``captured``: on a GPU, the call is captured once as a CUDA graph
    and replayed, so that a busy host cannot make it launch-bound (a decoder layer; the vision tower's blocks read
    their segment lengths on the host and cannot be captured)."""
    device = next(module.parameters()).device
    times = []
    # CUDA events record on the current device: make it the module's (GPU 1 in a split model)
    with torch.inference_mode(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        call = partial(module, *args, **kwargs)
        call()  # warm-up
        if captured and device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            call = graph.replay
        for _ in range(3):
            timer = Timer(device)
            for _ in range(repeats):
                call()
            timer.stop()
            times.append(timer.milliseconds() / repeats)
    return statistics.median(times)


def vision_block_milliseconds(
    model: nn.Module, inputs: dict, presses: dict[float, DeltaPress | None], repeats: int
) -> tuple[int, dict[float, float]]:
    """Time of one vision block above every decision block, per vision ratio (``None`` press: vanilla), replaying the
    arguments it receives in a prefill under that press: every patch, or the kept patches with their compact
    segments. Returns the block's index and the times."""
    blocks = adapter_for(model).vision_blocks(model)
    decisions = [press.vision_scorer().layer(len(blocks)) for press in presses.values() if press is not None]
    index = min(max([len(blocks) // 2, *(decision + 1 for decision in decisions)]), len(blocks) - 1)
    result = {}
    for vision_ratio, press in presses.items():
        captured = {}

        def capture(module, args, kwargs, output, captured=captured):
            captured.setdefault("call", (args, dict(kwargs)))

        handle = blocks[index].register_forward_hook(capture, with_kwargs=True)
        try:
            with torch.inference_mode(), press(model) if press is not None else nullcontext():
                model(**inputs, use_cache=False)
        finally:
            handle.remove()
        result[vision_ratio] = replay_milliseconds(blocks[index], *captured["call"], repeats)
    return index, result


def decoder_ideal_speedup(
    kinds: list[str], decision_layer: int, full_ms: dict[str, float], kept_ms: dict[str, float]
) -> float:
    """The decoder's ideal gain from the time of a layer of each kind at ``T`` (``full_ms``) and at ``K``
    (``kept_ms``): every layer's time at ``T`` over layers ``0..s`` at ``T`` plus the deeper ones at ``K``; a layer
    cannot take longer on fewer tokens (see :func:`ideal_speedup`). One kind: ``ideal_speedup``'s formula."""
    kept_ms = {kind: min(kept_ms[kind], full_ms[kind]) for kind in full_ms}
    whole = sum(full_ms[kind] for kind in kinds)
    halting = sum((full_ms if index <= decision_layer else kept_ms)[kind] for index, kind in enumerate(kinds))
    return whole / halting


def ideal_speedup(num_layers: int, decision_layer: int, full_ms: float, kept_ms: float) -> float:
    """``L t(T) / ((s + 1) t(T) + (L - s - 1) t(K))``, for the decoder's layers or the vision tower's blocks; a layer
    cannot take longer on fewer tokens, so a measured ``t(K) > t(T)`` (timing noise when ``K`` is close to ``T``)
    counts as ``t(T)``."""
    kept_ms = min(kept_ms, full_ms)
    deeper = num_layers - decision_layer - 1
    return num_layers * full_ms / ((decision_layer + 1) * full_ms + deeper * kept_ms)


def run_bench(config: BenchConfig) -> dict:
    """Measure every image size (or video frame count): on each path, vanilla and DASH at each (decoder ratio, vision
    ratio), in turns; returns the JSON document.

    Each repeat runs every (path, variant) once, the order rotated by one each repeat, so that drift of the shared
    machine spreads evenly; every variant's gain is against the vanilla runs of its path. A graphs-path run that
    captured a new graph is not counted (the warm-up rounds capture every shape).
    """
    preset: Preset = PRESETS[config.preset]
    dtype = torch.bfloat16 if config.device.startswith("cuda") else torch.float32
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


def device_name(model: nn.Module) -> str:
    """The device the model runs on, in words ("2 x NVIDIA H200" when split)."""
    devices = model_devices(model)
    if devices[0].type != "cuda":
        return platform.processor() or "cpu"
    name = torch.cuda.get_device_name(devices[0])
    return name if len(devices) == 1 else f"{len(devices)} x {name}"


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


def shape_label(row: dict) -> str:
    """The prompt a row measured: its image side, or its video's frame count."""
    return f"{row['video_frames']:>4}f" if "video_frames" in row else f"{row['image_size']:>5}"


def table(document: dict) -> str:
    """The results as text: per row the image side (px) or the video's frames (``32f``), the path, the ratios,
    T -> K, stage times vanilla / DASH (ms) and gains; then what users wait for per path and variant. A row marked
    ``*`` is noisy (its ratio-0 control is off by more than 3%)."""
    lines = [f"{document['preset']} on {document['device']} ({document['dtype']}); times in ms, vanilla / DASH"]
    lines.append(
        "shape path      method       ratio vision      T      K       vision x ideal       decoder x ideal"
        "       prefill x          ttft x        answer x"
    )
    for row in document["rows"]:
        v, d = row["vanilla"], row["dash"]

        def pair(key: str, v: dict = v, d: dict = d) -> str:
            return f"{v[key]:>6.1f}/{d[key]:<6.1f}"

        lines.append(
            f"{shape_label(row)} {row['path']:<8}{'*' if row['noisy'] else ' '} {row['method']:<11}"
            f" {row['ratio']:>5g}"
            f" {row['vision_ratio']:>6g} {row['tokens']:>6} {row['kept']:>6}"
            f" {pair('vision_ms')} {row['vision_speedup']:>4.2f} {row['ideal_vision_speedup']:>5.2f}"
            f" {pair('decoder_ms')} {row['decoder_speedup']:>4.2f} {row['ideal_decoder_speedup']:>5.2f}"
            f" {pair('prefill_ms')} {row['prefill_speedup']:>4.2f} {pair('ttft_ms')} {row['ttft_speedup']:>4.2f}"
            f" {pair('answer_ms')} {row['answer_speedup']:>4.2f}"
            + (
                " | vs unpadded: decoder {decoder_ms:.2f}, ttft {ttft_ms:.2f}".format(**row["vs_unpadded"])
                if "vs_unpadded" in row
                else ""
            )
        )
    header = (
        f"{'shape':>5} path      variant                      ttft  decode   answer  ttft x answer x"
        "   floor: ttft  decode  answer  reached: ttft decode answer"
    )
    lines += [
        "",
        "what users wait for (ms); gains against eager vanilla; the floor and the fraction of it reached",
        header,
    ]
    for entry in document["latency"]:
        variant = "vanilla" if entry["variant"] is None else "{2} {0:g}, vision {1:g}".format(*entry["variant"])
        gains = "".join(
            f" {entry[key]:>7.2f}" for key in ("ttft_speedup_vs_eager", "answer_speedup_vs_eager") if key in entry
        )
        floor, reached = entry["floor"]["floor_ms"], entry["floor"]["fraction"]
        lines.append(
            f"{shape_label(entry)} {entry['path']:<8}{'*' if entry['noisy'] else ' '} {variant:<24}"
            f" {entry['ttft_ms']:>6.1f} {entry['decode_step_ms']:>7.2f} {entry['answer_ms']:>8.1f}{gains}"
            f"   {floor['ttft_ms']:>11.1f} {floor['decode_step_ms']:>7.2f} {floor['answer_ms']:>7.1f}"
            f"  {reached['ttft_ms']:>13.0%} {reached['decode_step_ms']:>6.0%} {reached['answer_ms']:>6.0%}"
        )
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    """Prefill time against image size (or video frames): vanilla, one line per ratio, and the vision tower's
    share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    first_path = document["rows"][0].get("path", "eager")  # prefill times do not depend on the decode path
    rows = [row for row in document["rows"] if row.get("path", "eager") == first_path]
    axis_key = "video_frames" if "video_frames" in rows[0] else "image_size"
    sizes = sorted({row[axis_key] for row in rows})
    vanilla = [statistics.median(r["vanilla"]["prefill_ms"] for r in rows if r[axis_key] == s) for s in sizes]
    vision = [statistics.median(r["vanilla"]["vision_ms"] for r in rows if r[axis_key] == s) for s in sizes]
    axis.plot(sizes, vanilla, "k-o", label="vanilla")
    axis.plot(sizes, vision, "k:", label="vision tower, vanilla")

    def variant_of(row: dict) -> tuple:
        return row["ratio"], row["vision_ratio"], row.get("method", "dash")

    for variant in sorted({variant_of(row) for row in rows}):
        points = sorted((r[axis_key], r["dash"]["prefill_ms"]) for r in rows if variant_of(r) == variant)
        label = f"{variant[2]} {variant[0]:g}" + (f", vision {variant[1]:g}" if variant[1] else "")
        axis.plot([p[0] for p in points], [p[1] for p in points], "--o", label=label)
    axis.set_xlabel(f"video frames ({rows[0]['image_size']} px)" if axis_key == "video_frames" else "image side (px)")
    axis.set_ylabel("prefill time (ms, median)")
    axis.set_title(f"{document['preset']}, {document['device']}, batch {rows[0]['batch_size']}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(config: BenchConfig, output: Path, plot_path: Path | None) -> dict:
    document = run_bench(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1))
    if plot_path is not None:
        plot(document, plot_path)
    print(table(document))
    return document
