"""Where the fast path's decoder prefill spends its GPU time (run on a GPU): kernel times of the prefill graph's work,
vanilla against DASH, by kernel, from the PyTorch profiler.

    python tests/prefill_profile.py --preset qwen2-vl-7b --image-size 896 --output prefill_profile.json

The graph's ``run`` is profiled uncaptured (``capture=False``: the same kernels, launched one by one), after warm-up
calls; the totals are the sums of the kernels' own GPU times over ``--repeats`` prefills, per prefill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dash_vlm import DeltaPress
from dash_vlm.bench import batch_inputs
from dash_vlm.graphs import StaticDecoder
from dash_vlm.models.presets import PRESETS


def kernel_times(decoder: StaticDecoder, inputs: dict, press: DeltaPress | None, repeats: int) -> dict:
    """Per-kernel GPU milliseconds of one prefill (the mean over ``repeats``), largest first."""
    for _ in range(2):
        decoder.prefill(inputs, press)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            decoder.prefill(inputs, press)
        torch.cuda.synchronize()
    kernels = {}
    for event in profiler.key_averages():
        milliseconds = event.device_time_total / 1000 / repeats
        if milliseconds > 0:
            kernels[event.key] = milliseconds
    return dict(sorted(kernels.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--ratio", type=float, default=0.667)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    model = preset.build("cuda", torch.bfloat16)
    inputs = batch_inputs(preset.inputs(args.image_size), 1, "cuda", torch.bfloat16)
    decoder = StaticDecoder(model, capture=False)
    document = {"preset": args.preset, "image_size": args.image_size, "device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        for name, press in (("vanilla", None), (f"DASH {args.ratio:g}", DeltaPress(compression_ratio=args.ratio))):
            kernels = kernel_times(decoder, inputs, press, args.repeats)
            document[name] = {"total_ms": sum(kernels.values()), "kernels": kernels}
            print(name, f"{document[name]['total_ms']:.2f} ms of kernels per prefill", flush=True)
            for key, milliseconds in list(kernels.items())[:25]:
                print(f"  {milliseconds:8.3f}  {key[:110]}")
    args.output.write_text(json.dumps(document, indent=1))
    return document


if __name__ == "__main__":
    main()
