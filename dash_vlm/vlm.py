"""DashVLM: a supported vision-language model, its processor and a DeltaPress behind one call on image + prompt."""

from __future__ import annotations

import difflib
import functools
import io
import itertools
import logging
import numbers
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    StoppingCriteria,
)

from dash_vlm.attention import load_implementation, use_attention
from dash_vlm.chunking import prefer_expandable_segments
from dash_vlm.graphs import StaticDecoder, after_first_end
from dash_vlm.maps import halting_maps
from dash_vlm.models import (
    DEFAULT_MAX_FRAMES,
    ModelAdapter,
    TokenGrid,
    adapter_for,
    chat_prompts,
    check_max_frames,
    frame_indices,
    model_types_with,
)
from dash_vlm.press import DeltaPress, PrefillStats, Timer

logger = logging.getLogger(__name__)

ImageInput = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor
SINGLE_IMAGES = (str, Path, bytes, Image.Image, np.ndarray, torch.Tensor)  # what one image may be
VideoInput = str | Path | Sequence[Image.Image]
VIDEO_FPS = 2.0  # frames sampled per second of a video file, the qwen-vl-utils default
MIN_FILE_FRAMES = 2  # qwen-vl-utils reads no video file of fewer frames (one temporal patch); PyAV decodes those
DEFAULT_MAX_NEW_TOKENS = 128
DOWNLOAD_LIMIT_BYTES = 256 * 2**20  # an image or video fetched from a URL (allow_urls=True) is at most this large ...
DOWNLOAD_TIMEOUT_S = 60.0  # ... and arrives within this many seconds


@dataclass
class GenerationResult:
    """The answer to one prompt, the statistics of its prefill, the time to the first token (from the call to
    ``model.generate``, so preprocessing excluded; the same for every sample of a batch), how many tokens were
    generated (end-of-sequence included) and, on demand, the token grids of its images (:attr:`grids`)."""

    text: str
    stats: PrefillStats
    ttft_ms: float = float("nan")
    generated_tokens: int = 0
    grid_source: Callable[[], list[TokenGrid]] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def grids(self) -> list[TokenGrid]:
        """The token grids of the prompt's images (``models.TokenGrid``; positions in the unpadded prompt, as
        ``stats.halted_positions`` are), built on first use by running the processor on this prompt alone."""
        return [] if self.grid_source is None else self.grid_source()

    def halting_map(self, min_height: int = 0) -> list[Image.Image]:
        """One picture per image or video frame group of the prompt: the image as the model saw it, the cells of the
        tokens that halted in the decoder shaded dark and the patches that halted in the vision tower blue (LLaVA-NeXT:
        the base view and the tiled view side by side); scaled up by whole pixels to at least ``min_height`` rows."""
        if isinstance(min_height, bool) or not isinstance(min_height, numbers.Real) or not 0 <= min_height <= 8192:
            raise ValueError(f"min_height must be a number of pixel rows in [0, 8192], got {min_height!r}")
        patches = self.stats.vision_halted_patches or ()
        return halting_maps(self.grids, self.stats.halted_positions, patches, min_height)


