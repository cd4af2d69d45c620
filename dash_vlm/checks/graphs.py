"""``dash-vlm check graphs``: does the fast path (``cuda_graphs=True``) give the model's own answers?

For vanilla, the ratio-0 control (a press that halts nothing: its times differ from vanilla's only by noise) and the
given press, at each batch size, transformers' eager ``generate`` (greedy) is the reference:

- the fast path is fed the reference's tokens (teacher forcing): the relative error of each step's logits and the
  share of steps whose greedy choice agrees; and the captured graph against the same static step run uncaptured
  (``capture=False``);
- time to first token and answer time, eager ``generate`` against the fast path, medians of ``repeats`` runs after
  warm-up (a run that captures a graph is warm-up), every run kept (``runs``); a batch size is ``noisy`` when its
  control departs from vanilla by more than the bench's ``NOISE`` on either path.

Verdict per case: in float32 the logits within 1e-4 and every greedy choice the same, against eager and between
captured and uncaptured; in bf16 or fp16 the logits within ``HALF_TOLERANCE`` (the spread measured on the H200 is
1-4%), greedy choices not judged (random weights leave no margin between the top logits). On a CPU both sides run
uncaptured.
"""

from __future__ import annotations

import statistics

import torch

from dash_vlm.bench import NOISE
from dash_vlm.checks import CheckConfig, Subject, all_passed, new_document, relative_error
from dash_vlm.graphs import StaticDecoder, penalize_repetition, penalized_first_step
from dash_vlm.models import adapter_for
from dash_vlm.press import DeltaPress, Timer
from dash_vlm.vlm import FirstTokenTimer

CONTROL = "ratio-0 control"
FULL_TOLERANCE = 1e-4
HALF_TOLERANCE = 0.05


def eager_generate(model, inputs: dict, press: DeltaPress | None, steps: int, logits: bool = False):
    """transformers' greedy ``generate`` of exactly ``steps`` tokens (under ``press``), its first-token and answer
    timers; with ``logits``, each step's logits."""
    first = FirstTokenTimer(inputs["input_ids"].device)
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, stopping_criteria=[first])
    settings |= dict(output_logits=True, return_dict_in_generate=True) if logits else {}
    with torch.inference_mode(), press(model) if press is not None else torch.no_grad():
        answer = Timer(inputs["input_ids"].device)
        output = model.generate(**inputs, **settings)
        answer.stop()
    return output, first.timer, answer


