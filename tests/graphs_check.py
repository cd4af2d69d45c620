"""The fast path on real-shape bf16 models (run on a GPU): captured decode graphs against transformers' eager
``generate``, for correctness and for what a user waits for.

    python tests/graphs_check.py --preset qwen2-vl-7b --image-size 896 --output graphs.json

For vanilla, the ratio-0 control (a press that halts nothing: its times differ from vanilla's only by noise) and DASH
(``--ratio``), at each batch size:

- correctness: the eager ``generate`` (greedy, ``--steps`` tokens) is the reference. The fast path runs free (its
  own greedy tokens) and teacher-forced (fed the reference's tokens); reported are the relative error of every
  step's logits and the share of steps whose greedy choice agrees, as ``bf16_reference.py`` does, and the captured
  graph against the same static step run eagerly (``capture=False``), which must agree to bf16 rounding;
- speed: time to first token, median decode step and answer latency (``--steps`` tokens), eager ``generate`` against
  the fast path, medians of ``--repeats`` runs after warm-up (the run that captures a graph is warm-up), every run's
  figures kept (``runs``); a batch size is ``noisy`` when its control's TTFT or answer departs from vanilla's by more
  than the bench's ``NOISE`` on either path, and a gain of that size is then not told from noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import relative_error  # noqa: E402

from dash_vlm import DeltaPress  # noqa: E402
from dash_vlm.bench import NOISE, batch_inputs  # noqa: E402
from dash_vlm.graphs import StaticDecoder  # noqa: E402
from dash_vlm.models.presets import PRESETS  # noqa: E402
from dash_vlm.press import Timer  # noqa: E402
from dash_vlm.vlm import FirstTokenTimer  # noqa: E402


def eager_generate(model, inputs, press, steps: int, logits: bool = False):
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
        graph.load(cache, allowed, positions + 1, tokens[:, 0], None)  # these random models set no penalty
        for step in range(steps - 1):
            graph.token.copy_(tokens[:, step : step + 1])
            graph.decode(1)
        return [logits.float(), *graph.logits[1:].clone().unbind(0)]


def agreement(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    errors = [relative_error(a, b) for a, b in zip(logits, reference, strict=True)]
    same = [bool(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in zip(logits, reference, strict=True)]
    return {"max_logits_relative_error": max(errors), "errors": errors, "greedy_agreement": sum(same) / len(same)}


def check(model, inputs: dict, press, steps: int, repeats: int) -> dict:
    eager, _, _ = eager_generate(model, inputs, press, steps, logits=True)
    reference_tokens = eager.sequences[:, inputs["input_ids"].shape[1] :]
    reference_logits = [step.float() for step in eager.logits]
    on_gpu = inputs["input_ids"].device.type == "cuda"  # on a CPU (a smoke test) both run uncaptured
    captured, uncaptured = StaticDecoder(model, capture=on_gpu), StaticDecoder(model, capture=False)
    free = captured.generate(inputs, press, steps, keep_logits=True, stop_at_end=False)
    forced = teacher_forced(captured, inputs, press, reference_tokens)
    forced_eagerly = teacher_forced(uncaptured, inputs, press, reference_tokens)
    result = {
        "free_running": agreement(free.logits, reference_logits)
        | {"same_tokens": bool(torch.equal(free.tokens, reference_tokens))},
        "teacher_forced": agreement(forced, reference_logits),
        "captured_against_uncaptured": agreement(forced, forced_eagerly),
    }
    timings = {"eager": [], "graphs": []}
    for repeat in range(repeats + 2):
        _, first, answer = eager_generate(model, inputs, press, steps)
        fast = captured.generate(inputs, press, steps, stop_at_end=False)
        if repeat < 2 or fast.captured:
            continue
        eager_ms = (first.milliseconds(), answer.milliseconds())
        timings["eager"].append({"ttft_ms": eager_ms[0], "answer_ms": eager_ms[1]})
        timings["graphs"].append({"ttft_ms": fast.first_token.milliseconds(), "answer_ms": fast.answer.milliseconds()})
    for path, runs in timings.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        medians["decode_step_ms"] = (medians["answer_ms"] - medians["ttft_ms"]) / (steps - 1)
        result[path] = medians
    result["runs"] = timings
    result["captures"] = captured.captures
    result["answer_speedup"] = result["eager"]["answer_ms"] / result["graphs"]["answer_ms"]
    return result


CONTROL = "ratio-0 control"


def noisy(cases: dict, batch_size: int) -> bool:
    """Whether the ratio-0 control of ``batch_size`` departs from vanilla by more than ``NOISE`` (TTFT or answer, on
    either path)."""
    vanilla, control = cases[f"vanilla, batch {batch_size}"], cases[f"{CONTROL}, batch {batch_size}"]
    return any(
        abs(control[path][key] / vanilla[path][key] - 1) > NOISE
        for path in ("eager", "graphs")
        for key in ("ttft_ms", "answer_ms")
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--ratio", type=float, default=0.667)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = preset.build(args.device, dtype)
    document = {
        "preset": args.preset,
        "image_size": args.image_size,
        "steps": args.steps,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cases": {},
        "noisy": {},
    }
    for batch_size in map(int, args.batch_sizes.split(",")):
        inputs = batch_inputs(preset.inputs(args.image_size), batch_size, args.device, dtype)
        cases = {
            "vanilla": None,
            CONTROL: DeltaPress(compression_ratio=0.0),
            f"DASH {args.ratio:g}": DeltaPress(compression_ratio=args.ratio),
        }
        for name, press in cases.items():
            case = f"{name}, batch {batch_size}"
            document["cases"][case] = check(model, inputs, press, args.steps, args.repeats)
            summary = {k: v for k, v in document["cases"][case].items() if k in ("eager", "graphs", "answer_speedup")}
            print(case, json.dumps(summary), flush=True)
        document["noisy"][batch_size] = noisy(document["cases"], batch_size)
    if args.output is not None:
        args.output.write_text(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