class FirstTokenTimer(StoppingCriteria):
    """Stops nothing; stops its timer when generate has chosen the first token."""

    def __init__(self, device: torch.device):
        self.timer, self.seen = Timer(device), False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.seen:
            self.timer.stop()
            self.seen = True
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generated_counts(new_tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> list[int]:
    """Tokens generated per sample, up to and including its first end-of-sequence token."""
    return (~after_first_end(new_tokens, eos_token_id)).sum(-1).tolist()


class DashVLM:
    """A vision-language model that generates under DASH.

    Parameters
    ----------
    model : PreTrainedModel
        A supported vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA-1.5, LLaVA-NeXT).
    processor : ProcessorMixin
        Its processor, with the checkpoint's chat template. Its tokenizer is set to pad on the left.
    press : DeltaPress
        The halting rule applied to every prefill.
    min_pixels, max_pixels : int, optional
        Pixel budget of each image or video frame (Qwen2-VL family); default: the processor's own.
    allow_urls : bool
        Whether ``http(s)://`` images may be fetched.
    cuda_graphs : bool
        The fast path (DESIGN.md section 8): greedy decode steps over a static KV cache replayed as CUDA graphs
        (``graphs.StaticDecoder``). Needs the model on one CUDA GPU and greedy decoding.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        press: DeltaPress | None = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_urls: bool = False,
        cuda_graphs: bool = False,
    ):
        if not isinstance(model, PreTrainedModel) or not isinstance(processor, ProcessorMixin):
            raise TypeError(
                f"DashVLM takes a transformers model and its processor, got {type(model).__name__} and "
                f"{type(processor).__name__}"
            )
        press = press if press is not None else DeltaPress()
        self.adapter = _check_settings(model.config, processor, press, min_pixels, max_pixels, allow_urls, cuda_graphs)
        self.model, self.processor, self._press = model, processor, press
        self.min_pixels, self.max_pixels, self.allow_urls = min_pixels, max_pixels, allow_urls
        processor.tokenizer.padding_side = "left"
        self.fast = StaticDecoder(model) if cuda_graphs else None
        self._lock = threading.Lock()  # one model, one generation at a time: calls from several threads take turns

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        press: DeltaPress | None = None,
        dtype: str | torch.dtype = "auto",
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_urls: bool = False,
        cuda_graphs: bool = False,
        **model_kwargs,
    ) -> DashVLM:
        """Load a checkpoint (hub id or local folder) the ordinary transformers way, with a ``DeltaPress``.

        The halting parameters are ``DeltaPress``'s fields, taken here by name (``compression_ratio=0.5,
        method="random"``, ...), or a whole ``press``; they are validated and the model type checked before any
        weights load. ``dtype`` is "auto", a torch dtype or its name ("bfloat16"), as transformers takes it.
        ``device_map=None`` puts the whole model on the first GPU if there is one, else on the CPU. The other
        keyword arguments go to the model's ``from_pretrained`` (``trust_remote_code``, ``revision``,
        ``quantization_config``, ...). ``cuda_graphs=True`` turns on the fast path (see :class:`DashVLM`).
        ``attn_implementation``: one of ``attention.ATTENTION_CHOICES``; ``None`` and ``"sdpa"`` run SDPA in the
        decoder, and a Qwen vision tower runs FA4 (``None``, when FA4 is installed and the weights are bf16 or fp16
        on a Hopper or Blackwell GPU) or one SDPA call per segment length (``attention.VARLEN_SDPA``);
        ``"flash_attention_4"`` runs FA4 in both (``attention.use_attention``).
        """
        halting = DeltaPress.pop_parameters(model_kwargs)
        if press is not None and halting:
            raise ValueError(f"give either press or halting parameters, not both (got press and {sorted(halting)})")
        for key in model_kwargs:  # a misspelt halting parameter would reach the model as an unknown argument
            close = difflib.get_close_matches(key, DeltaPress.parameter_names(), n=1, cutoff=0.8)
            if close:
                raise ValueError(f"unknown argument {key!r}: did you mean the halting parameter {close[0]!r}?")
        press = press if press is not None else DeltaPress(**halting)
        named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if dtype != "auto" and not (isinstance(named, torch.dtype) and named.is_floating_point):
            raise ValueError(f"dtype must be 'auto', a floating torch dtype or its name ('bfloat16'), got {dtype!r}")
        loaded_as = load_implementation(attn_implementation)
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
            raise TypeError(f"name_or_path must be a hub id or a folder (str or Path), got {name_or_path!r}")
        if str(name_or_path).startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"name_or_path {str(name_or_path)!r} is a local path that does not exist")
        if Path(name_or_path).expanduser().is_file():
            raise ValueError(f"name_or_path {str(name_or_path)!r} is a file; give the checkpoint's folder")
        hub_kwargs = {
            key: model_kwargs[key] for key in ("trust_remote_code", "revision", "token") if key in model_kwargs
        }
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        _vision_adapter(config)
        processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
        _check_settings(config, processor, press, min_pixels, max_pixels, allow_urls, cuda_graphs)
        if device_map is None:
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device_map(device_map)
        if cuda_graphs and not torch.cuda.is_available():
            raise ValueError("cuda_graphs=True needs a CUDA GPU; this machine has none")
        if loaded_as is not None:
            model_kwargs["attn_implementation"] = loaded_as
        prefer_expandable_segments()  # before the weights are the first CUDA allocation
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype, device_map=device_map, **model_kwargs
        ).eval()
        use_attention(model, attn_implementation)
        logger.info("loaded %s (%s) on %s", name_or_path, config.model_type, model.device)
        return cls(
            model,
            processor,
            press,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            allow_urls=allow_urls,
            cuda_graphs=cuda_graphs,
        )

    @property
    def press(self) -> DeltaPress:
        """The halting rule applied to every prefill; an assigned press is checked against the model at once."""
        return self._press

    @press.setter
    def press(self, press: DeltaPress) -> None:
        _check_press(press, self.model.config)
        with self._lock:  # not in the middle of another thread's call
            self._press = press

    def generate(
        self,
        image: ImageInput | Sequence | None = None,
        prompt: str | Sequence[str] = "",
        *,
        video: VideoInput | Sequence | None = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_new_tokens: int | None = None,
        **generation_kwargs,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer a prompt about images (or a video), or a batch of prompts.

        Parameters
        ----------
        image : path, PIL image, or a list of them, optional
            The images of one prompt. For a batch (``prompt`` a list), a list with one entry per prompt, each
            ``None``, one image or a list of images.
        prompt : str or list of str
            The user message; a list is a batch, padded on the left.
        video : path or list of PIL frames, optional
            Qwen families only; a file is decoded with PyAV at 2 frames per second (its kept frames' rate goes with
            them: Qwen3-VL's timestamps). Batched like ``image``.
        max_frames : int
            At most this many frames of each video, evenly spaced (as lmms-eval's ``qwen2_vl`` keeps them); a file's
            other frames are never held in memory.
        max_new_tokens : int, optional
            Generation length limit; by default a ``generation_config``'s own, else ``DEFAULT_MAX_NEW_TOKENS``.
        **generation_kwargs
            Passed to ``model.generate``; decoding is greedy unless ``do_sample=True`` is given.

        Returns
        -------
        GenerationResult, or a list of them for a batch.
        """
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        batched = not isinstance(prompt, str)
        prompts = list(prompt) if batched else [prompt]
        if not all(isinstance(text, str) for text in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r:.120}")
        if not prompts or not all(text.strip() for text in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
        check_max_frames(max_frames)
        if video is not None and not self.adapter.video:
            raise ValueError(
                f"video is supported for model types {', '.join(model_types_with('video'))}, "
                f"not {self.model.config.model_type!r}"
            )
        images = _per_prompt("image", image, len(prompts), batched)
        videos = _per_prompt("video", video, len(prompts), batched, frames=True)
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        *({"type": "image", "image": item} for item in sample_images),
                        *({"type": "video", "video": item, "max_frames": max_frames} for item in sample_videos),
                        {"type": "text", "text": text},
                    ],
                }
            ]
            for text, sample_images, sample_videos in zip(prompts, images, videos, strict=True)
        ]
        # Video files given here are decoded by PyAV (only the kept frames are ever held), not by qwen-vl-utils.
        results = self._generate_chats(conversations, None, True, max_new_tokens, generation_kwargs)
        return results if batched else results[0]

    def generate_conversations(
        self,
        conversations: list[list[dict]],
        prompts: list[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        **generation_kwargs,
    ) -> list[GenerationResult]:
        """Generate for chat conversations.

        An image entry's ``image`` is anything :meth:`generate` takes as one image; a video entry's ``video`` is a list
        of frames or a file path (read by qwen-vl-utils, as the family's lmms-eval model reads it: ``qwen2_vl``'s 2
        frames a second, ``qwen3_vl``'s evenly spaced frames of the whole file; ``max_frames`` in the entry keeps that
        many evenly spaced frames). URLs are fetched only with ``allow_urls=True``. ``prompts``
        replaces the chat template's rendering of each conversation (the lmms-eval models use it to follow lmms-eval's
        own prompt format); the conversations then only supply the images.
        """
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(
                f"conversations must hold at least one conversation (a list of them), got {conversations!r:.80}"
            )
        if prompts is not None and len(prompts) != len(conversations):
            raise ValueError(f"prompts must have one entry per conversation ({len(conversations)}), got {len(prompts)}")
        return self._generate_chats(list(conversations), prompts, False, max_new_tokens, generation_kwargs)

    def _generate_chats(
        self,
        conversations: list[list[dict]],
        prompts: list[str] | None,
        decode_video_files: bool,
        max_new_tokens: int | None,
        generation_kwargs: dict,
    ) -> list[GenerationResult]:
        """Everything is checked and every visual loaded before the model runs. A result keeps, for its halting map,
        only what the user gave (paths, their own objects; a fetched URL's bytes), never decoded pixels."""
        max_new_tokens = self._max_new_tokens(max_new_tokens, generation_kwargs.get("generation_config"))
        beams = self._check_generation(generation_kwargs)
        loader = VisualLoader(self.allow_urls, decode_video_files)
        resolved, kept = zip(*(loader.conversation(chat) for chat in conversations), strict=True)
        if not self.adapter.video and any(item == "video" for chat in resolved for item in _item_types(chat)):
            raise ValueError(
                f"video is supported for model types {', '.join(model_types_with('video'))}, "
                f"not {self.model.config.model_type!r}"
            )
        if prompts is None:
            self._check_user_text(resolved)
        else:
            for number, (prompt, chat) in enumerate(zip(prompts, resolved, strict=True)):
                self._check_prompt(f"prompts[{number}]", prompt, chat)
        inputs = self.adapter.processor_inputs(
            self.processor, list(resolved), self.min_pixels, self.max_pixels, prompts=prompts
        )
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        del resolved  # the decoded pixels die here: the processor's tensors are what the model needs
        with self._lock:  # the press is read once: another thread may assign vlm.press only between calls
            results = self._generate(self._press, inputs, beams, max_new_tokens, generation_kwargs)
        for result, conversation, prompt in zip(results, kept, prompts or [None] * len(results), strict=True):
            # The grids are rebuilt from the prompt alone when asked for: nothing is kept from the batch or the model.
            result.grid_source = functools.partial(
                _token_grids,
                self.adapter,
                self.model.config,
                self.processor,
                self.min_pixels,
                self.max_pixels,
                loader,
                conversation,
                prompt,
            )
        return results

    def _check_generation(self, generation_kwargs: dict) -> int:
        """Refuse generation settings DashVLM cannot answer, given as keywords or in a ``generation_config``, before
        any model work; return the number of beams (beam search prefills each prompt once per beam)."""
        config = generation_kwargs.get("generation_config") or self.model.generation_config

        def setting(name: str):
            return generation_kwargs.get(name, getattr(config, name, None))

        refused = {
            name: setting(name)
            for name, default in GENERATION_REFUSED.items()
            if setting(name) is not None and (setting(name) != default or type(setting(name)) is not type(default))
        }
        if refused:
            raise ValueError(
                f"DashVLM returns one answer text per prompt; it does not take {refused} (apply DeltaPress to "
                "model.generate directly for more)"
            )
        if self.fast is not None:  # greedy whatever the checkpoint's own generation_config says; asked for, refused
            asked = generation_kwargs.get("generation_config")
            greedy = {"do_sample": False, "num_beams": 1}
            given = {name: generation_kwargs.get(name, getattr(asked, name, None)) for name in greedy}
            unsupported = {name: value for name, value in given.items() if value not in (None, greedy[name])}
            unsupported |= {name: value for name, value in generation_kwargs.items() if name not in greedy}
            if unsupported:
                raise ValueError(f"cuda_graphs=True decodes greedily; it does not take {unsupported}")
        return setting("num_beams") or 1

    def _check_user_text(self, conversations: list[list[dict]]) -> None:
        self.check_text([text for chat in conversations for text in _texts(chat)])

    def _placeholders(self) -> list[str]:
        """The vision placeholder tokens as text, in the adapter's order (images', then videos')."""
        return self.processor.tokenizer.convert_ids_to_tokens(self.adapter.vision_token_ids(self.model.config))

    def _check_prompt(self, name: str, prompt: object, chat: list[dict]) -> None:
        """A prompt given in place of the chat template's: a non-empty string with one placeholder per image and per
        video of its conversation (the processor expands each), so that no placeholder stands for nothing."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name} must be a non-empty string, got {prompt!r:.80}")
        items = _item_types(chat)
        for mark, kind in zip(self._placeholders(), ("image", "video"), strict=False):
            if prompt.count(mark) != items.count(kind):
                raise ValueError(
                    f"{name} holds {prompt.count(mark)} {mark!r} placeholders for {items.count(kind)} {kind}s of its "
                    "conversation; give one per image and per video"
                )

    def check_text(self, texts: list[str]) -> None:
        """``ValueError`` for a text typed by the user that holds a vision placeholder (``<|image_pad|>``,
        ``<image>``): the model would take it for an image the prompt does not have."""
        marks = self._placeholders()
        for text in texts:
            typed = [mark for mark in marks if mark in text]
            if typed:
                raise ValueError(
                    f"the prompt text {text!r:.120} holds the vision placeholder {typed[0]!r}; placeholders come "
                    "from the image and video arguments, not from typed text"
                )

    def _generate(
        self, press: DeltaPress, inputs, beams: int, max_new_tokens: int, generation_kwargs: dict
    ) -> list[GenerationResult]:
        if self.fast is not None:
            output = self.fast.generate(dict(inputs), press, max_new_tokens)  # greedy: _check_generation saw to it
            return self._results(output.tokens, press.last_stats, output.first_token.milliseconds())
        if "generation_config" not in generation_kwargs:  # a generation_config given decides for itself
            generation_kwargs.setdefault("do_sample", False)
        first_token = FirstTokenTimer(self.model.device)
        generation_kwargs["stopping_criteria"] = [*generation_kwargs.get("stopping_criteria", []), first_token]
        with torch.inference_mode(), press(self.model):
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generation_kwargs)
        stats = press.last_stats[::beams]  # beam search prefills each prompt once per beam, identically
        return self._results(output[:, inputs["input_ids"].shape[1] :], stats, first_token.timer.milliseconds())

    @staticmethod
    def _max_new_tokens(max_new_tokens: object, generation_config: object) -> int:
        """The generation length: given, or the ``generation_config``'s own, or ``DEFAULT_MAX_NEW_TOKENS``."""
        if max_new_tokens is None:
            max_new_tokens = getattr(generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        return int(max_new_tokens)

    def _results(self, new_tokens: torch.Tensor, stats: list[PrefillStats], ttft_ms: float) -> list[GenerationResult]:
        """One result per prompt: its answer text, statistics, the batch's time to first token and its token count."""
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        counts = _generated_counts(new_tokens, self.model.generation_config.eos_token_id)
        return [
            GenerationResult(text.strip(), sample_stats, ttft_ms, count)
            for text, sample_stats, count in zip(texts, stats, counts, strict=True)
        ]

    def score_continuation(
        self, conversation: list[dict], continuation: str, prompt: str | None = None
    ) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after the conversation's prompt, and whether greedy decoding would
        produce it. The continuation's tokens are protected from halting, so their logits are exact."""
        if not isinstance(continuation, str) or not continuation:
            raise ValueError(f"continuation must be a non-empty string, got {continuation!r}")
        conversation, _ = VisualLoader(self.allow_urls, False).conversation(conversation)
        self.check_text([continuation])
        if prompt is None:
            self._check_user_text([conversation])
            prompt = chat_prompts(self.processor, [conversation])[0]
        else:
            self._check_prompt("prompt", prompt, conversation)
        context = self.adapter.processor_inputs(
            self.processor, [conversation], self.min_pixels, self.max_pixels, [prompt]
        )
        inputs = self.adapter.processor_inputs(
            self.processor, [conversation], self.min_pixels, self.max_pixels, [prompt + continuation]
        )
        length = context["input_ids"].shape[1]
        if not torch.equal(inputs["input_ids"][:, :length], context["input_ids"]):
            raise ValueError(f"continuation {continuation!r} changes how the prompt tokenizes; it cannot be scored")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        targets = inputs["input_ids"][:, length:]
        protect = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        protect[:, length:] = True
        with self._lock, torch.inference_mode(), self.press(self.model, protect=protect):
            logits = self.model(**inputs).logits[:, length - 1 : -1].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        return log_probs.sum().item(), bool((logits.argmax(-1) == targets).all())


GENERATION_REFUSED = {  # generation settings whose results DashVLM's one text per prompt cannot carry, and the default
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


@dataclass(frozen=True)
class VisualLoader:
    """Turns the images and videos of a conversation, as the user gave them, into what the processor takes. Every
    visual passes here before it reaches the processor or qwen-vl-utils: URLs are fetched only with ``allow_urls``,
    within ``DOWNLOAD_LIMIT_BYTES`` and ``DOWNLOAD_TIMEOUT_S``; a bad input is refused naming it.

    Parameters
    ----------
    allow_urls : bool
        Whether ``http(s)://`` sources may be fetched.
    decode_video_files : bool
        Decode video files with PyAV (``DashVLM.generate``: only the kept frames are ever held); otherwise a file is
        checked here and read by qwen-vl-utils as the family's lmms-eval model reads it (a file of
        fewer than ``MIN_FILE_FRAMES`` frames, which qwen-vl-utils cannot read, is decoded by PyAV).
    """

    allow_urls: bool
    decode_video_files: bool

    def conversation(self, chat: list[dict]) -> tuple[list[dict], list[dict]]:
        """The conversation with its visuals loaded, and the one to keep for a halting map: the visuals as given,
        except a URL's fetched bytes in place of the URL (a map never fetches again)."""
        if not isinstance(chat, (list, tuple)) or not chat or not all(map(_is_message, chat)):
            raise ValueError(
                "a conversation must be a non-empty list of messages, dicts with a 'role' string and a 'content' "
                f"string or list, got {chat!r:.200}"
            )
        loaded, kept = [], []
        for message in chat:
            content = message["content"]
            if isinstance(content, str):
                if not content.strip():
                    raise ValueError(f"a message has no text and no image or video: {message!r:.200}")
                loaded.append(message)
                kept.append(message)
                continue
            if not any(map(_has_content, content)):
                raise ValueError(f"a message has no text and no image or video: {message!r:.200}")
            items = [self._item(item) for item in content]
            loaded.append({**message, "content": [item for item, _ in items]})
            kept.append({**message, "content": [item for _, item in items]})
        return loaded, kept

    def _item(self, item: dict) -> tuple[dict, dict]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            image, source = self.image(item.get("image"))
            return {**item, "image": image}, {**item, "image": source}
        if kind == "video":
            if "max_frames" in item:
                check_max_frames(item["max_frames"])
            video, source, rate = self.video(item.get("video"), item.get("max_frames", DEFAULT_MAX_FRAMES))
            # the rate of the frames this loader decoded, for qwen-vl-utils' metadata of a frame list: Qwen3-VL's
            # processor writes its timestamps from it
            timing = {} if rate is None else {"sample_fps": rate}
            return {**item, "video": video, **timing}, {**item, "video": source}
        if kind == "text" and isinstance(item.get("text"), str):
            return item, item
        raise ValueError(f"a message's content items must be image, video or text entries, got {item!r:.200}")

    def image(self, source: ImageInput | FileSnapshot) -> tuple[Image.Image, object]:
        """One image as an RGB picture, and what to keep of it."""
        if isinstance(source, Image.Image):
            return _rgb(source, "the PIL image"), source
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return _array_image(source), source
        if isinstance(source, bytes):
            return open_image(source, f"<{len(source)} bytes>"), source
        if isinstance(source, FileSnapshot):
            return open_image(source.unchanged("image"), str(source.path)), source
        if isinstance(source, (str, Path)):
            if is_url(str(source)):
                data = self._fetch("image", str(source))
                return open_image(data, str(source)), data
            snapshot = FileSnapshot.of(_local_file("image", source))
            return open_image(snapshot.path, str(source)), snapshot
        raise TypeError(
            f"image must be a path, URL, bytes, PIL image, numpy array or torch tensor, got {type(source).__name__}"
        )

    def video(
        self, source: VideoInput | bytes | FileSnapshot, max_frames: int
    ) -> tuple[list[Image.Image] | str, object, float | None]:
        """One video as its kept frames (or, for qwen-vl-utils, a checked file path), what to keep of it, and the
        frame rate of the kept frames where this loader decoded them (``None`` for a path or the user's frames)."""
        if isinstance(source, bytes):
            frames, rate = decode_video(io.BytesIO(source), f"<{len(source)} bytes>", max_frames)
            return frames, source, rate
        if isinstance(source, (str, Path)) and is_url(str(source)):
            data = self._fetch("video", str(source))
            frames, rate = decode_video(io.BytesIO(data), str(source), max_frames)
            return frames, data, rate
        if isinstance(source, (str, Path, FileSnapshot)):
            snapshot = source if isinstance(source, FileSnapshot) else FileSnapshot.of(_local_file("video", source))
            path = snapshot.unchanged("video")
            if self.decode_video_files or count_frames(path) < MIN_FILE_FRAMES:
                frames, rate = decode_video(str(path), str(path), max_frames)
                return frames, snapshot, rate
            return str(path), snapshot, None
        if isinstance(source, (list, tuple)):
            if not source:
                raise ValueError("video is an empty list of frames; give at least one frame")
            loaded = [self.image(source[index]) for index in frame_indices(len(source), max_frames)]
            frames = [frame for frame, _ in loaded]
            if len({frame.size for frame in frames}) > 1:
                raise ValueError(
                    f"video frames must all have one size, got {sorted({frame.size for frame in frames})} (width, "
                    "height)"
                )
            return frames, [kept for _, kept in loaded], None  # a file frame as a snapshot, a URL frame as its bytes
        raise TypeError(f"video must be a file path, URL, bytes or a list of frames, got {type(source).__name__}")

    def _fetch(self, parameter: str, url: str) -> bytes:
        if not self.allow_urls:
            raise ValueError(f"{parameter} {url!r} is a URL; pass allow_urls=True to fetch it")
        return fetch(url, parameter)


@dataclass(frozen=True)
class FileSnapshot:
    """A local file as a result keeps it for its halting map: its path, and its size and modification time when the
    model read it, so that a map is never drawn over a file that changed since."""

    path: Path
    size: int
    modified_ns: int

    @classmethod
    def of(cls, path: Path) -> FileSnapshot:
        path = path.resolve()  # the same file after a change of working folder
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)

    def unchanged(self, parameter: str) -> Path:
        """The path, after checking that the file is still the one that was read; ``ValueError`` otherwise."""
        try:
            now = FileSnapshot.of(self.path)
        except OSError as error:
            raise ValueError(f"{parameter} file {str(self.path)!r} is gone since it was read ({error})") from error
        if now != self:
            raise ValueError(
                f"{parameter} file {str(self.path)!r} changed since the model read it; its halting map would not show "
                "what the model saw"
            )
        return self.path


def _is_frame(frame: object) -> bool:
    """A video frame: a PIL image, or an array of one image (2 or 3 dimensions)."""
    return isinstance(frame, Image.Image) or isinstance(frame, (np.ndarray, torch.Tensor)) and frame.ndim in (2, 3)


def _is_message(message: object) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), (str, list))
    )


