"""lmms-eval models ``dash_qwen2vl``, ``dash_qwen2_5_vl`` and ``dash_llava``: DashVLM behind lmms-eval's interface.

``DashLMM`` holds the request loop, batching, timing and the figures; a family subclass only says how lmms-eval's
own model of that family turns a request into a prompt, so that ratio-0 scores are comparable with published
lmms-eval numbers. Images are passed as they are (no JPEG re-encoding).
"""

from __future__ import annotations

import time

from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import Collator
from PIL import Image
from tqdm import tqdm

from dash_vlm.lmms import figures
from dash_vlm.vlm import DashVLM

# lmms-eval's llava_hf fallback template (lmms_eval/models/simple/llava_hf.py), written out because importing that
# module needs decord, which lmms-eval does not install.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class DashLMM(lmms):
    """The shared lmms-eval model: ``generate_until`` (batched) and ``loglikelihood`` under DASH.

    Parameters
    ----------
    pretrained : str
        Hub id or local folder of the checkpoint.
    compression_ratio, start_ratio, scope :
        The halting rule (``DeltaPress``).
    attn_implementation, dtype, device_map :
        As in ``DashVLM.from_pretrained``; with several processes each loads on its own device.
    max_new_tokens : int
        Default generation length when the task sets none.
    batch_size : int
        Requests per batch (lmms-eval's ``--batch_size``).
    """

    def __init__(
        self,
        pretrained: str,
        compression_ratio: float = 0.667,
        start_ratio: float = 0.4,
        scope: str = "auto",
        attn_implementation: str | None = None,
        dtype: str = "auto",
        device_map: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int | str = 1,
        **model_args,
    ) -> None:
        super().__init__()
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device_map is None and self._world_size > 1:
            device_map = str(self.accelerator.device)
        self.vlm = DashVLM.from_pretrained(
            pretrained,
            compression_ratio=float(compression_ratio),
            start_ratio=float(start_ratio),
            scope=scope,
            dtype=dtype,
            device_map=device_map,
            attn_implementation=attn_implementation,
            **self.family_model_args(**model_args),
        )
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)

    def family_model_args(self, **model_args) -> dict:
        """Extra model args a family accepts (``min_pixels`` / ``max_pixels`` for Qwen); none by default."""
        if model_args:
            raise ValueError(f"{type(self).__name__} got unknown model args {sorted(model_args)}")
        return {}

    def conversation(self, context: str, visuals: list) -> tuple[list[dict], str | None]:
        """The chat conversation of a request (images as loaded ``PIL`` images) and, when the family's lmms-eval
        model renders the prompt in its own way, that prompt text."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(f"dash lmms-eval models take images only; {task} gave {type(visual)}")
        return [visual.convert("RGB") for visual in visuals]

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
    """Prompts as lmms-eval's ``qwen2_vl``: a system message, the images, then the text without ``<image>`` tags."""

    def __init__(
        self,
        pretrained: str = "Qwen/Qwen2-VL-7B-Instruct",
        system_prompt: str = "You are a helpful assistant.",
        **kwargs,
    ):
        self.system_prompt = system_prompt
        super().__init__(pretrained, **kwargs)

    def family_model_args(self, min_pixels: int = 3136, max_pixels: int = 602112, **model_args) -> dict:
        super().family_model_args(**model_args)
        return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}

    def conversation(self, context: str, visuals: list) -> tuple[list[dict], str | None]:
        content = [{"type": "image", "image": visual} for visual in visuals]
        content.append({"type": "text", "text": context.replace("<image>", "")})
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}], None


class DashQwen2_5_VL(DashQwen2VL):  # noqa: N801 - named like lmms-eval's Qwen2_5_VL
    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-7B-Instruct", **kwargs):
        super().__init__(pretrained, **kwargs)


class DashLlava(DashLMM):
    """Prompts as lmms-eval's ``llava_hf``: ``<image>`` tags before the text (unless it has them), one user message
    rendered by the tokenizer's chat template, or lmms-eval's Vicuna template when the tokenizer has none."""

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", **kwargs):
        super().__init__(pretrained, **kwargs)

    def conversation(self, context: str, visuals: list) -> tuple[list[dict], str | None]:
        if visuals and "<image>" not in context:
            context = " ".join(["<image>"] * len(visuals)) + "\n" + context
        tokenizer = self.vlm.processor.tokenizer
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": context}],
            chat_template=tokenizer.chat_template or VICUNA_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        content = [{"type": "image", "image": visual} for visual in visuals] + [{"type": "text", "text": context}]
        return [{"role": "user", "content": content}], prompt
