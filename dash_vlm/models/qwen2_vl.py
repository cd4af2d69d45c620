"""Qwen2-VL and Qwen2.5-VL: image and video placeholders are eligible; M-RoPE positions pass through unchanged.

Images and videos go through ``qwen-vl-utils`` (the resizing the Qwen checkpoints were trained with) before the
processor, under the same pixel budget. The family's tiny test models, its speed presets (``qwen2-vl-2b``,
``qwen2-vl-7b``, ``qwen2.5-vl-7b``, ``tiny``) and its lmms-eval prompt rule live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from qwen_vl_utils import vision_process as qwen_vision
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel, apply_multimodal_rotary_pos_emb

from dash_vlm.models import (
    DEFAULT_MAX_FRAMES,
    ModelAdapter,
    TokenGrid,
    frame_indices,
    in_prompt_order,
    item_positions,
    register_adapter,
    rgb_pixels,
)
from dash_vlm.models.presets import Preset
from dash_vlm.models.tiny import (
    IMAGE_TOKEN,
    TEXT,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    left_pad_batch,
    special_token_ids,
    word_tokenizer,
)


def _grid_thw(tower_args: tuple, tower_kwargs: dict) -> torch.Tensor:
    """The ``grid_thw`` a vision tower is called with (on the host on the fast path: ``dash_vlm.tower``)."""
    return tower_kwargs.get("grid_thw", tower_args[1] if len(tower_args) > 1 else None)


def _pixels_device(tower_args: tuple, tower_kwargs: dict) -> torch.device:
    """Where the tower's pixels, hence its work, are."""
    return (tower_args[0] if tower_args else tower_kwargs["hidden_states"]).device


