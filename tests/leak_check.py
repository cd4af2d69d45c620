"""Repeated calls leave nothing behind (run on any machine):

    python tests/leak_check.py --calls 200

Python memory traced by ``tracemalloc`` over ``--calls`` ``DashVLM.generate`` calls (DASH in the decoder and the
vision tower) on the bundled dash-shapes checkpoint, after 20 warm-up calls, against the same number of calls that
only build the processor inputs; plus the hooks left on the model and the halted cache layers still alive.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from dash_vlm import DashVLM
from dash_vlm.cache import HaltedLayer
from dash_vlm.shapes.data import read_test_split
from dash_vlm.shapes.evaluate import model_folder


def growth(call, calls: int) -> tuple[int, float]:
    """Bytes of Python memory still allocated after ``calls`` calls, and the seconds they took."""
    for _ in range(20):
        call()
    gc.collect()
    tracemalloc.start()
    before, started = tracemalloc.get_traced_memory()[0], time.perf_counter()
    for _ in range(calls):
        call()
    seconds = time.perf_counter() - started
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    sample = read_test_split()[0]
    vlm = DashVLM.from_pretrained(
        model_folder("qwen2-vl"), device_map="cpu", compression_ratio=0.667, vision_compression_ratio=0.5
    )
    chat = [[{"role": "user", "content": [{"type": "image", "image": sample.image.convert("RGB")},
                                           {"type": "text", "text": sample.question}]}]]  # fmt: skip
    generate_bytes, generate_seconds = growth(
        lambda: vlm.generate(image=sample.image, prompt=sample.question, max_new_tokens=4), args.calls
    )
    processor_bytes, _ = growth(lambda: vlm.adapter.processor_inputs(vlm.processor, chat), args.calls)
    result = {
        "calls": args.calls,
        "generate_growth_bytes": generate_bytes,
        "processor_growth_bytes": processor_bytes,
        "attributable_growth_bytes": generate_bytes - processor_bytes,
        "generate_seconds": round(generate_seconds, 1),
        "hooks_left": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules()),
        "halted_layers_alive": sum(isinstance(o, HaltedLayer) for o in gc.get_objects()),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
