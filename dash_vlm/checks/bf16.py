"""``dash-vlm check bf16``: is halting still exact in the model's own dtype on this GPU?

The press against the masked reference (:mod:`dash_vlm.checks.reference`: every token kept in the sequence, halted
keys masked, halted rows reset; for a hybrid decoder the explicit per-sample subsequence), both generating greedily
from the same weights and inputs, at each batch size; and the ratio-0 press against the unmodified model. With
``vision_compression_ratio > 0`` the reference halts in the vision tower too (the masked vision reference).

Verdict per case: the same halted tokens (and as many halted patches) as the reference, and the logits of every step
while the two answers agree within the tolerance: 1e-4 and every greedy token the same in float32; ``HALF_TOLERANCE``
in bf16 or fp16 (the press's compact sequence runs unmasked kernels, the reference masked ones: they differ by
rounding, 0.6% on Qwen2-VL-7B shapes on the H200), greedy tokens reported, not judged (random weights leave no margin
between the top logits).
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import torch

from dash_vlm.checks import CheckConfig, Subject, all_passed, new_document, relative_error
from dash_vlm.checks.graphs import FULL_TOLERANCE, HALF_TOLERANCE
from dash_vlm.checks.reference import MaskedVisionReference, decoder_reference
from dash_vlm.models import adapter_for
from dash_vlm.press import DeltaPress

CONTROL = "ratio 0 against the unmodified model"
PRESS = "press against the masked reference"


def generate(model, inputs: dict, steps: int, context) -> object:
    """Greedy ``generate`` of exactly ``steps`` tokens under ``context`` (a press or a reference), with every step's
    logits."""
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True)
    with torch.inference_mode(), context:
        return model.generate(**inputs, **settings, return_dict_in_generate=True)


def reference_contexts(model, press: DeltaPress) -> tuple[list, object, object]:
    """The references of ``press``'s halting (the decoder's, and the tower's when it halts) and their context."""
    scope = "all" if press.scope == "all" else "vision"
    options = dict(start_ratio=press.start_ratio, scope=scope, protect_last=press.protect_last)
    decoder = decoder_reference(model, press.compression_ratio, protect_first=press.protect_first, **options)
    vision = None
    if press.vision_compression_ratio > 0:
        vision = MaskedVisionReference(model, press.vision_compression_ratio, press.vision_start_ratio)
    stack = ExitStack()
    for reference in (vision, decoder):
        if reference is not None:
            stack.enter_context(reference())
    return [decoder, vision], stack


def compare(output, expected, prompt_length: int, full_precision: bool) -> dict:
    """Logits of the steps while the answers agree (a step fed the same tokens), and greedy agreement."""
    tokens, reference_tokens = output.sequences[:, prompt_length:], expected.sequences[:, prompt_length:]
    differing = (tokens != reference_tokens).any(0).nonzero()
    common = int(differing[0]) + 1 if len(differing) else tokens.shape[1]
    errors = [relative_error(a, b) for a, b in zip(output.logits[:common], expected.logits[:common], strict=True)]
    result = {
        "prefill_logits_relative_error": errors[0],
        "max_logits_relative_error_while_agreeing": max(errors),
        "greedy_token_agreement": (tokens == reference_tokens).float().mean().item(),
    }
    tolerance = FULL_TOLERANCE if full_precision else HALF_TOLERANCE
    passed = max(errors) <= tolerance and (not full_precision or result["greedy_token_agreement"] == 1.0)
    return result | {"within_tolerance": passed}


def check_batch(model, inputs: dict, press: DeltaPress, steps: int) -> dict[str, dict]:
    """The two cases at one batch size."""
    full = next(model.parameters()).dtype == torch.float32
    length = inputs["input_ids"].shape[1]
    unmodified = generate(model, inputs, steps, torch.no_grad())
    control = DeltaPress(compression_ratio=0.0)
    control_case = compare(generate(model, inputs, steps, control(model)), unmodified, length, full)
    control_case["verdict"] = "PASS" if control_case["within_tolerance"] else "FAIL"

    output = generate(model, inputs, steps, press(model))
    (decoder, vision), context = reference_contexts(model, press)
    expected = generate(model, inputs, steps, context)
    case = compare(output, expected, length, full)
    stats = press.last_stats
    case["tokens"], case["kept"] = [s.tokens for s in stats], [s.kept for s in stats]
    case["same_halted_tokens"] = [s.halted_positions for s in stats] == decoder.halted_per_sample
    if vision is not None:  # the tower's own patch order differs by family; which patches is held by the logits
        halted = sum(s.vision_patches - s.vision_kept for s in stats)
        case["same_halted_patch_count"] = halted == int(vision.halted_per_pass[0].sum())
    same = case["same_halted_tokens"] and case.get("same_halted_patch_count", True)
    case["verdict"] = "PASS" if same and case["within_tolerance"] else "FAIL"
    return {CONTROL: control_case, PRESS: case}


def run(subject: Subject, press: DeltaPress, batch_sizes: list[int], steps: int) -> dict:
    """The check on ``subject``: both cases at each batch size. The press runs unchunked (``prefill_chunk=0``), as
    the reference does: chunked bf16 matmuls round differently and could swap near-tied halting decisions."""
    press = dataclasses.replace(press, prefill_chunk=0)
    document = new_document("bf16", subject, press, steps)
    document["dtype"] = str(next(subject.model.parameters()).dtype).removeprefix("torch.")
    for batch_size in batch_sizes:
        for name, case in check_batch(subject.model, subject.inputs(batch_size), press, steps).items():
            document["cases"][f"{name}, batch {batch_size}"] = case
    document["passed"] = all_passed(document["cases"])
    return document


def validate(config: CheckConfig, press: DeltaPress, model_config) -> None:
    """What the reference cannot stand for, refused before the model loads: it implements DASH's own score with the
    global selection, and the hybrid decoder's subsequence reference runs one sample at a time."""
    if press.method != "dash" or press.selection != "global":
        raise ValueError(
            f"check bf16 holds DASH to its masked reference: method must be 'dash' and selection 'global', got "
            f"method={press.method!r}, selection={press.selection!r}"
        )
    if adapter_for(model_config).hybrid_decoder and max(config.options["batch_sizes"]) > 1:
        raise ValueError(
            f"check bf16 on {config.subject_name} ({model_config.model_type!r}, a hybrid decoder): its reference runs "
            "one sample at a time, so batch_sizes must be 1"
        )


def check(config: CheckConfig, press: DeltaPress) -> dict:
    """``dash-vlm check bf16`` on ``config``'s subject."""
    return run(config.subject(), press, config.options["batch_sizes"], config.options["steps"])


COLUMNS = {
    "prefill / max error": lambda case: (
        "{prefill_logits_relative_error:.1e} / {max_logits_relative_error_while_agreeing:.1e}".format(**case)
    ),
    "greedy agreement": lambda case: f"{case['greedy_token_agreement']:.2f}",
    "kept / tokens": lambda case: (
        ", ".join(f"{k}/{t}" for k, t in zip(case["kept"], case["tokens"], strict=True)) if "kept" in case else "-"
    ),
    "same halted": lambda case: str(case.get("same_halted_tokens", "-")),
}
