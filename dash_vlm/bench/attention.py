"""The attention settings side by side on real-shape models (``dash-vlm bench --measure attention``): the vision
tower and the decoder prefill under each setting.

    dash-vlm bench --measure attention --preset qwen2.5-vl-7b --image-size 896 --image-size 1344 --image-size 2016 \
        --batch-size 8 --output times.json

Settings (vision tower / decoder): ``sdpa`` (transformers' SDPA, a call per image or window), ``varlen_sdpa``
(``attention.VARLEN_SDPA`` / SDPA), ``fa4`` (FA4 / FA4), ``fa4_vision`` (FA4 / SDPA); the FA4 ones on a Hopper or
Blackwell GPU with FlashAttention 4 installed.

One prefill (``logits_to_keep=1``) per (setting, variant), settings rotated every repeat; medians of the vision
tower, the decoder and the whole prefill (CUDA events), each setting's gain against ``sdpa``, and every run's figures
(``runs``). The variants (:func:`~dash_vlm.bench.config.dash_variants`): vanilla, the bench's ratio-0 control (a
press that halts nothing), DASH at the decoder ratio, DASH with the tower halting at the vision ratio. A setting's rows
are ``noisy`` when its control's prefill departs from its vanilla's by more than the bench's ``NOISE``, and a gain of
that size is then not told from noise. The correctness of the settings: :mod:`dash_vlm.bench.attention_check`.
"""

from __future__ import annotations

import json
import statistics

import torch
from tqdm import tqdm

from dash_vlm.attention import FLASH_ATTENTION_4, VARLEN_SDPA, flash_attention_4_available, register
from dash_vlm.bench.config import NOISE, BenchConfig, dash_variants, model_dtype, needs_gpu
from dash_vlm.bench.run import batch_inputs
from dash_vlm.bench.timers import StageTimers, device_name
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS, Preset
from dash_vlm.press import DeltaPress

SETTINGS = {
    "sdpa": ("sdpa", "sdpa"),
    "varlen_sdpa": (VARLEN_SDPA, "sdpa"),
    "fa4": (FLASH_ATTENTION_4, FLASH_ATTENTION_4),
    "fa4_vision": (FLASH_ATTENTION_4, "sdpa"),
}


def check_settings(config: BenchConfig, settings: list[str], measure: str) -> None:
    """``ValueError`` for settings that are not distinct names of ``SETTINGS``, ratios that do not name the variants,
    or an FA4 setting where FA4 cannot run."""
    if not settings or any(name not in SETTINGS for name in settings) or len(set(settings)) < len(settings):
        raise ValueError(
            f"settings (--attention-settings) must be distinct names among {', '.join(SETTINGS)}, got {settings}"
        )
    dash_variants(config, measure)
    fa4 = [name for name in settings if FLASH_ATTENTION_4 in SETTINGS[name]]
    if not fa4:
        return
    needs_gpu(config, measure, f"with settings {', '.join(fa4)} runs FlashAttention 4")
    if torch.cuda.get_device_capability(config.device)[0] < 9:
        raise ValueError(
            f"settings {', '.join(fa4)} run FlashAttention 4, which needs a Hopper or Blackwell GPU; "
            f"{config.device} is {torch.cuda.get_device_name(config.device)}"
        )
    if not flash_attention_4_available():
        raise ValueError(f"settings {', '.join(fa4)} run FlashAttention 4, which is not installed here")


def validate(config: BenchConfig, settings: list[str]) -> None:
    """``ValueError`` for what :func:`run` cannot measure: bad settings, or none to take the gains against."""
    check_settings(config, settings, "attention")
    if "sdpa" not in settings:
        raise ValueError(f"settings (--attention-settings): the gains are against sdpa, which {settings} lacks")


def use_setting(model: torch.nn.Module, setting: str) -> None:
    vision, decoder = SETTINGS[setting]
    model.config._attn_implementation = decoder  # every config, as use_attention sets it; then the tower's own
    adapter_for(model).vision_tower(model).config._attn_implementation = vision


def build(config: BenchConfig) -> tuple[torch.nn.Module, Preset, torch.dtype]:
    """The preset's model on SDPA (the settings switch it afterwards), the preset and the dtype."""
    register()
    dtype = model_dtype(config.device)
    return PRESETS[config.preset].build(config.device, dtype, "sdpa"), PRESETS[config.preset], dtype


def press_of(settings: dict | None) -> DeltaPress | None:
    return None if settings is None else DeltaPress(**settings)


def run(config: BenchConfig, settings: list[str]) -> dict:
    """Time every (setting, variant) at each of ``config.image_sizes``, batch ``config.batch_size``; the JSON
    document."""
    model, preset, dtype = build(config)
    variants = dash_variants(config, "attention")
    timers = StageTimers(model)
    rows = []
    batch = config.batch_size
    for size in config.image_sizes:
        inputs = batch_inputs(preset.inputs(size, config.text_tokens), batch, config.device, dtype)
        runs = [(setting, variant) for setting in settings for variant in variants]
        figures = {run: [] for run in runs}
        for repeat in tqdm(range(config.warmup + config.repeats), desc=f"{config.preset} {size}px batch {batch}"):
            shift = repeat % len(runs)
            for setting, variant in runs[shift:] + runs[:shift]:
                use_setting(model, setting)
                press = press_of(variants[variant])
                timers.reset()
                with torch.inference_mode(), press(model) if press is not None else torch.no_grad():
                    model(**inputs, use_cache=True, logits_to_keep=1)
                if repeat >= config.warmup:
                    figures[(setting, variant)].append(timers.milliseconds())
        for setting, variant in runs:
            medians = {
                key: statistics.median(run[key] for run in figures[(setting, variant)]) for key in figures[runs[0]][0]
            }
            base = {key: statistics.median(run[key] for run in figures[("sdpa", variant)]) for key in medians}
            vanilla, control = (
                statistics.median(run["prefill_ms"] for run in figures[(setting, name)])
                for name in ("vanilla", "control")
            )
            row = {"image_size": size, "batch_size": batch, "setting": setting, "variant": variant, **medians}
            row |= {"noisy": abs(control / vanilla - 1) > NOISE, "runs": figures[(setting, variant)]}
            row |= {f"{key.removesuffix('_ms')}_speedup_vs_sdpa": base[key] / medians[key] for key in medians}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {
        "preset": config.preset,
        "device": device_name(model),
        "repeats": config.repeats,
        "settings": {name: dict(zip(("vision", "decoder"), SETTINGS[name], strict=True)) for name in settings},
        "variants": variants,
        "rows": rows,
    }
