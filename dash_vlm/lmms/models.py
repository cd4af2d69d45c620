"""lmms-eval models ``dash_qwen2vl``, ``dash_qwen2_5_vl``, ``dash_qwen3_vl``, ``dash_qwen3_5`` and ``dash_llava``:
DashVLM behind lmms-eval's interface.

``DashLMM`` holds the request loop, batching, timing and the figures; the prompt rule (how lmms-eval's own model of
the family turns a request into a prompt, so that ratio-0 scores are comparable with published lmms-eval numbers)
is the family adapter's ``lmms_conversation``. A family subclass only names its default checkpoint and its own
settings. Images are passed as they are (no JPEG re-encoding); video files (Qwen families) are read as lmms-eval's
``qwen2_vl`` (Qwen2-VL, Qwen2.5-VL), ``qwen3_vl`` (Qwen3-VL) or ``qwen3_5`` (Qwen3.5) reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import numbers
import time

from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig

from dash_vlm.lmms import MODELS, figures
from dash_vlm.models import DEFAULT_MAX_FRAMES, adapter_for, check_max_frames, model_types_with
from dash_vlm.models.qwen3_vl import LMMS_MAX_PIXELS, LMMS_MIN_PIXELS
from dash_vlm.press import DeltaPress
from dash_vlm.vlm import DashVLM

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# lmms-eval's qwen3_5 defaults (lmms_eval/models/simple/qwen3_5.py): the pixel budget of every image, the total budget
# of a video's frames, and the frame cap.
QWEN3_5_MIN_PIXELS, QWEN3_5_MAX_PIXELS = 64 * 32 * 32, 128 * 32 * 32
QWEN3_5_TOTAL_PIXELS, QWEN3_5_MAX_FRAMES = 224 * 1024 * 32 * 32, 768


class DashLMM(lmms):
    """The shared lmms-eval model: ``generate_until`` (batched) and ``loglikelihood`` under DASH.

    Model args come as lmms-eval hands them over: Python values, or text from ``--model_args`` (which its parser may
    have turned into a bool, an int or a float). Every one is converted and checked here, before any weights load; a
    bad one raises ``ValueError`` naming it, its value and what it accepts.

    Parameters
    ----------
    pretrained : str
        Hub id or local folder of the checkpoint. A family subclass reads its config first and refuses a model type
        outside its family (``family``), naming the dash model that serves it.
    attn_implementation, dtype, device_map :
        As in ``DashVLM.from_pretrained``; with several processes each loads on its own device.
    max_new_tokens : int
        Default generation length when the task sets none; at least 1.
    batch_size : int
        Requests per batch (lmms-eval's ``--batch_size``); at least 1. ``auto`` (and ``auto:N``) is refused: these
        models do not search for the largest batch that fits, and the batch size changes the timings they report.
    cuda_graphs : bool
        The fast path (``DashVLM``'s ``cuda_graphs``); tasks must decode greedily.
    **model_args
        The halting parameters, any field of ``DeltaPress`` by name (``compression_ratio``, ``method``, ...), and the
        family's own settings (``family_model_args``).
    """

    family: str | None = None
    """A model type of the family; the checkpoint's must be one that its adapter serves (``None``: any)."""

    ignored_stops: tuple[str, ...] = ()
    """Stop strings of a task (``until``) that the family's lmms-eval model does not cut its answers at."""

    def __init__(
        self,
        pretrained: str,
        attn_implementation: str | None = None,
        dtype: str = "auto",
        device_map: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int | str = 1,
        cuda_graphs: bool | str = False,
        **model_args,
    ) -> None:
        super().__init__()
        if str(batch_size).strip().lower().startswith("auto"):
            raise ValueError(
                f"batch_size must be an int >= 1, got {batch_size!r}: {type(self).__name__} does not search for the "
                "largest batch that fits (lmms-eval's --batch_size auto); give --batch_size N"
            )
        self.batch_size_per_gpu = _model_arg("batch_size", batch_size, int, minimum=1)
        self.max_new_tokens = _model_arg("max_new_tokens", max_new_tokens, int, minimum=1)
        cuda_graphs = _model_arg("cuda_graphs", cuda_graphs, bool)
        press = DeltaPress.from_options(**_halting_args(DeltaPress.pop_parameters(model_args)))
        family_args = self.family_model_args(**model_args)
        self.check_family(pretrained)
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device_map is None and self._world_size > 1:
            device_map = str(self.accelerator.device)
        self.vlm = DashVLM.from_pretrained(
            pretrained,
            press=press,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            cuda_graphs=cuda_graphs,
            **family_args,
        )

    def family_model_args(self, **model_args) -> dict:
        """Extra model args a family accepts (``min_pixels`` / ``max_pixels`` for Qwen); none by default."""
        if model_args:
            raise ValueError(
                f"{type(self).__name__} got unknown model args {sorted(model_args)}; it takes "
                f"{', '.join(self.model_arg_names())}"
            )
        return {}

    @classmethod
    def model_arg_names(cls) -> list[str]:
        """Every model arg the class takes by name: its constructors', its family's and the halting parameters."""
        methods = [klass.__init__ for klass in cls.__mro__ if issubclass(klass, DashLMM)] + [cls.family_model_args]
        return sorted(
            {
                parameter.name
                for method in methods
                for parameter in list(inspect.signature(method).parameters.values())[1:]
                if parameter.kind is parameter.POSITIONAL_OR_KEYWORD
            }
            | set(DeltaPress.parameter_names())
        )

    def check_family(self, pretrained: str) -> None:
        """``ValueError`` naming ``pretrained`` when the checkpoint's model type (read from its config alone, before
        any weights load) is not one of the family's, with the dash model that serves it."""
        if self.family is None:
            return
        try:
            model_type = AutoConfig.from_pretrained(pretrained).model_type
        except OSError:
            return  # a checkpoint that cannot be read: DashVLM.from_pretrained says why, before any weights load
        served = adapter_for(self.family).model_types
        if model_type in served:
            return
        models = _lmms_models()
        serving = [name for name, model in models.items() if model.family == model_type] or [
            name for name, model in models.items() if model_type in adapter_for(model.family).model_types
        ]
        own = next((name for name, model in models.items() if model is type(self)), type(self).__name__)
        raise ValueError(
            f"{own} serves model types {', '.join(served)}; the checkpoint pretrained={pretrained!r} is "
            f"{model_type!r}; " + (f"use {' or '.join(serving)}" if serving else "no dash lmms-eval model serves it")
        )

    def prompt_options(self) -> dict:
        """Settings of the family's prompt rule (``ModelAdapter.lmms_conversation``); none by default."""
        return {}

    def answer(self, text: str) -> str:
        """A generated text, already cut at the task's stop strings, as the family's lmms-eval model post-processes
        it into the answer; unchanged by default."""
        return text

    def conversation(self, context: str, visuals: list) -> tuple[list[dict], str | None]:
        """The chat conversation of a request (images as loaded ``PIL`` images) and, when the family's lmms-eval
        model renders the prompt in its own way, that prompt text: the family adapter's prompt rule."""
        return self.vlm.adapter.lmms_conversation(context, visuals, self.vlm.processor, **self.prompt_options())

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self):
        """This process's device: lmms-eval gathers its request counts there with several processes."""
        return self.accelerator.device

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        """A document's images (RGB) and video file paths, in its order."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        kept = []
        for visual in visuals or []:  # a document without visuals may give None
            if isinstance(visual, str) and visual.lower().endswith(VIDEO_SUFFIXES):
                if not self.vlm.adapter.video:
                    raise NotImplementedError(
                        f"{type(self).__name__} takes images only; {task} gave the video {visual!r} (video: "
                        f"{', '.join(model_types_with('video'))})"
                    )
                if importlib.util.find_spec("decord") is None:
                    raise ImportError(
                        "video through lmms-eval is read by decord, as lmms-eval's qwen2_vl reads it: "
                        "pip install 'dash-vlm[eval]'"
                    )
                kept.append(visual)
            elif isinstance(visual, Image.Image):
                kept.append(visual.convert("RGB"))
            else:
                raise NotImplementedError(
                    f"dash lmms-eval models take images and video files; {task} gave {visual!r:.80}"
                )
        return kept

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        collator = Collator(
            [request.args for request in requests],
            lambda args: (-len(args[0]), args[0]),
            group_fn=lambda args: args[1] or {},  # a task's generation settings; None: none
            grouping=True,
        )
        answers = []
        started, generated, prefill_ms, ttft_ms = time.perf_counter(), 0, [], []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="dash generate_until")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk, strict=True)
            kwargs = dict(all_kwargs[0] or {})  # the collator groups requests by generation kwargs; None: no settings
            until = kwargs.pop("until", None)
            until = [
                stop for stop in ([until] if isinstance(until, str) else until or []) if stop not in self.ignored_stops
            ]
            max_new_tokens = kwargs.pop("max_new_tokens", None)  # a task's None: the model's default
            max_new_tokens = (
                self.max_new_tokens
                if max_new_tokens is None
                else _model_arg("max_new_tokens", max_new_tokens, int, minimum=1)
            )
            temperature = float(kwargs.pop("temperature", 0) or 0)
            generation = {"do_sample": temperature > 0, "num_beams": int(kwargs.pop("num_beams", 1) or 1)}
            if temperature > 0:
                generation |= {"temperature": temperature, "top_p": kwargs.pop("top_p", None)}
            requests_in_chunk = [
                self.conversation(context, self._visuals(doc_to_visual, task, split, doc_id))
                for context, doc_to_visual, task, split, doc_id in zip(
                    contexts, doc_to_visuals, tasks, splits, doc_ids, strict=True
                )
            ]
            conversations = [conversation for conversation, _ in requests_in_chunk]
            prompts = [prompt for _, prompt in requests_in_chunk]
            results = self.vlm.generate_conversations(
                conversations,
                None if prompts[0] is None else prompts,
                max_new_tokens=max_new_tokens,
                **generation,
            )
            for result, context, task, doc_id in zip(results, contexts, tasks, doc_ids, strict=True):
                text = result.text
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                text = self.answer(text)
                stats = result.stats
                figures.record(
                    task,
                    doc_id,
                    {
                        "dash_prefill_ms": stats.prefill_ms,
                        "dash_ttft_ms": result.ttft_ms,
                        "dash_tokens": stats.tokens,
                        "dash_kept_tokens": stats.kept,
                        "dash_kv_cache_mb": stats.kv_cache_bytes / 2**20,
                        "dash_cuda_graphs": float(self.vlm.fast is not None),
                    },
                )
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                counts = TokenCounts(input_tokens=stats.tokens, output_tokens=result.generated_tokens)
                generated += result.generated_tokens
                prefill_ms.append(stats.prefill_ms)
                ttft_ms.append(result.ttft_ms)
                answers.append(GenerationResult(text=text.strip(), token_counts=counts))
            progress.update(len(chunk))
        progress.close()
        elapsed = time.perf_counter() - started
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics={
                "total_requests": len(requests),
                "dash_prefill_ms": sum(prefill_ms) / max(1, len(prefill_ms)),
                "dash_ttft_ms": sum(ttft_ms) / max(1, len(ttft_ms)),
            },
        )
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        scores = []
        for request in tqdm(requests, disable=self.rank != 0, desc="dash loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # lmms-eval passes the task's doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            conversation, prompt = self.conversation(context, self._visuals(doc_to_visual, task, split, doc_id))
            scores.append(self.vlm.score_continuation(conversation, continuation, prompt))
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not implement multi-round generation")


class DashQwen2VL(DashLMM):
    """Prompts as lmms-eval's ``qwen2_vl``, whose pixel budget (``min_pixels`` / ``max_pixels``) and video frame cap
    (``max_num_frames``, at most ``MAX_FRAMES_LIMIT``) are the defaults here. Serves Qwen2-VL and Qwen2.5-VL."""

    family = "qwen2_vl"

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2-VL-7B-Instruct",
        system_prompt: str = "You are a helpful assistant.",
        max_num_frames: int | str = DEFAULT_MAX_FRAMES,
        **kwargs,
    ):
        self.system_prompt = system_prompt
        self.max_num_frames = check_max_frames(_model_arg("max_num_frames", max_num_frames, int), "max_num_frames")
        super().__init__(pretrained, **kwargs)

    def family_model_args(self, min_pixels: int = 3136, max_pixels: int = 602112, **model_args) -> dict:
        super().family_model_args(**model_args)
        return {
            name: _model_arg(name, value, int)
            for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
        }

    def prompt_options(self) -> dict:
        return {"system_prompt": self.system_prompt, "max_num_frames": self.max_num_frames}


class DashQwen2_5_VL(DashQwen2VL):  # noqa: N801 - named like lmms-eval's Qwen2_5_VL
    family = "qwen2_5_vl"

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs):
        super().__init__(pretrained, **kwargs)


class DashQwen3VL(DashQwen2VL):
    """Prompts as lmms-eval's ``qwen3_vl``, whose system prompt, pixel budget of every image and video frame
    (``min_pixels`` / ``max_pixels``) and video frame cap (``max_num_frames``: a file gives ``min(max_num_frames, its
    frames)`` evenly spaced frames) are the defaults here. Serves Qwen3-VL and Qwen3-VL-MoE."""

    family = "qwen3_vl"
    ignored_stops = ("\n\n",)  # lmms-eval's qwen3_vl drops this stop string from every task's until

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", **kwargs):
        super().__init__(pretrained, **kwargs)

    def family_model_args(
        self, min_pixels: int = LMMS_MIN_PIXELS, max_pixels: int = LMMS_MAX_PIXELS, **model_args
    ) -> dict:
        return super().family_model_args(min_pixels, max_pixels, **model_args)


class DashQwen3_5(DashQwen3VL):  # noqa: N801 - named like lmms-eval's Qwen3_5
    """Prompts as lmms-eval's ``qwen3_5``, whose defaults are these: the system prompt, the pixel budget of every
    image (``min_pixels`` / ``max_pixels``), a video's frames (2 a second, at least 4, at most ``max_num_frames``, or
    its alias ``max_frames``; each at least ``min_pixels``, together within ``total_pixels``; ``total_pixels=None``
    or ``none`` reads videos as ``qwen3_vl`` does), the chat template's thinking switch (``enable_thinking``) and a
    default generation length of 1,024 tokens. With thinking on, an answer is the text after ``</think>``, stripped
    (``""`` where the thinking did not end). Serves Qwen3.5 and Qwen3.5-MoE. Unlike lmms-eval's ``qwen3_5``, which
    samples (temperature 0.7, top_p 0.8, top_k 20) where a task sets no temperature, it decodes greedily there, as
    every ``dash_*`` model does: ratio-0 scores of such tasks are deterministic, and may differ from published ones."""

    family = "qwen3_5"

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen3.5-4B",
        max_num_frames: int | str = QWEN3_5_MAX_FRAMES,
        max_frames: int | str | None = None,
        total_pixels: int | str | None = QWEN3_5_TOTAL_PIXELS,
        enable_thinking: bool | str = True,
        max_new_tokens: int = 1024,
        **kwargs,
    ):
        unset = total_pixels is None or str(total_pixels).strip().lower() == "none"
        self.total_pixels = None if unset else _model_arg("total_pixels", total_pixels, int, minimum=1)
        self.enable_thinking = _model_arg("enable_thinking", enable_thinking, bool)
        if max_frames is not None:  # lmms-eval's alias of max_num_frames
            max_num_frames = check_max_frames(_model_arg("max_frames", max_frames, int), "max_frames")
        super().__init__(pretrained, max_num_frames=max_num_frames, max_new_tokens=max_new_tokens, **kwargs)

    def family_model_args(
        self, min_pixels: int = QWEN3_5_MIN_PIXELS, max_pixels: int = QWEN3_5_MAX_PIXELS, **model_args
    ) -> dict:
        return super().family_model_args(min_pixels, max_pixels, **model_args)

    def prompt_options(self) -> dict:
        return super().prompt_options() | {"total_pixels": self.total_pixels, "enable_thinking": self.enable_thinking}

    def answer(self, text: str) -> str:
        """As lmms-eval's ``qwen3_5`` (``_strip_thinking``): with thinking on, the text after ``</think>``, stripped;
        ``""`` where there is none."""
        return text.partition("</think>")[2].strip() if self.enable_thinking else text


class DashLlava(DashLMM):
    """Prompts as lmms-eval's ``llava_hf``. Serves LLaVA-1.5 and LLaVA-NeXT."""

    family = "llava"

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs):
        super().__init__(pretrained, **kwargs)


FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _model_arg(name: str, value: object, kind: type[int] | type[bool], minimum: int | None = None) -> int | bool:
    """A model arg as ``kind`` (``int`` at least ``minimum``, or ``bool``), from the Python value or the text that
    lmms-eval hands over (its parser makes "-1" the float -1.0, so an integral float counts as an int).

    Raises
    ------
    ValueError
        Naming ``name``, the value and what is accepted.
    """
    if kind is bool:
        flag = value if isinstance(value, bool) else FLAGS.get(str(value).strip().lower())
        if flag is None:
            raise ValueError(f"{name} must be true or false, got {value!r} (accepted: {', '.join(FLAGS)})")
        return flag
    number = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value)
    if number is None or (minimum is not None and number < minimum):
        raise ValueError(f"{name} must be an int{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return number


def _halting_args(halting: dict) -> dict:
    """The halting model args with the int fields of ``DeltaPress`` (``seed``, ``fastv_layer``, ...) converted as
    the other int model args are: lmms-eval's parser makes "3.0" and "1e0" floats, and an integral float is an int.
    The other fields go to ``DeltaPress.from_options`` as they are."""
    int_fields = {
        parameter.name
        for parameter in dataclasses.fields(DeltaPress)
        if parameter.init and type(parameter.default) is int
    }
    return {name: _model_arg(name, value, int) if name in int_fields else value for name, value in halting.items()}


def _lmms_models() -> dict[str, type[DashLMM]]:
    """The registered lmms-eval models (``dash_vlm.lmms.MODELS``) by name."""
    classes = {}
    for name, path in MODELS.items():
        module, _, attribute = path.rpartition(".")
        classes[name] = getattr(importlib.import_module(module), attribute)
    return classes
