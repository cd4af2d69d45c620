"""The attention settings on real-shape bf16 models (run on a GPU with FA4): correctness, then the vision tower and the
decoder prefill side by side.

    python tests/attention_bench.py check --preset qwen2-vl-7b --output check.json
    python tests/attention_bench.py time --preset qwen2.5-vl-7b --image-sizes 896,1344,2016 --batch-sizes 1,8 \
        --output times.json

Settings (vision tower / decoder): ``sdpa`` (transformers' SDPA, a call per image or window), ``varlen_sdpa``
(``attention.VARLEN_SDPA`` / SDPA), ``fa4`` (FA4 / FA4), ``fa4_vision`` (FA4 / SDPA).

- ``check``: a left-padded batch of two prompts (two image sizes). SDPA's greedy tokens are the reference; every
  other setting is fed them (teacher forcing) and reports the relative error of each step's logits against SDPA's
  and the share of steps whose greedy token agrees, for vanilla, DASH, and DASH with vision-tower halting; under
  halting also how far each sample's halted tokens and tower patches overlap SDPA's (Jaccard).
- ``time``: one prefill (``logits_to_keep=1``) per (setting, variant), settings rotated every repeat; medians of the
  vision tower, the decoder and the whole prefill (CUDA events), each setting's gain against ``sdpa``, and every
  run's figures (``runs``). The variant ``control`` is the bench's ratio-0 control (a press that halts nothing): a
  setting's rows are ``noisy`` when its control's prefill departs from its vanilla's by more than the bench's
  ``NOISE``, and a gain of that size is then not told from noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dash_vlm import DeltaPress  # noqa: E402
from dash_vlm.attention import FLASH_ATTENTION_4, VARLEN_SDPA, register  # noqa: E402
from dash_vlm.bench import NOISE, StageTimers, batch_inputs, device_name  # noqa: E402
from dash_vlm.checks import relative_error
from dash_vlm.models import adapter_for  # noqa: E402
from dash_vlm.models.presets import PRESETS  # noqa: E402
from dash_vlm.models.tiny import left_pad_batch  # noqa: E402

SETTINGS = {
    "sdpa": ("sdpa", "sdpa"),
    "varlen_sdpa": (VARLEN_SDPA, "sdpa"),
    "fa4": (FLASH_ATTENTION_4, FLASH_ATTENTION_4),
    "fa4_vision": (FLASH_ATTENTION_4, "sdpa"),
}
VARIANTS = {
    "vanilla": None,
    "control": dict(compression_ratio=0.0),
    "dash": dict(compression_ratio=0.667),
    "dash+vision": dict(compression_ratio=0.667, vision_compression_ratio=0.5),
}


def use_setting(model, setting: str) -> None:
    vision, decoder = SETTINGS[setting]
    model.config._attn_implementation = decoder  # every config, as use_attention sets it; then the tower's own
    adapter_for(model).vision_tower(model).config._attn_implementation = vision


def build(preset_name: str, device: str):
    register()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return PRESETS[preset_name].build(device, dtype, "sdpa"), PRESETS[preset_name], dtype


def press_of(variant: str) -> DeltaPress | None:
    return None if VARIANTS[variant] is None else DeltaPress(**VARIANTS[variant])


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


def forced_logits(model, inputs: dict, press, tokens: torch.Tensor | None, steps: int) -> list[torch.Tensor]:
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


def check(args) -> dict:
    model, preset, dtype = build(args.preset, args.device)
    samples = [preset.inputs(size, args.text_tokens, seed=number) for number, size in enumerate(args.check_sizes)]
    inputs = {key: value.to(args.device) for key, value in left_pad_batch(samples).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    rows = []
    for variant in VARIANTS:
        use_setting(model, "sdpa")
        press = press_of(variant)
        reference = forced_logits(model, inputs, press, None, args.steps)
        reference_halted = halted_sets(press)
        tokens = torch.stack([step.argmax(-1) for step in reference], dim=1)
        for setting in args.settings.split(","):
            if setting == "sdpa":
                continue
            use_setting(model, setting)
            press = press_of(variant)
            logits = forced_logits(model, inputs, press, tokens, args.steps)
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
    return {"preset": args.preset, "device": device_name(model), "steps": args.steps, "rows": rows}


def time(args) -> dict:
    model, preset, dtype = build(args.preset, args.device)
    timers = StageTimers(model)
    settings = args.settings.split(",")
    rows = []
    for size in map(int, args.image_sizes.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            inputs = batch_inputs(preset.inputs(size, args.text_tokens), batch, args.device, dtype)
            runs = [(setting, variant) for setting in settings for variant in VARIANTS]
            figures = {run: [] for run in runs}
            for repeat in tqdm(range(args.warmup + args.repeats), desc=f"{args.preset} {size}px batch {batch}"):
                shift = repeat % len(runs)
                for setting, variant in runs[shift:] + runs[:shift]:
                    use_setting(model, setting)
                    press = press_of(variant)
                    timers.reset()
                    with torch.inference_mode(), press(model) if press is not None else torch.no_grad():
                        model(**inputs, use_cache=True, logits_to_keep=1)
                    if repeat >= args.warmup:
                        figures[(setting, variant)].append(timers.milliseconds())
            for setting, variant in runs:
                medians = {
                    key: statistics.median(run[key] for run in figures[(setting, variant)])
                    for key in figures[runs[0]][0]
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
        "preset": args.preset,
        "device": device_name(model),
        "repeats": args.repeats,
        "settings": {name: dict(zip(("vision", "decoder"), SETTINGS[name], strict=True)) for name in settings},
        "variants": VARIANTS,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("check", "time"))
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--image-sizes", default="896,1344,2016")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--check-sizes", type=lambda text: [int(v) for v in text.split(",")], default=[896, 672])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    document = check(args) if args.mode == "check" else time(args)
    document["command"] = " ".join(sys.argv)
    args.output.write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
