"""lmms-eval models ``dash_qwen2vl``, ``dash_qwen2_5_vl`` and ``dash_llava``: DashVLM behind lmms-eval's interface.

``DashLMM`` holds the request loop, batching, timing and the figures; the prompt rule (how lmms-eval's own model of
the family turns a request into a prompt, so that ratio-0 scores are comparable with published lmms-eval numbers)
is the family adapter's ``lmms_conversation``. A family subclass only names its default checkpoint and its own
settings. Images are passed as they are (no JPEG re-encoding); video files (Qwen family) are read as lmms-eval's
``qwen2_vl`` reads them.
"""

from __future__ import annotations

import importlib.util
import time

from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm

from dash_vlm.lmms import figures
from dash_vlm.models import DEFAULT_MAX_FRAMES, model_types_with
from dash_vlm.press import DeltaPress
from dash_vlm.vlm import DashVLM

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class DashLMM(lmms):
    """The shared lmms-eval model: ``generate_until`` (batched) and ``loglikelihood`` under DASH.

    Parameters
    ----------
    pretrained : str
        Hub id or local folder of the checkpoint.
    attn_implementation, dtype, device_map :
        As in ``DashVLM.from_pretrained``; with several processes each loads on its own device.
    max_new_tokens : int
        Default generation length when the task sets none.
    batch_size : int
        Requests per batch (lmms-eval's ``--batch_size``).
    cuda_graphs : bool
        The fast path (``DashVLM``'s ``cuda_graphs``); tasks must decode greedily.
    **model_args
        The halting parameters, any field of ``DeltaPress`` by name (``compression_ratio``, ``method``, ...), and the
        family's own settings (``family_model_args``).
    """

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
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device_map is None and self._world_size > 1:
            device_map = str(self.accelerator.device)
        self.vlm = DashVLM.from_pretrained(
            pretrained,
            press=DeltaPress.from_options(**DeltaPress.pop_parameters(model_args)),
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            cuda_graphs=_flag("cuda_graphs", cuda_graphs),
            **self.family_model_args(**model_args),
        )
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)

    def family_model_args(self, **model_args) -> dict:
        """Extra model args a family accepts (``min_pixels`` / ``max_pixels`` for Qwen); none by default."""
        if model_args:
            raise ValueError(f"{type(self).__name__} got unknown model args {sorted(model_args)}")
        return {}

    def prompt_options(self) -> dict:
        """Settings of the family's prompt rule (``ModelAdapter.lmms_conversation``); none by default."""
        return {}

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
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        kept = []
        for visual in visuals:
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
            group_fn=lambda args: args[1],
            grouping=True,
        )
        answers = []
        started, generated, prefill_ms, ttft_ms = time.perf_counter(), 0, [], []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="dash generate_until")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk, strict=True)
            kwargs = dict(all_kwargs[0])  # the collator groups requests by generation kwargs
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new_tokens = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
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
    """Prompts as lmms-eval's ``qwen2_vl``, whose pixel budget and video frame cap (``max_num_frames``) are the
    defaults here."""

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2-VL-7B-Instruct",
        system_prompt: str = "You are a helpful assistant.",
        max_num_frames: int | str = DEFAULT_MAX_FRAMES,
        **kwargs,
    ):
        self.system_prompt, self.max_num_frames = system_prompt, int(max_num_frames)
        if self.max_num_frames < 1:
            raise ValueError(f"max_num_frames must be a positive int, got {max_num_frames!r}")
        super().__init__(pretrained, **kwargs)

    def family_model_args(self, min_pixels: int = 3136, max_pixels: int = 602112, **model_args) -> dict:
        super().family_model_args(**model_args)
        return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}

    def prompt_options(self) -> dict:
        return {"system_prompt": self.system_prompt, "max_num_frames": self.max_num_frames}


class DashQwen2_5_VL(DashQwen2VL):  # noqa: N801 - named like lmms-eval's Qwen2_5_VL
    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs):
        super().__init__(pretrained, **kwargs)


class DashLlava(DashLMM):
    """Prompts as lmms-eval's ``llava_hf``."""

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs):
        super().__init__(pretrained, **kwargs)


def _flag(name: str, value: bool | str) -> bool:
    """A boolean model arg, as lmms-eval hands it over (a bool, or text from ``--model_args``)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
