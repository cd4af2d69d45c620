"""``dash-vlm check split``: does the checkpoint split over every GPU (``device_map="auto"``) answer as on one GPU?

``DashVLM.from_pretrained(checkpoint, device_map="auto")`` against the same checkpoint on one GPU, without halting
(ratio 0: the unmodified model) and with the given press, for one prompt and for a left-padded batch of three prompts
of different lengths (a preset: random images of different sizes, where the family resizes): answers, every
statistic but time, the logits of every greedy step while the answers agree. A second one-GPU load is the control: it
shows how far the model agrees with itself. A preset is saved first as a checkpoint with its real processor class and
an offline word-level tokenizer (``Preset.checkpoint``).

Verdict per case: the same statistics, prefill logits within ``LOGITS_TOLERANCE`` (1e-4 in float32) and, with
halting, decode-step logits within ``NOISE_MARGIN`` times the noise floor (the largest difference of the control and
of the unmodified model split: bf16 decode steps are not bitwise repeatable, 1-3% on the H200); and the placement case:
the split load sits on at least two devices.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor

from dash_vlm.checks import CheckConfig, all_passed
from dash_vlm.models.presets import PRESETS
from dash_vlm.press import DeltaPress

LOGITS_TOLERANCE = 1e-2  # relative error; the bf16 check sees 0.6% between two correct implementations
FULL_TOLERANCE = 1e-4
NOISE_MARGIN = 1.5
PLACEMENT = "placement"


def picture(side: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


class LogitsRecorder(LogitsProcessor):
    """Keeps every step's logits (on the CPU, float32) and changes nothing."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.float().cpu())
        return scores