def _item_types(chat: list[dict]) -> list[str]:
    """The type of every content item of a conversation's messages (text, image, video), in order."""
    return [item["type"] for message in chat if isinstance(message["content"], list) for item in message["content"]]


def _has_content(item: object) -> bool:
    """Whether a message's content item is an image, a video or a non-blank text."""
    if not isinstance(item, dict):
        return False
    return item.get("type") in ("image", "video") or isinstance(item.get("text"), str) and bool(item["text"].strip())


def is_url(text: str) -> bool:
    """Whether an image or video source is a URL, fetched only with ``allow_urls=True``."""
    return text.startswith(("http://", "https://"))


def local_path(source: str | Path) -> Path:
    """The file an image or video source that is not a URL names (``file://`` prefix and ``~`` allowed)."""
    return Path(str(source).removeprefix("file://")).expanduser()


def _local_file(parameter: str, source: str | Path) -> Path:
    path = local_path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{parameter} file not found: {path}")
    return path


def fetch(url: str, parameter: str) -> bytes:
    """The bytes at ``url``: at most ``DOWNLOAD_LIMIT_BYTES``, arriving within ``DOWNLOAD_TIMEOUT_S`` seconds in all
    (read piece by piece as it comes, so a slow sender is cut off; a silent one after ``DOWNLOAD_TIMEOUT_S`` without
    data), without following redirects (consent was given for this URL, not wherever it points); ``ValueError``
    naming ``parameter`` and the URL otherwise."""
    import requests
    import urllib3

    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    data = bytearray()
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S, allow_redirects=False) as response:
            if response.is_redirect:
                raise ValueError(
                    f"{parameter} {url!r} redirects to {response.headers.get('Location')!r}; redirects are not "
                    "followed: give the URL it points to, if you mean it"
                )
            response.raise_for_status()
            declared = int(response.headers.get("Content-Length") or 0)
            while declared <= DOWNLOAD_LIMIT_BYTES and len(data) <= DOWNLOAD_LIMIT_BYTES:
                piece = response.raw.read1(2**16, decode_content=True)
                if not piece:
                    break
                data += piece
                if time.monotonic() > deadline:
                    raise ValueError(
                        f"{parameter} {url!r} did not arrive within {DOWNLOAD_TIMEOUT_S:g} s (DOWNLOAD_TIMEOUT_S)"
                    )
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
        raise ValueError(f"{parameter} {url!r} could not be fetched: {error}") from error
    if declared > DOWNLOAD_LIMIT_BYTES or len(data) > DOWNLOAD_LIMIT_BYTES:
        raise ValueError(
            f"{parameter} {url!r} is larger than {DOWNLOAD_LIMIT_BYTES} bytes, the download limit "
            "(dash_vlm.vlm.DOWNLOAD_LIMIT_BYTES)"
        )
    return bytes(data)


