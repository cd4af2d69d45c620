"""Repeated calls leave nothing behind (run on any machine):

    python tests/leak_check.py --calls 200
    python tests/leak_check.py --calls 200 --cuda-graphs   # on a GPU: the fast path

Python memory traced by ``tracemalloc`` over ``--calls`` ``DashVLM.generate`` calls (DASH in the decoder and the
vision tower) on the bundled dash-shapes checkpoint, after 20 warm-up calls, against the same number of calls that
only build the processor inputs; plus the hooks left on the model, the halted cache layers still alive and, on a GPU,
the GPU memory the calls left allocated (with ``--cuda-graphs`` the graphs are captured in the warm-up calls).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

import torch

from dash_vlm import DashVLM
from dash_vlm.cache import HaltedLayer
from dash_vlm.shapes.data import read_test_split
from dash_vlm.shapes.evaluate import model_folder


def gpu_allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def growth(call, calls: int) -> tuple[int, float, int]:
    """Bytes of Python memory still allocated after ``calls`` calls, the seconds they took, and the bytes of GPU
    memory they left allocated."""
    for _ in range(20):
        call()
    gc.collect()
    gpu_before = gpu_allocated()
    tracemalloc.start()
    before, started = tracemalloc.get_traced_memory()[0], time.perf_counter()
    for _ in range(calls):
        call()
    seconds = time.perf_counter() - started
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, seconds, gpu_allocated() - gpu_before


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cuda-graphs", action="store_true", help="the fast path (needs a GPU)")
    args = parser.parse_args(argv)
    sample = read_test_split()[0]
    device = "cuda" if args.cuda_graphs else "cpu"
    vlm = DashVLM.from_pretrained(
        model_folder("qwen2-vl"),
        device_map=device,
        compression_ratio=0.667,
        vision_compression_ratio=0.5,
        cuda_graphs=args.cuda_graphs,
    )
    chat = [[{"role": "user", "content": [{"type": "image", "image": sample.image.convert("RGB")},
                                           {"type": "text", "text": sample.question}]}]]  # fmt: skip
    generate_bytes, generate_seconds, gpu_bytes = growth(
        lambda: vlm.generate(image=sample.image, prompt=sample.question, max_new_tokens=4), args.calls
    )
    processor_bytes, _, _ = growth(lambda: vlm.adapter.processor_inputs(vlm.processor, chat), args.calls)
    result = {
        "calls": args.calls,
        "generate_growth_bytes": generate_bytes,
        "processor_growth_bytes": processor_bytes,
        "attributable_growth_bytes": generate_bytes - processor_bytes,
        "generate_seconds": round(generate_seconds, 1),
        "cuda_graphs": args.cuda_graphs,
        "gpu_allocated_growth_bytes": gpu_bytes,
        "graph_captures": None if vlm.fast is None else vlm.fast.captures,
        "hooks_left": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules()),
        "halted_layers_alive": sum(isinstance(o, HaltedLayer) for o in gc.get_objects()),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
