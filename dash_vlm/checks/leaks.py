"""``dash-vlm check leaks``: do repeated ``DashVLM.generate`` calls leave anything behind?

``calls`` calls (after ``WARMUP`` calls, which also capture the fast path's graphs with ``cuda_graphs``) on the
checkpoint with the given press, against the same number of calls that only build the processor inputs. Cases, each
with its verdict:

- hooks: the hooks on the model's modules afterwards are those it had before the first call;
- halted caches: no halted cache layer (``dash_vlm.cache.HaltedLayer``) is alive after the calls;
- tensors: no more tensors are alive after the calls than before them (a tensor kept per call shows as ``calls``);
- Python memory: what ``tracemalloc`` traces the calls to keep, beyond what the processor alone keeps, is within
  ``PYTHON_BYTES`` plus ``PYTHON_BYTES_PER_CALL`` per call (200 calls on the bundled checkpoint: 44 KB apart in all);
  a tensor's storage is not traced there, so the tensors case is the sharper one;
- GPU memory (on a GPU): the calls leave at most ``GPU_BYTES`` more allocated than before them.
"""

from __future__ import annotations

import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from dash_vlm.checks import CheckConfig, all_passed
from dash_vlm.checks.split import picture, save_preset
from dash_vlm.press import DeltaPress

WARMUP = 20
PYTHON_BYTES = 256 << 10  # tracemalloc sees one-off allocations too (logging, lazy caches): 25 KB over 4 calls
PYTHON_BYTES_PER_CALL = 2048
GPU_BYTES = 1 << 20


def gpu_allocated(device: str | torch.device = "cpu") -> int:
    """Bytes allocated on ``device`` (the model's GPU, not merely the current one); 0 on a CPU."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def tensors_alive() -> int:
    return sum(issubclass(type(item), torch.Tensor) for item in gc.get_objects())  # type(): no proxy's __class__


def growth(call, calls: int, device: str | torch.device = "cpu") -> dict:
    """What ``calls`` calls keep, after ``WARMUP`` calls: traced Python bytes, tensors alive, GPU bytes allocated, and
    the seconds they took."""
    for _ in range(WARMUP):
        call()
    gc.collect()
    gpu_before, tensors_before = gpu_allocated(device), tensors_alive()
    tracemalloc.start()
    before, started = tracemalloc.get_traced_memory()[0], time.perf_counter()
    for _ in range(calls):
        call()
    seconds = time.perf_counter() - started
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "python_bytes": after - before,
        "tensors": tensors_alive() - tensors_before,
        "gpu_bytes": gpu_allocated(device) - gpu_before,
        "seconds": round(seconds, 2),
    }


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on the model's modules, and forwards swapped on an instance (prefill chunks, the
    fast path's tower), which a leak would leave as surely as a hook."""
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) + ("forward" in vars(module))
        for module in model.modules()
    )


def run(
    source: str | Path,
    name: str,
    press: DeltaPress,
    request: dict,
    calls: int,
    steps: int,
    device: str,
    cuda_graphs: bool = False,
    dtype: str = "auto",
) -> dict:
    """The check on the checkpoint ``source``, asked ``request`` (``DashVLM.generate``'s image or video and prompt)."""
    from dash_vlm.cache import HaltedLayer
    from dash_vlm.vlm import DashVLM, VisualLoader

    vlm = DashVLM.from_pretrained(source, press=press, device_map=device, dtype=dtype, cuda_graphs=cuda_graphs)
    hooks_before = hook_count(vlm.model)
    generated = growth(lambda: vlm.generate(**request, max_new_tokens=steps), calls, vlm.model.device)
    kind = "video" if "video" in request else "image"
    visual = {"type": kind, kind: request[kind]}
    chat, _ = VisualLoader(False, True).conversation(
        [{"role": "user", "content": [visual, {"type": "text", "text": request["prompt"]}]}]
    )
    processor_only = growth(lambda: vlm.adapter.processor_inputs(vlm.processor, [chat]), calls)
    attributable = generated["python_bytes"] - processor_only["python_bytes"]
    python_bound = PYTHON_BYTES + PYTHON_BYTES_PER_CALL * calls
    measured = {
        "hooks": (hook_count(vlm.model), hooks_before, hook_count(vlm.model) == hooks_before),
        "halted caches": (sum(isinstance(o, HaltedLayer) for o in gc.get_objects()), 0, None),
        "tensors": (generated["tensors"], 0, generated["tensors"] <= 0),
        "python memory": (attributable, python_bound, attributable <= python_bound),
    }
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        measured["gpu memory"] = (generated["gpu_bytes"], GPU_BYTES, generated["gpu_bytes"] <= GPU_BYTES)
    cases = {}
    for case, (value, bound, passed) in measured.items():
        passed = value == bound if passed is None else passed
        cases[case] = {"value": value, "bound": bound, "verdict": "PASS" if passed else "FAIL"}
    document = {"check": "leaks", "subject": name, "steps": steps, "press": repr(press), "calls": calls}
    document |= {"cuda_graphs": cuda_graphs, "device": str(device), "generate": generated}
    document |= {"processor_only": processor_only, "graph_captures": None if vlm.fast is None else vlm.fast.captures}
    document["cases"] = cases
    document["passed"] = all_passed(cases)
    return document


def validate(config: CheckConfig, press: DeltaPress, model_config) -> None:
    """The fast path needs a GPU."""
    if config.options["cuda_graphs"] and not config.device.startswith("cuda"):
        raise ValueError(f"check leaks with cuda_graphs needs a CUDA GPU; the device is {config.device}")


def check(config: CheckConfig, press: DeltaPress) -> dict:
    """``dash-vlm check leaks`` on ``config``'s subject: a preset is saved as a checkpoint in a temporary folder."""
    options = config.options
    settings = dict(calls=options["calls"], steps=options["steps"], device=config.device)
    settings["cuda_graphs"] = options["cuda_graphs"]
    if config.model is not None:
        visual = {"image": str(config.image)} if config.video is None else {"video": str(config.video)}
        name = f"{config.model}, {(config.image or config.video).name}"
        return run(config.model, name, press, {"prompt": config.prompt, **visual}, dtype=config.dtype, **settings)
    with tempfile.TemporaryDirectory(prefix="dash-vlm-leaks-") as workspace:
        source = save_preset(config.preset, Path(workspace), config.device)
        request = {"image": picture(config.image_size, 0), "prompt": "describe the picture ."}
        return run(source, f"{config.preset}, {config.image_size} px", press, request, **settings)


COLUMNS = {
    "value": lambda case: str(case["value"]),
    "bound": lambda case: str(case["bound"]),
}