def _texts(chat: list[dict]) -> list[str]:
    """The text of every message of a conversation."""
    return [
        text
        for message in chat
        for text in (
            [message["content"]]
            if isinstance(message["content"], str)
            else [item["text"] for item in message["content"] if item.get("type") == "text"]
        )
    ]


def _token_grids(
    adapter: ModelAdapter,
    config: PretrainedConfig,
    processor: ProcessorMixin,
    min_pixels: int | None,
    max_pixels: int | None,
    loader: VisualLoader,
    conversation: list[dict],
    prompt: str | None,
) -> list[TokenGrid]:
    """The token grids of one conversation's images, from its model inputs made alone (so unpadded), its visuals
    loaded again from what the result kept."""
    loaded, _ = loader.conversation(conversation)
    inputs = adapter.processor_inputs(processor, [loaded], min_pixels, max_pixels, None if prompt is None else [prompt])
    return adapter.token_grids(config, processor, dict(inputs))[0]


def _per_prompt(parameter: str, value, prompts: int, batched: bool, frames: bool = False) -> list[list]:
    """The images (or videos) of each prompt as a list of lists; several are given as a list or tuple."""

    def as_list(entry) -> list:
        if entry is None:
            return []
        if isinstance(entry, SINGLE_IMAGES):
            return [entry]
        if not isinstance(entry, (list, tuple)):
            raise TypeError(
                f"{parameter} must be one {parameter}, or a list or tuple of them, got {type(entry).__name__}"
            )
        if frames and entry and all(map(_is_frame, entry)):
            return [entry]  # one video given as its frames
        return list(entry)

    if not batched:
        return [as_list(value)]
    if value is None:
        return [[] for _ in range(prompts)]
    if not isinstance(value, (list, tuple)) or len(value) != prompts:
        raise ValueError(
            f"{parameter} must be a list with one entry per prompt ({prompts} prompts) when prompt is a list, "
            f"got {value!r:.200}"
        )
    return [as_list(entry) for entry in value]