def preset_requests(image_size: int, dynamic_resolution: bool) -> dict[str, dict]:
    """One prompt, and a batch of prompts of different lengths (and image sizes where the family resizes)."""
    sides = [image_size, image_size * 3 // 4, image_size // 2] if dynamic_resolution else [image_size] * 3
    prompts = ["describe the picture .", "what is in the picture ?", "you are a helpful assistant : describe it !"]
    images = [picture(side, seed) for seed, side in enumerate(sides)]
    return {"batch 1": dict(image=images[0], prompt=prompts[0]), "padded batch 3": dict(image=images, prompt=prompts)}


def model_requests(prompt: str, image: Path | None, video: Path | None) -> dict[str, dict]:
    """The user's prompt about their file, and a batch of three prompts of different lengths about it."""
    prompts = [prompt, f"{prompt} Answer in one sentence.", f"You are a careful assistant. {prompt} Be precise."]
    visual = {"image": str(image)} if video is None else {"video": str(video)}
    batch = {key: [value] * 3 for key, value in visual.items()}
    return {"batch 1": dict(prompt=prompt, **visual), "padded batch 3": dict(prompt=prompts, **batch)}


def load_and_answer(
    source: str | Path, device_map: str, press: DeltaPress, requests: dict, steps: int, dtype: str
) -> tuple[dict, list[str], torch.dtype]:
    """Per case (ratio 0 and ``press``, each request): answers, statistics but time, step logits; the devices the
    model sits on and its dtype."""
    from dash_vlm.vlm import DashVLM

    vlm = DashVLM.from_pretrained(source, device_map=device_map, dtype=dtype, attn_implementation="sdpa")
    devices = sorted({str(parameter.device) for parameter in vlm.model.parameters()})
    model_dtype = vlm.model.dtype
    outcome = {}
    for variant, case_press in (("ratio 0", DeltaPress(compression_ratio=0.0)), ("press", press)):
        vlm.press = case_press
        for name, request in requests.items():
            recorder = LogitsRecorder()
            settings = dict(max_new_tokens=steps, min_new_tokens=steps, logits_processor=[recorder])
            results = vlm.generate(**request, **settings)
            results = results if isinstance(results, list) else [results]
            outcome[f"{variant}, {name}"] = {
                "texts": [result.text for result in results],
                "stats": [
                    {key: value for key, value in dataclasses.asdict(result.stats).items() if key != "prefill_ms"}
                    for result in results
                ],
                "logits": recorder.steps,
            }
    del vlm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return outcome, devices, model_dtype


def agreement(expected: dict, actual: dict) -> dict:
    """How far ``actual`` agrees with ``expected``: answers, statistics, greedy words, logits while they agree."""
    words = [
        next((i for i, (x, y) in enumerate(zip(a.split(), b.split(), strict=False)) if x != y), len(a.split()))
        for a, b in zip(expected["texts"], actual["texts"], strict=True)
    ]
    common = min(min(words) + 1, len(expected["logits"]), len(actual["logits"]))  # steps fed the same tokens
    errors = [
        ((a - b).norm() / b.norm()).item()
        for a, b in zip(actual["logits"][:common], expected["logits"][:common], strict=True)
    ]
    return {
        "same_answers": expected["texts"] == actual["texts"],
        "same_statistics": expected["stats"] == actual["stats"],
        "greedy_tokens_agreeing": words,
        "prefill_logits_relative_error": errors[0],
        "max_logits_relative_error_while_agreeing": max(errors),
    }


def is_vanilla(case_name: str) -> bool:
    return case_name.startswith("ratio 0,")


def judge(cases: dict, full_precision: bool = False) -> dict[str, list[str]]:
    """What fails in each case of a run: a statistic that differs, prefill logits beyond rounding, or, with halting,
    decode-step logits (while the answers agree) further apart than the noise floor times ``NOISE_MARGIN``.

    The noise floor is the largest difference of the control (a reload on one device) and of the unmodified model
    split (ratio 0, where the press does nothing); the ratio-0 cases are judged on statistics and prefill logits."""
    tolerance = FULL_TOLERANCE if full_precision else LOGITS_TOLERANCE
    noise = max(
        comparison["max_logits_relative_error_while_agreeing"]
        for name, case in cases.items()
        for comparison in (case["control_one_gpu_again"], *([case["split_against_one_gpu"]] * is_vanilla(name)))
    )
    failures = {}
    for name, case in cases.items():
        split = case["split_against_one_gpu"]
        decode_error = split["max_logits_relative_error_while_agreeing"]
        checks = {
            "statistics differ": not split["same_statistics"],
            "prefill logits differ beyond rounding": split["prefill_logits_relative_error"] > tolerance,
            f"decode logits differ beyond the noise floor ({noise:.2%})": not is_vanilla(name)
            and decode_error > max(tolerance, NOISE_MARGIN * noise),
        }
        failures[name] = [check for check, failed in checks.items() if failed]
    return failures


def run(
    source: str | Path,
    name: str,
    press: DeltaPress,
    requests: dict,
    steps: int,
    one_device: str = "cuda:0",
    split_map: str = "auto",
    dtype: str = "auto",
) -> dict:
    """The check on the checkpoint ``source``: loaded on ``one_device`` twice and with ``split_map`` once. The press
    runs unchunked: "auto" would size its chunks from each load's free memory, and different chunks round
    differently in bf16."""
    press = dataclasses.replace(press, prefill_chunk=0)
    one, one_devices, model_dtype = load_and_answer(source, one_device, press, requests, steps, dtype)
    again, _, _ = load_and_answer(source, one_device, press, requests, steps, dtype)
    split, split_devices, _ = load_and_answer(source, split_map, press, requests, steps, dtype)
    cases = {
        case: {
            "tokens": [stats["tokens"] for stats in one[case]["stats"]],
            "kept": [stats["kept"] for stats in one[case]["stats"]],
            "split_against_one_gpu": agreement(one[case], split[case]),
            "control_one_gpu_again": agreement(one[case], again[case]),
            "answers_one_gpu": one[case]["texts"],
            "answers_split": split[case]["texts"],
        }
        for case in one
    }
    for case_name, failures in judge(cases, model_dtype == torch.float32).items():
        cases[case_name] |= {"failures": failures, "verdict": "FAIL" if failures else "PASS"}
    placed = len(split_devices) >= 2
    cases[PLACEMENT] = {"devices_one_gpu": one_devices, "devices_split": split_devices}
    cases[PLACEMENT] |= {"verdict": "PASS" if placed else "FAIL", "failures": [] if placed else ["not split"]}
    document = {"check": "split", "subject": name, "steps": steps, "press": repr(press), "cases": cases}
    document["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if placed else one_device
    document["passed"] = all_passed(cases)
    return document


def validate(config: CheckConfig, press: DeltaPress, model_config) -> None:
    """The split needs two GPUs."""
    if torch.cuda.device_count() < 2:
        raise ValueError(f"check split needs two GPUs (device_map='auto'); {torch.cuda.device_count()} found")


def check(config: CheckConfig, press: DeltaPress) -> dict:
    """``dash-vlm check split`` on ``config``'s subject: a preset is saved as a checkpoint in a temporary folder."""
    one_device = config.device if config.device.startswith("cuda:") else "cuda:0"
    if config.model is not None:
        requests = model_requests(config.prompt, config.image, config.video)
        name = f"{config.model}, {(config.image or config.video).name}"
        return run(config.model, name, press, requests, config.options["steps"], one_device, dtype=config.dtype)
    preset = PRESETS[config.preset]
    with tempfile.TemporaryDirectory(prefix="dash-vlm-split-") as workspace:
        source = save_preset(config.preset, Path(workspace), one_device)
        requests = preset_requests(config.image_size, preset.dynamic_resolution)
        name = f"{config.preset}, {config.image_size} px"
        return run(source, name, press, requests, config.options["steps"], one_device)


def save_preset(preset_name: str, workspace: Path, device: str) -> Path:
    """The preset's random-weight checkpoint (bf16 on a GPU, float32 on a CPU) saved under ``workspace``."""
    folder = workspace / preset_name
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model, processor = PRESETS[preset_name].checkpoint(device, dtype)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    return folder


COLUMNS = {
    "prefill / decode error": lambda case: (
        "{prefill_logits_relative_error:.1e} / {max_logits_relative_error_while_agreeing:.1e}".format(
            **case["split_against_one_gpu"]
        )
        if "split_against_one_gpu" in case
        else ", ".join(case["devices_split"])
    ),
    "control error": lambda case: (
        "{max_logits_relative_error_while_agreeing:.1e}".format(**case["control_one_gpu_again"])
        if "control_one_gpu_again" in case
        else "-"
    ),
    "failures": lambda case: "; ".join(case["failures"]) or "-",
}
