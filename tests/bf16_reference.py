"""DASH against the independent masked reference on a real-shape model with a few layers, in bf16 (run on a GPU).

    python tests/bf16_reference.py --preset qwen2-vl-7b --layers 6 --image-size 896 --ratio 0.667 --output ref.json

Greedy generation with the press and with ``reference.MaskedReference`` (halted keys masked, rows reset) from the
same random weights; reports the relative error of every step's logits and how many greedy tokens agree. With SDPA
the press's compact sequence runs causal attention without a mask (the flash kernel on Hopper in bf16), the
reference runs masked attention, so the two differ by bf16 rounding only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import decoder_reference, relative_error  # noqa: E402

from dash_vlm import DeltaPress  # noqa: E402
from dash_vlm.bench import batch_inputs  # noqa: E402
from dash_vlm.models.presets import PRESETS  # noqa: E402


def compare(preset: str, layers: int, vision_layers: int, image_size: int, ratio: float, steps: int, device: str):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = PRESETS[preset].build(device, dtype, layers=layers, vision_layers=vision_layers)
    inputs = batch_inputs(PRESETS[preset].inputs(image_size), 1, device, dtype)
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True)
    settings["return_dict_in_generate"] = True
    press = DeltaPress(compression_ratio=ratio, scope="vision")
    with torch.inference_mode(), press(model):
        dash = model.generate(**inputs, **settings)
    reference = decoder_reference(model, ratio, scope="vision")  # the subsequence one for a hybrid decoder
    with torch.inference_mode(), reference():
        expected = model.generate(**inputs, **settings)
    errors = [relative_error(x, y) for x, y in zip(dash.logits, expected.logits, strict=True)]
    length = inputs["input_ids"].shape[1]
    tokens, reference_tokens = dash.sequences[0, length:].tolist(), expected.sequences[0, length:].tolist()
    agreeing = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens, strict=True)) if a != b), steps)
    stats = press.last_stats[0]
    return {
        "preset": preset,
        "layers": layers,
        "vision_layers": vision_layers,
        "image_size": image_size,
        "ratio": ratio,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "tokens": stats.tokens,
        "kept": stats.kept,
        "same_halted_positions": stats.halted_positions == reference.halted_per_sample[0],
        "prefill_logits_relative_error": errors[0],
        "max_logits_relative_error": max(errors),
        "greedy_tokens_agreeing_before_first_difference": agreeing,
        "greedy_token_agreement": sum(a == b for a, b in zip(tokens, reference_tokens, strict=True)) / steps,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-vl-7b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--ratio", type=float, default=0.667)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    result = compare(args.preset, args.layers, args.vision_layers, args.image_size, args.ratio, args.steps, args.device)
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
