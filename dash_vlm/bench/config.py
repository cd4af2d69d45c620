"""The bench's configuration: what is measured, on which preset and paths, checked before any model is built."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import transformers

from dash_vlm.attention import ATTENTION_CHOICES
from dash_vlm.models import MAX_FRAMES_LIMIT, adapter_for, model_types_with
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress
from dash_vlm.scorers import SCORERS, DashScorer
from dash_vlm.vlm import gpu_index

STAGES = ("vision", "decoder", "prefill")
DEVICE_MAPS = (None, "auto")
PATHS = ("eager", "static", "graphs")  # HF generate; HF generate over its static cache; DashVLM's fast path
# With the graphs path, vanilla also runs on a fast path whose prefill is not padded to a bucket: the gains of the
# graphs path are given against it too, so that padding cannot inflate them.
UNPADDED = "unpadded"
NOISE = 0.03  # a ratio-0 control further than this from vanilla (prefill or TTFT) flags its rows noisy
MAX_IMAGE_SIDE = 8192  # the largest image (or frame) side measured: a larger one would not fit a GPU's memory


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


def model_dtype(device: str) -> torch.dtype:
    """The dtype the bench builds its model in: bf16 on a GPU, float32 on a CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def the_ratio(config: BenchConfig, measure: str, vision: bool = False) -> float:
    """The one nonzero decoder ratio (``vision``: vision ratio) that ``--measure measure`` reads (its 0 is the
    control or vanilla, which the measurement runs anyway); ``ValueError`` for none or several."""
    name, values = ("vision_ratios", config.vision_ratios) if vision else ("ratios", config.ratios)
    nonzero = [value for value in values if value]
    if len(nonzero) != 1:
        flag = "--vision-compression-ratios" if vision else "--compression-ratios"
        raise ValueError(f"{name} ({flag}): --measure {measure} measures one nonzero value, got {values}")
    return nonzero[0]


def the_image_size(config: BenchConfig, measure: str) -> int:
    """The one image side of a measurement of one prompt; ``ValueError`` for several."""
    if len(config.image_sizes) != 1:
        raise ValueError(
            f"image_sizes (--image-size): --measure {measure} measures one image side, got {config.image_sizes}"
        )
    return config.image_sizes[0]


def needs_gpu(config: BenchConfig, measure: str, why: str) -> None:
    """``ValueError`` unless ``config.device`` is a GPU: ``--measure measure`` ``why``."""
    if not config.device.startswith("cuda"):
        has = f"device is {config.device!r}" if torch.cuda.is_available() else "this machine has none"
        raise ValueError(f"--measure {measure} {why}: it needs a CUDA GPU (device cuda or cuda:N); {has}")


def dash_variants(config: BenchConfig, measure: str) -> dict[str, dict | None]:
    """The presses a measurement of the attention or of memory compares, by name, as ``DeltaPress`` fields (``None``:
    vanilla): the ratio-0 control, DASH at the one nonzero decoder ratio and DASH with the tower halting at the one
    nonzero vision ratio."""
    ratio, vision_ratio = the_ratio(config, measure), the_ratio(config, measure, vision=True)
    return {
        "vanilla": None,
        "control": dict(compression_ratio=0.0),
        "dash": dict(compression_ratio=ratio),
        "dash+vision": dict(compression_ratio=ratio, vision_compression_ratio=vision_ratio),
    }