def segment_boundaries(grid: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` of a Qwen tower's full-attention segments (each temporal patch of each item), as the tower
    computes them, from a grid on the host."""
    lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def rotary_cos_sin(rotary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen tower's rotary angles as the ``(cos, sin)`` its blocks take."""
    angles = torch.cat((rotary, rotary), dim=-1)
    return angles.cos(), angles.sin()


def check_frame_size(size: tuple[int, int], patch_size: int, limits: dict) -> None:
    """qwen-vl-utils resizes each frame of a frame-list video on a grid twice the merged patch (``fetch_video`` hands
    ``fetch_image`` its factor, which doubles it again), so a frame far thinner than wide can round a side to 0
    pixels, which PIL refuses deep inside; refuse it here, naming the size."""
    width, height = size
    factor = 2 * patch_size * qwen_vision.SPATIAL_MERGE_SIZE
    resized = qwen_vision.smart_resize(height, width, factor=factor, **limits)
    if min(resized) == 0:
        raise ValueError(
            f"video frames of {width}x{height} px are too thin for qwen-vl-utils, which would resize them to "
            f"{resized[1]}x{resized[0]} px; give frames at least {factor} px on each side after scaling to max_pixels "
            f"({limits['max_pixels']}), or the frames as images"
        )


MODEL_CLASSES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}
BASE_MODEL_CLASSES = {"qwen2_vl": Qwen2VLModel, "qwen2_5_vl": Qwen2_5_VLModel}


@dataclass(frozen=True)
class QwenVLAdapter(ModelAdapter):
    """The Qwen families' layout: image and video placeholders, a pixel budget, a tower (``visual.blocks``) that packs
    its images into one sequence and can halt."""

    vision_token_attributes: tuple[str, ...] = ("image_token_id", "video_token_id")
    video: bool = True
    pixel_limits: bool = True
    vision_tower_attribute: str | None = "visual"
    vision_blocks_path: str | None = "blocks"
    halts_in_vision_tower: bool = True
    vision_packs_segments: bool = True
    vision_grid_keys: tuple[str, ...] = ("image_grid_thw", "video_grid_thw")

    def base_model_class(self, model_type: str) -> type:
        """The model class whose ``get_rope_index`` gives the M-RoPE positions of ``model_type``."""
        return BASE_MODEL_CLASSES[model_type]

    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        """Images and videos through qwen-vl-utils under the pixel budget. A video is a frame list or a file path (read
        by qwen-vl-utils at 2 frames a second); ``max_frames`` in its entry keeps that many evenly spaced frames of
        what was read, as lmms-eval's ``qwen2_vl`` does (``models.frame_indices``)."""
        limits = self.vision_limits(processor, min_pixels, max_pixels)
        caps = [item.get("max_frames") for item in items if item["type"] == "video"]
        content = [{key: value for key, value in item.items() if key != "max_frames"} | limits for item in items]
        images, videos, video_kwargs = self.read_vision(processor, content, limits)
        if not videos:
            return {"images": images, "videos": None, **limits}
        first_frames = len(videos[0])
        for number, (video, cap) in enumerate(zip(videos, caps, strict=True)):
            if cap is not None and len(video) > cap:
                videos[number] = video[torch.as_tensor(frame_indices(len(video), cap))]
        # Frames were sampled already; the processor takes one rate, the first video's after its cap (Qwen2.5-VL's
        # temporal positions read it; a batch mixing videos of different lengths under a cap is off there).
        fps = video_kwargs["fps"][0] * len(videos[0]) / first_frames
        return {"images": images, "videos": videos, **limits, "do_sample_frames": False, "fps": fps}

    def vision_limits(self, processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> dict:
        """The pixel budget of every image and frame: the one given, else the processor's."""
        default_min, default_max = self.default_pixel_limits(processor)
        return {
            "min_pixels": default_min if min_pixels is None else min_pixels,
            "max_pixels": default_max if max_pixels is None else max_pixels,
        }

    def read_vision(self, processor: ProcessorMixin, content: list[dict], limits: dict, **options) -> tuple:
        """qwen-vl-utils' ``process_vision_info`` over the entries ``content`` (``options`` are its own): frame lists
        are checked first, and a file it cannot read is a ``ValueError`` naming it."""
        for item in content:
            if item["type"] == "video" and not isinstance(item["video"], str):
                check_frame_size(item["video"][0].size, processor.image_processor.patch_size, limits)
        try:
            return process_vision_info(
                [[{"role": "user", "content": content}]],
                return_video_kwargs=True,
                image_patch_size=processor.image_processor.patch_size,
                **options,
            )
        except AttributeError as error:  # decord failed, and its torchvision fallback is gone from torchvision
            if "read_video" not in str(error):
                raise
            files = [item["video"] for item in content if item["type"] == "video" and isinstance(item["video"], str)]
            raise ValueError(
                f"qwen-vl-utils could not read the video file(s) {files} with decord (its log says why: e.g. more "
                "frames asked for than the file has), and has no other reader with this torchvision"
            ) from error

    def per_token_modules(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers' MLPs and the tower blocks' MLPs."""
        return [*super().per_token_modules(model), *(block.mlp for block in self.vision_blocks(model))]

    def segment_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The tower blocks' attention: within each image, frame group or window of ``cu_seqlens`` (and their rotary
        embedding of every patch in float32, the tower's largest allocation on a long video)."""
        return [self.vision_attention(block) for block in self.vision_blocks(model)]

    def vision_depth(self, config) -> int:
        return config.vision_config.depth

    def default_pixel_limits(self, processor: ProcessorMixin) -> tuple[int, int]:
        size = processor.image_processor.size
        return size["shortest_edge"], size["longest_edge"]

    def vision_segments(self, tower_args: tuple, tower_kwargs: dict) -> tuple[list[int], torch.Tensor]:
        """One segment per temporal patch of each image or video: the full-attention segments of the tower."""
        grid = _grid_thw(tower_args, tower_kwargs)
        rows = grid.tolist()  # the tower reads its grid on the host as well; free for a grid on the host
        lengths = [height * width for frames, height, width in rows for _ in range(frames)]
        on_device = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0], output_size=len(lengths))
        return lengths, on_device.to(_pixels_device(tower_args, tower_kwargs), non_blocking=True)  # no stream sync

    def rotate(self, attention: nn.Module, states: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
        cos, sin = position_embeddings
        sections = attention.config.rope_parameters["mrope_section"]
        return apply_multimodal_rotary_pos_emb(states, states, cos, sin, sections)[0]

    def vision_patches_per_token(self, config) -> int:
        return config.vision_config.spatial_merge_size**2

    def vision_patch_order(self, tower: nn.Module, tower_args: tuple, tower_kwargs: dict) -> torch.Tensor | None:
        """Qwen2.5-VL's tower runs its merge units window by window (``get_window_index``); Qwen2-VL's in order."""
        if not hasattr(tower, "get_window_index"):
            return None
        grid = _grid_thw(tower_args, tower_kwargs)
        window_index, _ = tower.get_window_index(grid)
        unit = tower.spatial_merge_unit
        order = (window_index[:, None] * unit + torch.arange(unit, device=window_index.device)).flatten()
        return order.to(_pixels_device(tower_args, tower_kwargs), non_blocking=True)

    def vision_tables(self, tower: nn.Module, grid: tuple[tuple[int, ...], ...]) -> dict:
        """The rotary tables (``cos`` and ``sin``, in the tower's order), the segments of its full-attention blocks
        and, for Qwen2.5-VL, its window order, the window segments and the order back, all from the tower's own
        helpers given the grid on the host (they then read nothing back from the device)."""
        host = torch.tensor(grid)
        device = next(tower.parameters()).device
        rotary = tower.rot_pos_emb(host).to(device)
        tables = {"segments": segment_boundaries(host).to(device)}
        if hasattr(tower, "get_window_index"):
            window_index, window_boundaries = tower.get_window_index(host)
            unit = tower.spatial_merge_unit
            rotary = rotary.reshape(-1, unit, rotary.shape[-1])[window_index.to(device)].reshape(rotary.shape)
            tables |= {
                "window_index": window_index.to(device),
                "window_order_back": torch.argsort(window_index).to(device),
                "window_segments": torch.unique_consecutive(torch.tensor(window_boundaries, dtype=torch.int32)).to(
                    device
                ),
            }
        return tables | {"position_embeddings": rotary_cos_sin(rotary)}

    def vision_forward(self, tower: nn.Module, pixels: torch.Tensor, tables: dict) -> BaseModelOutputWithPooling:
        """Qwen2-VL's and Qwen2.5-VL's tower forward on the tables (Qwen2.5-VL: merge units in window order, the
        windowed blocks on the window segments, the merged tokens put back in order)."""
        hidden = tower.patch_embed(pixels)
        window = tables.get("window_index")
        if window is not None:
            unit = tower.spatial_merge_unit
            hidden = hidden.reshape(-1, unit, hidden.shape[-1])[window].reshape(hidden.shape)
        full_blocks = getattr(tower, "fullatt_block_indexes", None)
        for index, block in enumerate(tower.blocks):
            windowed = window is not None and index not in full_blocks
            segments = tables["window_segments"] if windowed else tables["segments"]
            hidden = block(hidden, cu_seqlens=segments, position_embeddings=tables["position_embeddings"])
        merged = tower.merger(hidden)
        if window is not None:
            merged = merged[tables["window_order_back"]]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)

    def _vision_items(self, config, inputs: dict):
        """Per image, then per video: its sample, its token positions ``[frame groups, rows, cols]``, the key of its
        pixels, its first patch row there and its patch grid (frame groups, height, width)."""
        merge = config.vision_config.spatial_merge_size
        kinds = (
            (config.image_token_id, "pixel_values", "image_grid_thw"),
            (config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        )
        for token_id, pixels_key, grid_key in kinds:
            if inputs.get(grid_key) is None:
                continue
            grids = inputs[grid_key].tolist()
            counts = [frames * height * width // merge**2 for frames, height, width in grids]
            start = 0
            owners = item_positions(inputs["input_ids"] == token_id, counts)
            for (frames, height, width), (sample, positions) in zip(grids, owners, strict=True):
                cells = positions.view(frames, height // merge, width // merge)
                yield sample, cells, pixels_key, start, (frames, height, width)
                start += frames * height * width

    def token_positions(self, config, inputs: dict) -> list[list[torch.Tensor]]:
        """One grid per image and per video frame group: the merged token grid."""
        positions = [[] for _ in inputs["input_ids"]]
        for sample, cells, *_ in self._vision_items(config, inputs):
            positions[sample] += list(cells)
        return positions

    def token_grids(self, config, processor: ProcessorMixin, inputs: dict) -> list[list[TokenGrid]]:
        """One view per image and per video frame group; a token is a ``merge x merge`` block of tower patches."""
        merge = config.vision_config.spatial_merge_size
        image_processor = processor.image_processor
        patch, temporal = image_processor.patch_size, image_processor.temporal_patch_size
        views = [[] for _ in inputs["input_ids"]]
        patches_before = [0] * len(views)  # a sample's patches in earlier items: images first, then videos
        for sample, cells, pixels_key, start, (frames, height, width) in self._vision_items(config, inputs):
            patches = inputs[pixels_key][start : start + frames * height * width]
            # The processor's patch order: frame group, token row, token column, the token's merge x merge patches,
            # then channels, temporal frames and the patch's pixels.
            rows, columns = height // merge, width // merge
            blocks = patches.reshape(frames, rows, columns, merge, merge, 3, temporal, patch, patch)
            images = blocks[:, :, :, :, :, :, 0].permute(0, 5, 1, 3, 6, 2, 4, 7)
            images = images.reshape(frames, 3, height * patch, width * patch)
            order = torch.arange(frames * height * width).view(frames, rows, columns, merge, merge)
            patch_grid = order.transpose(2, 3).reshape(frames, height, width) + patches_before[sample]
            patches_before[sample] += frames * height * width
            for frame in range(frames):
                views[sample].append((rgb_pixels(images[frame], image_processor), cells[frame], patch_grid[frame]))
        return [in_prompt_order(sample_views) for sample_views in views]

    def lmms_conversation(
        self,
        context: str,
        visuals: list,
        processor: ProcessorMixin,
        system_prompt: str = "You are a helpful assistant.",
        max_num_frames: int = DEFAULT_MAX_FRAMES,
    ) -> tuple[list[dict], str | None]:
        """As lmms-eval's ``qwen2_vl`` and ``qwen3_vl``: a system message, the images and videos (file paths, of which
        ``max_num_frames`` are kept as the family's :meth:`vision_inputs` reads them), then the text without
        ``<image>`` tags; the pixel budget of every image and frame is the ``DashVLM``'s."""
        content = [
            {"type": "video", "video": visual, "max_frames": max_num_frames}
            if isinstance(visual, str)
            else {"type": "image", "image": visual}
            for visual in visuals
        ]
        content.append({"type": "text", "text": context.replace("<image>", "")})
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}], None

    def host_training_inputs(self, config, batch: dict) -> tuple[dict, tuple[str, ...]]:
        """M-RoPE positions computed here and the grids kept on the host: given a device ``grid_thw``, transformers'
        per-image loops (rope index, vision rotary positions, per-image attention split) read it back item by item,
        a GPU sync each (966 of them in a batch-64 step of the dash-shapes model)."""
        model_class = self.base_model_class(config.model_type)
        grids = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch}
        # get_rope_index reads nothing of the model but its config.
        position_ids, _ = model_class.get_rope_index(
            SimpleNamespace(config=config), batch["input_ids"], attention_mask=batch.get("attention_mask"), **grids
        )
        return {**batch, "position_ids": position_ids}, tuple(grids)

    def tiny_model(
        self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2, **settings
    ) -> PreTrainedModel:
        """``settings``: ``tiny_qwen_vl``'s other arguments (seed, tower width, decoder config entries)."""
        return tiny_qwen_vl(model_type, attn_implementation, vision_layers=vision_layers, **settings)

    def tiny_sample(
        self, model_type: str, grids: list[tuple[int, int, int]], text_lengths: list[int], video: bool, seed: int
    ) -> dict:
        return qwen_vl_sample(grids, text_lengths, video, seed)

    def tiny_inputs(self, model_type: str) -> dict[str, dict]:
        return {
            "image": self.tiny_sample(model_type, [(1, 8, 8)], [5, 7], False, 1),
            "images": self.tiny_sample(model_type, [(1, 4, 8), (1, 8, 4)], [3, 2, 9], False, 2),
            "video": self.tiny_sample(model_type, [(2, 4, 4)], [4, 6], True, 3),
        }

    def tiny_batch(self, model_type: str) -> tuple[dict, list[dict]]:
        singles = [
            self.tiny_sample(model_type, [(1, 8, 8)], [5, 7], False, 11),
            self.tiny_sample(model_type, [(1, 4, 4)], [2, 3], False, 12),
            self.tiny_sample(model_type, [(1, 4, 8), (1, 8, 8)], [3, 4, 6], False, 13),
        ]
        return left_pad_batch(singles), singles

    def tiny_checkpoint(
        self,
        model_type: str,
        words: list[str],
        seed: int,
        vision_layers: int,
        vision_width: int,
        image_side: int,
        **text_overrides,
    ) -> tuple[PreTrainedModel, ProcessorMixin]:
        tokenizer = word_tokenizer([*words, *self.tiny_words()], QWEN_VL_SPECIAL_TOKENS, self.chat_template())
        model = self.tiny_model(
            model_type,
            seed=seed,
            vocab_size=len(tokenizer),
            vision_layers=vision_layers,
            vision_width=vision_width,
            **special_token_ids(tokenizer, QWEN_VL_SPECIAL_TOKENS),
            **text_overrides,
        )
        return model, self.tiny_processor(tokenizer)

    def chat_template(self) -> str:
        """The chat template of the family's published checkpoints."""
        return QWEN_VL_CHAT_TEMPLATE

    def tiny_words(self) -> list[str]:
        """Words a tiny checkpoint's tokenizer needs beyond the caller's: those the processor itself writes."""
        return []

    def tiny_processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        """The family's real processor classes at the tiny model's patch sizes, around ``tokenizer``."""
        return tiny_qwen_vl_processor(tokenizer)


# Tiny models: 4 px patches, 2x2 merge, 2 frames per temporal patch.
PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2


def tiny_qwen_vl(
    family: str = "qwen2_vl",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    **text_overrides,
) -> PreTrainedModel:
    """A 5-layer Qwen2-VL (``family="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) in float32, eval mode.

    ``text_overrides`` replace entries of the decoder config ``TEXT``; the vision token ids stay those of ``TEXT``'s
    vocabulary unless overridden too (``image_token_id``, ``video_token_id``, ...).
    """
    torch.manual_seed(seed)
    vision = dict(
        depth=vision_layers,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
    )
    ids = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    ids.update({key: text_overrides.pop(key) for key in list(ids) if key in text_overrides})
    text = TEXT | text_overrides
    # M-RoPE splits the head_dim / 2 rotary pairs 2 : 3 : 3 over time, height and width, as Qwen2-VL-7B does.
    pairs = text["head_dim"] // 2
    temporal = pairs // 4
    height = (pairs - temporal) // 2
    sections = [temporal, height, pairs - temporal - height]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}
    if family == "qwen2_vl":
        vision |= dict(embed_dim=vision_width, hidden_size=text["hidden_size"], mlp_ratio=2)
    else:
        vision |= dict(
            hidden_size=vision_width,
            out_hidden_size=text["hidden_size"],
            intermediate_size=2 * vision_width,
            window_size=16,
            fullatt_block_indexes=[vision_layers - 1],
        )
    config_class, model_class = MODEL_CLASSES[family]
    config = config_class(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def vision_block(grid: tuple[int, int, int], video: bool = False, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """Placeholder ids (with start/end markers) and pixel patches for one image or video of ``grid`` = (t, h, w)."""
    t, h, w = grid
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH, generator=generator)
    placeholder = VIDEO_TOKEN if video else IMAGE_TOKEN
    return [VISION_START] + [placeholder] * (t * h * w // MERGE**2) + [VISION_END], pixels


def qwen_vl_sample(
    grids: list[tuple[int, int, int]],
    text_lengths: list[int],
    video: bool = False,
    seed: int = 0,
    timestamp_tokens: int = 0,
) -> dict:
    """One prompt: text chunks interleaved with images (or videos). ``len(text_lengths) == len(grids) + 1``. With
    ``timestamp_tokens``, a video's frame groups each come in their own start / end markers after that many text
    tokens (its timestamp), as Qwen3-VL's processor lays them out."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    pixels = []
    for i, length in enumerate(text_lengths):
        ids += torch.randint(1, 100, (length,), generator=generator).tolist()
        if i < len(grids):
            block, patch = vision_block(grids[i], video, seed=seed * 7 + i)
            if video and timestamp_tokens:
                frames, height, width = grids[i]
                group = [VISION_START] + [VIDEO_TOKEN] * (height * width // MERGE**2) + [VISION_END]
                block = [
                    token
                    for _ in range(frames)
                    for token in torch.randint(1, 100, (timestamp_tokens,), generator=generator).tolist() + group
                ]
            ids += block
            pixels.append(patch)
    key = "video" if video else "image"
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        f"pixel_values{'_videos' if video else ''}": torch.cat(pixels),
        f"{key}_grid_thw": torch.tensor(grids),
    }


# The chat template of the Qwen/Qwen2-VL-7B-Instruct checkpoint.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def tiny_qwen_vl_processor(
    tokenizer: PreTrainedTokenizerFast, min_pixels: int = 16 * 16, max_pixels: int = 128 * 128
) -> ProcessorMixin:
    """The real Qwen2-VL processor classes at the tiny model's patch sizes (4 px patches, 2x2 merge, 2 frames)."""
    from transformers import Qwen2VLImageProcessorFast, Qwen2VLProcessor, Qwen2VLVideoProcessor

    patches = dict(patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorFast(**patches, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patches, **pixels),
        chat_template=tokenizer.chat_template,
    )


# Speed presets: the real shapes with random weights.
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2)


@dataclass(frozen=True)
class QwenVLPreset(Preset):
    """A Qwen2-VL (``model_type="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) shape; images keep their side."""

    model_type: str = "qwen2_vl"
    special_tokens: ClassVar[dict[str, str]] = QWEN_VL_SPECIAL_TOKENS
    chat_template: ClassVar[str] = QWEN_VL_CHAT_TEMPLATE

    def model_classes(self) -> tuple[type, type]:
        return MODEL_CLASSES[self.model_type]

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        from transformers import Qwen2VLImageProcessorFast, Qwen2VLProcessor, Qwen2VLVideoProcessor

        vision = self.config["vision_config"]
        patches = dict(patch_size=vision["patch_size"], temporal_patch_size=2, merge_size=vision["spatial_merge_size"])
        pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)  # the Qwen2-VL checkpoints' budget
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorFast(**patches, **pixels),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**patches, **pixels),
            chat_template=tokenizer.chat_template,
        )

    def shorten_vision(self, vision_config: dict, blocks: int) -> None:
        vision_config["depth"] = blocks
        if "fullatt_block_indexes" in vision_config:  # Qwen2.5-VL: the last block attends over the whole image
            vision_config["fullatt_block_indexes"] = [blocks - 1]

    def image_inputs(self, image: Image.Image) -> tuple[dict, list[int]]:
        from transformers import Qwen2VLImageProcessorFast

        return self._vision_inputs(Qwen2VLImageProcessorFast, "image", images=[image])

    def video_inputs(self, video: np.ndarray) -> tuple[dict, list[int]]:
        from transformers import Qwen2VLVideoProcessor

        return self._vision_inputs(Qwen2VLVideoProcessor, "video", videos=[video], do_sample_frames=False)

    def _vision_inputs(self, processor_class: type, kind: str, **visuals) -> tuple[dict, list[int]]:
        """The processor's outputs at the side given (no pixel budget), and the placeholder ids of ``kind``."""
        vision, ids = self.config["vision_config"], self.config
        merge = vision["spatial_merge_size"]
        processor = processor_class(
            patch_size=vision["patch_size"], merge_size=merge, min_pixels=64, max_pixels=4096 * 4096
        )
        pixels = dict(processor(**visuals, return_tensors="pt"))
        count = int(pixels[f"{kind}_grid_thw"].prod()) // merge**2
        return pixels, [ids["vision_start_token_id"], *[ids[f"{kind}_token_id"]] * count, ids["vision_end_token_id"]]


# What a tiny Qwen preset's inputs need of its config: the patch geometry and the vision token ids.
TINY_PRESET_CONFIG = dict(
    vision_config=dict(patch_size=PATCH, spatial_merge_size=MERGE),
    image_token_id=IMAGE_TOKEN,
    video_token_id=VIDEO_TOKEN,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
)


@dataclass(frozen=True)
class TinyQwenVLPreset(QwenVLPreset):
    """The tests' tiny Qwen2-VL (``tiny_qwen_vl``); ``config`` holds only what its inputs need, ``vision_layers`` is
    ignored (the tiny tower has 2 blocks)."""

    def build(
        self,
        device: str | torch.device,
        dtype: torch.dtype,
        attn_implementation: str = "sdpa",
        layers: int | None = None,
        vision_layers: int | None = None,
    ) -> torch.nn.Module:
        overrides = {"num_hidden_layers": layers} if layers else {}
        return tiny_qwen_vl(attn_implementation=attn_implementation, **overrides).to(device, dtype)


def qwen2_vl_text(hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=28,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )


def qwen2_vl_preset(name: str, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> QwenVLPreset:
    """A Qwen2-VL size: its decoder, and the shared 32-layer vision tower merging into the decoder's width."""
    text = qwen2_vl_text(hidden, heads, kv_heads, ffn, vocab)
    return QwenVLPreset(
        name, dict(text_config=text, vision_config=QWEN2_VL_VISION | {"hidden_size": hidden}, **QWEN_IDS)
    )


PRESETS = (
    qwen2_vl_preset("qwen2-vl-2b", hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936),
    qwen2_vl_preset("qwen2-vl-7b", hidden=3584, heads=28, kv_heads=4, ffn=18944, vocab=152064),
    QwenVLPreset(
        "qwen2.5-vl-7b",
        dict(
            text_config=qwen2_vl_text(hidden=3584, heads=28, kv_heads=4, ffn=18944, vocab=152064),
            vision_config=dict(
                depth=32,
                hidden_size=1280,
                intermediate_size=3420,
                num_heads=16,
                out_hidden_size=3584,
                patch_size=14,
                spatial_merge_size=2,
                window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2,
            ),
            **QWEN_IDS,
        ),
        model_type="qwen2_5_vl",
    ),
    TinyQwenVLPreset("tiny", TINY_PRESET_CONFIG, text_ids=(2, 100)),
)

QWEN2_VL = register_adapter(QwenVLAdapter(model_types=tuple(MODEL_CLASSES), presets=PRESETS))
