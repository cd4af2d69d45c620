"""The ``dash-vlm`` command."""

from __future__ import annotations

import argparse
import logging

import torch

from dash_vlm.press import DeltaPress, PrefillStats
from dash_vlm.tiny import qwen_vl_sample, tiny_qwen_vl


def format_stats(stats: PrefillStats) -> str:
    return (
        f"tokens {stats.tokens} | eligible {stats.eligible} | kept {stats.kept} | decision layer "
        f"{stats.decision_layer} | halted {len(stats.halted_positions)} | prefill {stats.prefill_ms:.1f} ms | "
        f"KV cache {stats.kv_cache_bytes / 2**10:.1f} KiB"
    )


def run_demo(ratio: float, max_new_tokens: int) -> None:
    """Generate with and without DASH on a tiny random Qwen2-VL built from config, and print both."""
    model = tiny_qwen_vl()
    inputs = qwen_vl_sample([(1, 16, 16)], [12, 20])
    press = DeltaPress(compression_ratio=ratio)
    runs = {"vanilla": DeltaPress(compression_ratio=0.0), f"DASH {ratio}": press}
    print(f"tiny random Qwen2-VL ({model.config.text_config.num_hidden_layers} decoder layers), one image of 64 tokens")
    for name, run_press in runs.items():
        with torch.inference_mode(), run_press(model):
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        print(f"{name:>12}: tokens {new_tokens}")
        print(f"{'':>12}  {format_stats(run_press.last_stats[0])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dash-vlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate with and without DASH on the bundled default and compare")
    demo.add_argument("--ratio", type=float, default=0.667, help="compression ratio in [0, 1) (default 0.667)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        run_demo(args.ratio, args.max_new_tokens)


if __name__ == "__main__":
    main()
