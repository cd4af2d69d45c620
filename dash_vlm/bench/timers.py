"""The bench's clocks: CUDA events (or ``perf_counter``) per stage and per generated token, synchronised wall time
for a model split over GPUs, and replayed calls."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from dash_vlm.bench.config import STAGES
from dash_vlm.models import adapter_for
from dash_vlm.press import Timer
from dash_vlm.vlm import FirstTokenTimer


class WallTimer:
    """Wall time between construction and ``stop``, each taken after synchronising ``devices``: the timer of a model
    split over several GPUs (a host sync at both ends, so only for measuring)."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self._synchronize()
        self.start_time = time.perf_counter()

    def _synchronize(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

    def stop(self) -> None:
        self._synchronize()
        self.end_time = time.perf_counter()

    def milliseconds(self) -> float:
        return (self.end_time - self.start_time) * 1000


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters, in first-use order."""
    return list(dict.fromkeys(parameter.device for parameter in model.parameters()))


def timer_factory(model: nn.Module) -> Callable[[], Timer | WallTimer]:
    """Timers for ``model``: CUDA events (or ``perf_counter``) on one device, synchronised wall time on several."""
    devices = model_devices(model)
    if len(devices) > 1:
        return lambda: WallTimer(devices)
    return lambda: Timer(devices[0])


class StageTimers:
    """Times the first forward of the vision tower, the decoder and the prefill module in each run.

    Its hooks exist only from :meth:`reset` to the end of the first prefill: later forwards (decode steps, which
    transformers' static-cache path compiles) see the model without them.
    """

    def __init__(self, model: nn.Module):
        adapter = adapter_for(model)
        self.modules = {"vision": adapter.vision_tower(model), "decoder": adapter.decoder(model)}
        self.modules["prefill"] = adapter.prefill_module(model)
        self.new_timer = timer_factory(model)
        self.timers: dict[str, Timer | WallTimer] = {}
        self.handles = []

    def _starter(self, stage: str) -> Callable:
        def start(module, args):
            if stage not in self.timers:
                self.timers[stage] = self.new_timer()

        return start

    def _stopper(self, stage: str) -> Callable:
        def stop(module, args, output):
            timer = self.timers.get(stage)
            if timer is not None and not getattr(timer, "stopped", False):
                timer.stop()
                timer.stopped = True
            if stage == "prefill":  # the outermost module: every stage has run
                self.remove()

        return stop

    def reset(self) -> None:
        """Forget the last run's timers and watch the next prefill."""
        self.remove()
        self.timers = {}
        for stage, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._starter(stage)))
            self.handles.append(module.register_forward_hook(self._stopper(stage)))

    def milliseconds(self) -> dict[str, float]:
        return {f"{stage}_ms": self.timers[stage].milliseconds() for stage in STAGES}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class TokenTimer(FirstTokenTimer):
    """A :class:`FirstTokenTimer` that also times every later token: ``steps`` holds one timer per decode step.

    ``new_timer`` makes the timers (default: CUDA events, or ``perf_counter``, on ``device``)."""

    def __init__(self, device: torch.device, new_timer: Callable[[], Timer | WallTimer] | None = None):
        super().__init__(device)
        self.new_timer = new_timer or (lambda: Timer(device))
        self.timer, self.answer, self.steps = self.new_timer(), self.new_timer(), []
        self._current: Timer | WallTimer | None = None  # the step in progress; the one after the last never ends

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._current is not None:
            self._current.stop()
            self.steps.append(self._current)
        self._current = self.new_timer()
        return super().__call__(input_ids, scores, **kwargs)

    def finish(self) -> None:
        """Mark the end of generation: ``answer`` then times the whole call."""
        self.answer.stop()


def replay_milliseconds(module: nn.Module, args: tuple, kwargs: dict, repeats: int, captured: bool = False) -> float:
    """Time of one call of ``module`` on recorded arguments: ``repeats`` calls back to back per timing, as in a whole
    forward, where the host queues the next kernels while the GPU works (one call after an idle GPU would add the
    launch latency); the median of three timings. ``captured``: on a GPU, the call is captured once as a CUDA graph
    and replayed, so that a busy host cannot make it launch-bound (a decoder layer; the vision tower's blocks read
    their segment lengths on the host and cannot be captured)."""
    device = next(module.parameters()).device
    times = []
    # CUDA events record on the current device: make it the module's (GPU 1 in a split model)
    with torch.inference_mode(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        call = partial(module, *args, **kwargs)
        call()  # warm-up
        if captured and device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            call = graph.replay
        for _ in range(3):
            timer = Timer(device)
            for _ in range(repeats):
                call()
            timer.stop()
            times.append(timer.milliseconds() / repeats)
    return statistics.median(times)


def device_name(model: nn.Module) -> str:
    """The device the model runs on, in words ("2 x NVIDIA H200" when split)."""
    devices = model_devices(model)
    if devices[0].type != "cuda":
        return platform.processor() or "cpu"
    name = torch.cuda.get_device_name(devices[0])
    return name if len(devices) == 1 else f"{len(devices)} x {name}"