def open_image(data: bytes | Path, name: str) -> Image.Image:
    """An image file (its bytes, or its path: then only what PIL needs is read) as the RGB picture a viewer shows;
    ``ValueError`` naming ``name`` if PIL cannot read it or it exceeds PIL's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return _rgb(image, name)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {name!r} is not an image file PIL can read ({error})") from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {name!r} is larger than PIL allows (Image.MAX_IMAGE_PIXELS): {error}") from error


def _rgb(image: Image.Image, name: str) -> Image.Image:
    """An RGB image as a viewer shows it: EXIF orientation applied, 16-bit and float pixels scaled to 8 bits."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {name} is empty ({image.width}x{image.height} pixels)")
    image = ImageOps.exif_transpose(image)
    # 16-bit PNG and TIFF: convert("RGB") would clip to white. Integer arithmetic: no float copy of a large image.
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image) // 257).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image)
        image = Image.fromarray((pixels * 255 if pixels.max() <= 1 else pixels).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _array_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    """An image from an array: ``[height, width]``, ``[height, width, channels]`` or ``[channels, height, width]``
    with 1, 3 or 4 channels; uint8 values, or floats in [0, 1]."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        pixels = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
    else:
        pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = pixels.transpose(1, 2, 0)  # channels first
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"image array must be [height, width], [height, width, channels] or [channels, height, width] with 1, "
            f"3 or 4 channels, got shape {tuple(pixels.shape)}"
        )
    if pixels.dtype != np.uint8:
        if np.issubdtype(pixels.dtype, np.floating) and np.isnan(pixels).any():
            raise ValueError("image array holds NaN values; give uint8 values or floats in [0, 1]")
        if not np.issubdtype(pixels.dtype, np.floating) or pixels.size and not 0 <= pixels.min() <= pixels.max() <= 1:
            raise ValueError(f"image array must hold uint8 values or floats in [0, 1], got {pixels.dtype}")
        pixels = (pixels * 255).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return _rgb(Image.fromarray(pixels), f"array of shape {tuple(array.shape)}")


def decode_video(file: str | io.BytesIO, name: str, max_frames: int) -> tuple[list[Image.Image], float]:
    """The frames of a video file at ``VIDEO_FPS``, at most ``max_frames`` of them evenly spaced (the packets are
    counted first, so that only the kept frames are ever converted and held), and the rate of the kept frames: the
    sampled rate stretched by the spacing ``max_frames`` adds."""
    import av

    try:
        with av.open(file) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or VIDEO_FPS)
            step = max(1, round(rate / VIDEO_FPS))
            sampled = range(0, sum(1 for packet in container.demux(stream) if packet.size), step)
            kept = sorted({sampled[index] for index in frame_indices(len(sampled), max_frames)} if len(sampled) else ())
            container.seek(0)
            wanted = set(kept)
            frames = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in wanted]
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"video {name!r} is not a video file PyAV can decode ({error})") from error
    if not frames:
        raise ValueError(f"video {name!r} has no frames")
    spacing = (kept[-1] - kept[0]) / (len(kept) - 1) if len(kept) > 1 else step  # source frames between kept ones
    return frames, rate / spacing


def count_frames(path: Path) -> int:
    """The frames of a video file (its packets with data, no frame decoded), counted up to ``MIN_FILE_FRAMES``;
    ``ValueError`` naming a file PyAV cannot read, or one without frames."""
    import av

    try:
        with av.open(str(path)) as container:
            packets = (packet for packet in container.demux(container.streams.video[0]) if packet.size)
            frames = sum(1 for _ in itertools.islice(packets, MIN_FILE_FRAMES))  # no more than the test needs
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"video {str(path)!r} is not a video file PyAV can decode ({error})") from error
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    return frames


def _vision_adapter(config: PretrainedConfig) -> ModelAdapter:
    adapter = adapter_for(config)
    if not adapter.is_vision_language:
        raise ValueError(
            f"DashVLM needs a vision-language model; {config.model_type!r} is text-only "
            "(apply DeltaPress to text LLMs directly)"
        )
    return adapter


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for from_pretrained


def gpu_index(device: object) -> int | None:
    """The GPU a device names ("cuda", "cuda:N", a torch.device of those, or a GPU index), or ``None`` for another."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device if device >= 0 else None
    named = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    return None if named is None else int(named[1] or 0)


def _check_device_map(device_map: object) -> None:
    """``ValueError`` naming ``device_map`` unless it is a device (cpu, cuda, cuda:N, a GPU index, a torch.device),
    one of accelerate's map names, or a dict of module names to devices (or "disk"), and unless the GPUs it asks for
    are there; before any weights load."""
    if isinstance(device_map, dict):
        targets = list(device_map.values())
    elif isinstance(device_map, str) and device_map in DEVICE_MAP_NAMES:
        return
    else:
        targets = [device_map]
    for target in targets:
        text = str(target)
        is_gpu = gpu_index(target) is not None
        if not (is_gpu or text == "cpu" or (text == "disk" and isinstance(device_map, dict))):
            raise ValueError(
                f"device_map must be cpu, cuda, cuda:N, a GPU index, one of {DEVICE_MAP_NAMES} or a dict of module "
                f"names to those (or 'disk'), got {device_map!r}"
            )
        if is_gpu and not torch.cuda.is_available():
            raise ValueError(f"device_map={device_map!r} asks for a GPU, but torch sees none; use device_map='cpu'")


def _check_press(press: object, config: PretrainedConfig) -> None:
    if not isinstance(press, DeltaPress):
        raise ValueError(
            f"press must be a DeltaPress, got {type(press).__name__} {press!r:.80} (other kvpress presses apply to "
            "model.generate directly)"
        )
    press.halting_config().check_model(config)


def _check_settings(
    config: PretrainedConfig,
    processor: ProcessorMixin,
    press: object,
    min_pixels: object,
    max_pixels: object,
    allow_urls: object,
    cuda_graphs: object,
) -> ModelAdapter:
    """Every ``DashVLM`` setting checked against the model's config and processor, before any weights load; the
    family's adapter."""
    adapter = _vision_adapter(config)
    _check_press(press, config)
    for name, value in (("allow_urls", allow_urls), ("cuda_graphs", cuda_graphs)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if cuda_graphs and adapter.recurrent_layers(config):
        raise ValueError(
            f"cuda_graphs=True does not support {config.model_type!r}: its hybrid decoder's recurrent layers would run "
            "the fast path's right padding and trailing filler through their states (DESIGN.md section 11); use "
            "cuda_graphs=False"
        )
    if (min_pixels is not None or max_pixels is not None) and not adapter.pixel_limits:
        raise ValueError(
            f"min_pixels / max_pixels apply to model types {', '.join(model_types_with('pixel_limits'))}, "
            f"not {config.model_type!r}"
        )
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if adapter.pixel_limits:
        default_min, default_max = adapter.default_pixel_limits(processor)
        low = default_min if min_pixels is None else min_pixels
        high = default_max if max_pixels is None else max_pixels
        if low > high:
            default = " (the processor's default)"
            raise ValueError(
                f"min_pixels {low}{default * (min_pixels is None)} exceeds max_pixels {high}"
                f"{default * (max_pixels is None)}: no image size fits; give min_pixels <= max_pixels"
            )
    return adapter
