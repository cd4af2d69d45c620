"""The attention settings checked against SDPA on real-shape models (``dash-vlm bench --measure attention-check``).

    dash-vlm bench --measure attention-check --preset qwen2-vl-7b --image-size 896 --image-size 672 --output check.json

A left-padded batch of one prompt per image size. SDPA's greedy tokens are the reference; every other setting
(:data:`dash_vlm.bench.attention.SETTINGS`) is fed them (teacher forcing) and reports the relative error of each
step's logits against SDPA's and the share of steps whose greedy token agrees, for vanilla, the ratio-0 control, DASH,
and DASH with vision-tower halting; under halting also how far each sample's halted tokens and tower patches overlap
SDPA's (Jaccard). ``new_tokens`` steps.
"""

from __future__ import annotations

import json
import statistics

import torch
from transformers import LogitsProcessor

from dash_vlm.bench.attention import build, check_settings, press_of, use_setting
from dash_vlm.bench.config import BenchConfig, dash_variants
from dash_vlm.bench.timers import device_name
from dash_vlm.checks import relative_error
from dash_vlm.models.tiny import left_pad_batch
from dash_vlm.press import DeltaPress


def validate(config: BenchConfig, settings: list[str]) -> None:
    """``ValueError`` for what :func:`run` cannot check: bad settings, or none besides the reference, SDPA."""
    check_settings(config, settings, "attention-check")
    if set(settings) <= {"sdpa"}:
        raise ValueError(f"settings (--attention-settings): SDPA is the reference; {settings} has nothing to check")


class Forced(LogitsProcessor):
    """Records each step's logits and, given ``tokens`` ([batch, steps]), makes generate pick them (teacher forcing)."""

    def __init__(self, tokens: torch.Tensor | None):
        self.tokens, self.logits = tokens, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # min_new_tokens has set the end token's logit to -inf: leave it out of the comparison
        self.logits.append(torch.nan_to_num(scores.float(), neginf=0.0))
        if self.tokens is None:
            return scores
        step = len(self.logits) - 1
        return torch.full_like(scores, -torch.inf).scatter_(1, self.tokens[:, step : step + 1], 0.0)


def forced_logits(
    model: torch.nn.Module, inputs: dict, press: DeltaPress | None, tokens: torch.Tensor | None, steps: int
) -> list[torch.Tensor]:
    """Each step's logits of a greedy generate (under ``press``) fed ``tokens``, or its own when ``None``."""
    forced = Forced(tokens)
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, logits_processor=[forced])
    with torch.inference_mode(), press(model) if press is not None else torch.no_grad():
        model.generate(**inputs, **settings)
    return forced.logits


def halted_sets(press: DeltaPress | None) -> list[tuple[set, set]]:
    """Per sample, the prompt positions the decoder halted and the patches the tower halted."""
    if press is None:
        return []
    return [(set(s.halted_positions), set(s.vision_halted_patches or ())) for s in press.last_stats]


def overlap(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def run(config: BenchConfig, settings: list[str]) -> dict:
    """Check every setting but SDPA against SDPA, per variant; the JSON document."""
    model, preset, dtype = build(config)
    variants = dash_variants(config, "attention-check")
    steps = config.new_tokens
    samples = [preset.inputs(size, config.text_tokens, seed=number) for number, size in enumerate(config.image_sizes)]
    inputs = {key: value.to(config.device) for key, value in left_pad_batch(samples).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    rows = []
    for variant, press_settings in variants.items():
        use_setting(model, "sdpa")
        press = press_of(press_settings)
        reference = forced_logits(model, inputs, press, None, steps)
        reference_halted = halted_sets(press)
        tokens = torch.stack([step.argmax(-1) for step in reference], dim=1)
        for setting in settings:
            if setting == "sdpa":
                continue
            use_setting(model, setting)
            press = press_of(press_settings)
            logits = forced_logits(model, inputs, press, tokens, steps)
            errors = [relative_error(a, b) for a, b in zip(logits, reference, strict=True)]
            agree = [
                float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(logits, reference, strict=True)
            ]
            row = {"variant": variant, "setting": setting, "max_relative_error": max(errors)}
            row |= {"prefill_relative_error": errors[0], "greedy_agreement": statistics.mean(agree)}
            if press is not None:  # the same tokens and patches halted as under SDPA? (Jaccard per sample)
                pairs = list(zip(halted_sets(press), reference_halted, strict=True))
                row["halted_tokens_overlap"] = [overlap(ours[0], theirs[0]) for ours, theirs in pairs]
                row["halted_patches_overlap"] = [overlap(ours[1], theirs[1]) for ours, theirs in pairs]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    return {"preset": config.preset, "device": device_name(model), "steps": steps, "rows": rows}
