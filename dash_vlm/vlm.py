"""DashVLM: a supported vision-language model, its processor and a DeltaPress behind one call on image + prompt."""

from __future__ import annotations

import functools
import io
import logging
import threading
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
from dash_vlm.graphs import StaticDecoder, after_first_end
from dash_vlm.maps import halting_maps
from dash_vlm.models import (
    DEFAULT_MAX_FRAMES,
    ModelAdapter,
    TokenGrid,
    adapter_for,
    chat_prompts,
    frame_indices,
    model_types_with,
)
from dash_vlm.press import DeltaPress, PrefillStats, Timer

logger = logging.getLogger(__name__)

ImageInput = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor
SINGLE_IMAGES = (str, Path, bytes, Image.Image, np.ndarray, torch.Tensor)  # what one image may be
VideoInput = str | Path | Sequence[Image.Image]
VIDEO_FPS = 2.0  # frames sampled per second of a video file, the qwen-vl-utils default


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
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        self.adapter = _vision_adapter(model.config)
        _check_pixel_limits(self.adapter, model.config.model_type, min_pixels, max_pixels)
        self.model, self.processor = model, processor
        self.press = press if press is not None else DeltaPress()
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
        press = press if press is not None else DeltaPress(**halting)
        loaded_as = load_implementation(attn_implementation)
        if str(name_or_path).startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"name_or_path {str(name_or_path)!r} is a local path that does not exist")
        hub_kwargs = {
            key: model_kwargs[key] for key in ("trust_remote_code", "revision", "token") if key in model_kwargs
        }
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        adapter = _vision_adapter(config)
        _check_pixel_limits(adapter, config.model_type, min_pixels, max_pixels)
        if device_map is None:
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device_map(device_map)
        if cuda_graphs is True and not torch.cuda.is_available():
            raise ValueError("cuda_graphs=True needs a CUDA GPU; this machine has none")
        if loaded_as is not None:
            model_kwargs["attn_implementation"] = loaded_as
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype, device_map=device_map, **model_kwargs
        ).eval()
        use_attention(model, attn_implementation)
        processor = AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
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

    def generate(
        self,
        image: ImageInput | Sequence | None = None,
        prompt: str | Sequence[str] = "",
        *,
        video: VideoInput | Sequence | None = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_new_tokens: int = 128,
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
            Qwen2-VL family only; a file is decoded with PyAV at 2 frames per second. Batched like ``image``.
        max_frames : int
            At most this many frames of each video, evenly spaced (as lmms-eval's ``qwen2_vl`` keeps them); a file's
            other frames are never held in memory.
        max_new_tokens : int
            Generation length limit.
        **generation_kwargs
            Passed to ``model.generate``; decoding is greedy unless ``do_sample=True`` is given.

        Returns
        -------
        GenerationResult, or a list of them for a batch.
        """
        if not isinstance(prompt, (str, Sequence)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        batched = not isinstance(prompt, str)
        prompts = list(prompt) if batched else [prompt]
        if not prompts or not all(isinstance(text, str) and text.strip() for text in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        frame_indices(1, max_frames)  # validates max_frames
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
                        *({"type": "image", "image": self._load_image(item)} for item in sample_images),
                        *({"type": "video", "video": self._load_video(item, max_frames)} for item in sample_videos),
                        {"type": "text", "text": text},
                    ],
                }
            ]
            for text, sample_images, sample_videos in zip(prompts, images, videos, strict=True)
        ]
        results = self.generate_conversations(conversations, max_new_tokens=max_new_tokens, **generation_kwargs)
        return results if batched else results[0]

    def generate_conversations(
        self,
        conversations: list[list[dict]],
        prompts: list[str] | None = None,
        *,
        max_new_tokens: int = 128,
        **generation_kwargs,
    ) -> list[GenerationResult]:
        """Generate for chat conversations whose images and video frames are loaded ``PIL`` images.

        ``prompts`` replaces the chat template's rendering of each conversation (the lmms-eval models use it to
        follow lmms-eval's own prompt format); the conversations then only supply the images.
        """
        if not conversations:
            raise ValueError("conversations must hold at least one conversation, got none")
        if generation_kwargs.get("num_return_sequences", 1) != 1:
            raise NotImplementedError("num_return_sequences must be 1: DashVLM returns one answer per prompt")
        if prompts is not None and len(prompts) != len(conversations):
            raise ValueError(f"prompts must have one entry per conversation ({len(conversations)}), got {len(prompts)}")
        inputs = self.adapter.processor_inputs(
            self.processor, conversations, self.min_pixels, self.max_pixels, prompts=prompts
        )
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        with self._lock:
            results = self._generate(inputs, max_new_tokens, generation_kwargs)
        for result, conversation, prompt in zip(results, conversations, prompts or [None] * len(results), strict=True):
            # The grids are rebuilt from the prompt alone when asked for: nothing is kept from the batch or the model.
            result.grid_source = functools.partial(
                _token_grids,
                self.adapter,
                self.model.config,
                self.processor,
                self.min_pixels,
                self.max_pixels,
                conversation,
                prompt,
            )
        return results

    def _generate(self, inputs, max_new_tokens: int, generation_kwargs: dict) -> list[GenerationResult]:
        if self.fast is not None:
            return self._generate_fast(inputs, max_new_tokens, generation_kwargs)
        return self._generate_eager(inputs, max_new_tokens, generation_kwargs)

    def _generate_eager(self, inputs, max_new_tokens: int, generation_kwargs: dict) -> list[GenerationResult]:
        generation_kwargs.setdefault("do_sample", False)
        first_token = FirstTokenTimer(self.model.device)
        generation_kwargs["stopping_criteria"] = [*generation_kwargs.get("stopping_criteria", []), first_token]
        with torch.inference_mode(), self.press(self.model):
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generation_kwargs)
        beams = generation_kwargs.get("num_beams") or self.model.generation_config.num_beams or 1
        stats = self.press.last_stats[::beams]  # beam search prefills each prompt once per beam, identically
        return self._results(output[:, inputs["input_ids"].shape[1] :], stats, first_token.timer.milliseconds())

    def _generate_fast(self, inputs, max_new_tokens: int, generation_kwargs: dict) -> list[GenerationResult]:
        """Greedy generation on the fast path; only greedy settings are accepted."""
        greedy = {"do_sample": False, "num_beams": 1}
        unsupported = {key: value for key, value in generation_kwargs.items() if greedy.get(key, object()) != value}
        if unsupported:
            raise ValueError(f"cuda_graphs=True decodes greedily; it does not take {unsupported}")
        output = self.fast.generate(dict(inputs), self.press, max_new_tokens)
        return self._results(output.tokens, self.press.last_stats, output.first_token.milliseconds())

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
        prompt = prompt if prompt is not None else chat_prompts(self.processor, [conversation])[0]
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

    def _load_image(self, image: ImageInput) -> Image.Image:
        if isinstance(image, Image.Image):
            return _rgb(image, "the PIL image")
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return _array_image(image)
        if isinstance(image, bytes):
            return _open_image(image, f"<{len(image)} bytes>")
        if isinstance(image, (str, Path)):
            return _open_image(self._read_file("image", image), str(image))
        raise TypeError(
            f"image must be a path, URL, bytes, PIL image, numpy array or torch tensor, got {type(image).__name__}"
        )

    def _load_video(self, video: VideoInput, max_frames: int) -> list[Image.Image]:
        if isinstance(video, (str, Path)):
            return _decode_video(self._read_file("video", video), str(video), max_frames)
        return [self._load_image(video[index]) for index in frame_indices(len(video), max_frames)]

    def _read_file(self, parameter: str, source: str | Path) -> bytes:
        text = str(source)
        if text.startswith(("http://", "https://")):
            if not self.allow_urls:
                raise ValueError(f"{parameter} {text!r} is a URL; pass allow_urls=True to fetch it")
            import requests

            response = requests.get(text, timeout=60)
            response.raise_for_status()
            return response.content
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{parameter} file not found: {path}")
        return path.read_bytes()


def _token_grids(
    adapter: ModelAdapter,
    config: PretrainedConfig,
    processor: ProcessorMixin,
    min_pixels: int | None,
    max_pixels: int | None,
    conversation: list[dict],
    prompt: str | None,
) -> list[TokenGrid]:
    """The token grids of one conversation's images, from its model inputs made alone (so unpadded)."""
    inputs = adapter.processor_inputs(
        processor, [conversation], min_pixels, max_pixels, None if prompt is None else [prompt]
    )
    return adapter.token_grids(config, processor, dict(inputs))[0]


def _per_prompt(parameter: str, value, prompts: int, batched: bool, frames: bool = False) -> list[list]:
    """The images (or videos) of each prompt as a list of lists."""

    def as_list(entry) -> list:
        if entry is None:
            return []
        is_single = isinstance(entry, SINGLE_IMAGES)
        if frames and not is_single and all(isinstance(frame, Image.Image) for frame in entry):
            return [entry]  # one video given as its frames
        return [entry] if is_single else list(entry)

    if not batched:
        return [as_list(value)]
    if value is None:
        return [[] for _ in range(prompts)]
    if isinstance(value, SINGLE_IMAGES) or len(value) != prompts:
        raise ValueError(
            f"{parameter} must be a list with one entry per prompt ({prompts} prompts) when prompt is a list, "
            f"got {value!r:.200}"
        )
    return [as_list(entry) for entry in value]


def _open_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _rgb(image, name)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image {name!r} is not an image file PIL can read ({error})") from error


def _rgb(image: Image.Image, name: str) -> Image.Image:
    """An RGB image as a viewer shows it: EXIF orientation applied, 16-bit and float pixels scaled to 8 bits."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {name} is empty ({image.width}x{image.height} pixels)")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG and TIFF: convert("RGB") would clip to white
        pixels = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((pixels * 255 if pixels.max() <= 1 else pixels).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _array_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    """An image from an array: ``[height, width]``, ``[height, width, channels]`` or ``[channels, height, width]``
    with 1, 3 or 4 channels; uint8 values, or floats in [0, 1]."""
    pixels = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4) and pixels.shape[0] in (1, 3, 4):
        pixels = pixels.transpose(1, 2, 0)  # channels first
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"image array must be [height, width], [height, width, channels] or [channels, height, width] with 1, "
            f"3 or 4 channels, got shape {tuple(pixels.shape)}"
        )
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.floating) or pixels.size and not 0 <= pixels.min() <= pixels.max() <= 1:
            raise ValueError(f"image array must hold uint8 values or floats in [0, 1], got {pixels.dtype}")
        pixels = (pixels * 255).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return _rgb(Image.fromarray(pixels), f"array of shape {tuple(array.shape)}")


def _decode_video(data: bytes, name: str, max_frames: int) -> list[Image.Image]:
    """The frames of a video file at ``VIDEO_FPS``, at most ``max_frames`` of them evenly spaced: the packets are
    counted first, so that only the kept frames are ever converted and held."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            step = max(1, round(float(stream.average_rate or VIDEO_FPS) / VIDEO_FPS))
            sampled = range(0, sum(1 for packet in container.demux(stream) if packet.size), step)
            kept = {sampled[index] for index in frame_indices(len(sampled), max_frames)} if len(sampled) else set()
            container.seek(0)
            frames = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in kept]
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"video {name!r} is not a video file PyAV can decode ({error})") from error
    if not frames:
        raise ValueError(f"video {name!r} has no frames")
    return frames


def _vision_adapter(config: PretrainedConfig) -> ModelAdapter:
    adapter = adapter_for(config)
    if not adapter.is_vision_language:
        raise ValueError(
            f"DashVLM needs a vision-language model; {config.model_type!r} is text-only "
            "(apply DeltaPress to text LLMs directly)"
        )
    return adapter


def _check_device_map(device_map: str | dict) -> None:
    """``ValueError`` naming ``device_map`` when it asks for a GPU that torch cannot see, before any weights load."""
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    wants_gpu = any(str(target).startswith("cuda") or isinstance(target, int) for target in targets)
    if wants_gpu and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for a GPU, but torch sees none; use device_map='cpu'")


def _check_pixel_limits(adapter: ModelAdapter, model_type: str, min_pixels: int | None, max_pixels: int | None):
    if (min_pixels is not None or max_pixels is not None) and not adapter.pixel_limits:
        raise ValueError(
            f"min_pixels / max_pixels apply to model types {', '.join(model_types_with('pixel_limits'))}, "
            f"not {model_type!r}"
        )
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