def teacher_forced(decoder: StaticDecoder, inputs: dict, press, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every step of the fast path fed ``tokens`` ([batch, steps], the reference's) instead of its own."""
    steps = tokens.shape[1]
    decoder.generate(inputs, press, steps, keep_logits=True, stop_at_end=False)  # makes (or finds) the graph
    graph = next(reversed(decoder.graphs.values()))
    with torch.inference_mode():
        cache, logits, positions = decoder.prefill(inputs, press)
        allowed = decoder._prompt_slots(cache, inputs.get("attention_mask"))
        penalty = float(decoder.model.generation_config.repetition_penalty or 1.0)
        logits, seen = penalized_first_step(logits, inputs["input_ids"], penalty)  # as StaticDecoder.generate does
        if seen is not None:
            seen.scatter_(1, tokens[:, :1], True)
        graph.load(cache, allowed, positions + 1, tokens[:, 0], seen)
        for step in range(steps - 1):
            graph.token.copy_(tokens[:, step : step + 1])
            graph.decode(1)
        return [logits.float(), *graph.logits[1:].clone().unbind(0)]


def penalized(
    model, prompt: torch.Tensor, tokens: torch.Tensor, logits: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """Each step's logits with the checkpoint's repetition penalty applied over the prompt and the tokens before the
    step, as the fast path keeps them (``generate``'s own scores also carry ``min_new_tokens``' masked end token)."""
    penalty = float(model.generation_config.repetition_penalty or 1.0)
    if penalty == 1:
        return [step.float() for step in logits]
    result = []
    for index, step in enumerate(logits):
        seen = torch.zeros_like(step, dtype=torch.bool).scatter_(1, torch.cat([prompt, tokens[:, :index]], 1), True)
        result.append(penalize_repetition(step.float(), seen, penalty))
    return result


def agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    errors = [relative_error(a, b) for a, b in zip(logits, reference, strict=True)]
    same = [bool(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in zip(logits, reference, strict=True)]
    return {"max_logits_relative_error": max(errors), "errors": errors, "greedy_agreement": sum(same) / len(same)}


def within(result: dict, full_precision: bool) -> bool:
    if full_precision:
        return result["max_logits_relative_error"] <= FULL_TOLERANCE and result["greedy_agreement"] == 1.0
    return result["max_logits_relative_error"] <= HALF_TOLERANCE


def check_case(model, inputs: dict, press: DeltaPress | None, steps: int, repeats: int) -> dict:
    """One case: agreement with eager ``generate`` and between captured and uncaptured, times, and its verdict."""
    eager, _, _ = eager_generate(model, inputs, press, steps, logits=True)
    reference_tokens = eager.sequences[:, inputs["input_ids"].shape[1] :]
    reference_logits = penalized(model, inputs["input_ids"], reference_tokens, eager.logits)
    on_gpu = inputs["input_ids"].device.type == "cuda"
    captured, uncaptured = StaticDecoder(model, capture=on_gpu), StaticDecoder(model, capture=False)
    forced = teacher_forced(captured, inputs, press, reference_tokens)
    forced_eagerly = teacher_forced(uncaptured, inputs, press, reference_tokens)
    result = {
        "teacher_forced": agreement(forced, reference_logits),
        "captured_against_uncaptured": agreement(forced, forced_eagerly),
    }
    timings = {"eager": [], "graphs": []}
    for repeat in range(repeats + 2):
        _, first, answer = eager_generate(model, inputs, press, steps)
        fast = captured.generate(inputs, press, steps, stop_at_end=False)
        if repeat < 2 or fast.captured:
            continue
        timings["eager"].append({"ttft_ms": first.milliseconds(), "answer_ms": answer.milliseconds()})
        timings["graphs"].append({"ttft_ms": fast.first_token.milliseconds(), "answer_ms": fast.answer.milliseconds()})
    for path, runs in timings.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        medians["decode_step_ms"] = (medians["answer_ms"] - medians["ttft_ms"]) / (steps - 1)
        result[path] = medians
    result["runs"] = timings
    result["captures"] = captured.captures
    result["answer_speedup"] = result["eager"]["answer_ms"] / result["graphs"]["answer_ms"]
    full = next(model.parameters()).dtype == torch.float32
    passed = all(within(result[key], full) for key in ("teacher_forced", "captured_against_uncaptured"))
    result["verdict"] = "PASS" if passed else "FAIL"
    return result


def noisy(cases: dict, batch_size: int) -> bool:
    """Whether the ratio-0 control of ``batch_size`` departs from vanilla by more than ``NOISE`` (TTFT or answer, on
    either path)."""
    vanilla, control = cases[f"vanilla, batch {batch_size}"], cases[f"{CONTROL}, batch {batch_size}"]
    return any(
        abs(control[path][key] / vanilla[path][key] - 1) > NOISE
        for path in ("eager", "graphs")
        for key in ("ttft_ms", "answer_ms")
    )


def run(subject: Subject, press: DeltaPress, batch_sizes: list[int], steps: int, repeats: int) -> dict:
    """The check on ``subject``: vanilla, the control and ``press`` at each batch size."""
    document = new_document("graphs", subject, press, steps) | {"noisy": {}}
    cases = {"vanilla": None, CONTROL: DeltaPress(compression_ratio=0.0), "press": press}
    for batch_size in batch_sizes:
        inputs = subject.inputs(batch_size)
        for name, case_press in cases.items():
            document["cases"][f"{name}, batch {batch_size}"] = check_case(
                subject.model, inputs, case_press, steps, repeats
            )
        document["noisy"][batch_size] = noisy(document["cases"], batch_size)
    document["passed"] = all_passed(document["cases"])
    return document


def validate(config: CheckConfig, press: DeltaPress, model_config) -> None:
    """A hybrid decoder is refused before the model loads: the fast path does not run one."""
    if adapter_for(model_config).hybrid_decoder:
        raise ValueError(
            f"check graphs: {config.subject_name} is {model_config.model_type!r}, a hybrid decoder, which the fast "
            "path does not run"
        )


def check(config: CheckConfig, press: DeltaPress) -> dict:
    """``dash-vlm check graphs`` on ``config``'s subject."""
    options = config.options
    return run(config.subject(), press, options["batch_sizes"], options["steps"], options["repeats"])


COLUMNS = {
    "vs eager: error / agree": lambda case: "{max_logits_relative_error:.1e} / {greedy_agreement:.2f}".format(
        **case["teacher_forced"]
    ),
    "captured vs not": lambda case: "{max_logits_relative_error:.1e} / {greedy_agreement:.2f}".format(
        **case["captured_against_uncaptured"]
    ),
    "answer ms eager / fast": lambda case: f"{case['eager']['answer_ms']:.1f} / {case['graphs']['answer_ms']:.1f}",
}
