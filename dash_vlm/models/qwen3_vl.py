"""Qwen3-VL, dense (``qwen3_vl``) and mixture-of-experts (``qwen3_vl_moe``): the Qwen2-VL family's rules, plus
DeepStack.

What differs from Qwen2-VL (DESIGN.md section 10):

- DeepStack: the tower's features after blocks ``deepstack_visual_indexes`` pass through their own mergers (the tower's
  *taps*) and are added to the decoder's hidden states at the visual positions after decoder layers ``0..n-1``. The
  decision layer must lie above them (``first_decision_layer``); under vision-tower halting every tap sees every
  patch (``vision_taps``).
- 16 px patches merged 2x2: a token covers 32 px; interleaved M-RoPE already folded into the decoder's ``cos`` /
  ``sin``, so FastV's rotation is the plain one.
- Video: a timestamp text (``<1.5 seconds>``) before each frame group, each group in its own vision start / end
  markers; frames read as lmms-eval's ``qwen3_vl`` reads them (``max_frames`` evenly spaced frames of the file, with
  their timestamps).

The family's tiny test models and speed presets (``qwen3-vl-2b``, ``qwen3-vl-8b``, ``qwen3-vl-30b-a3b``) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures, Qwen3VLModel

from dash_vlm.models import DEFAULT_MAX_FRAMES, DecoderAdditions, ModelAdapter, register_adapter
from dash_vlm.models.qwen2_vl import (
    MERGE,
    PATCH,
    QWEN_IDS,
    TEMPORAL_PATCH,
    QwenVLAdapter,
    QwenVLPreset,
    qwen_vl_sample,
)
from dash_vlm.models.tiny import (
    IMAGE_TOKEN,
    TEXT,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
)

MODEL_CLASSES = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
}

# lmms-eval's qwen3_vl defaults (lmms_eval/models/simple/qwen3_vl.py): the pixel budget of every image and frame.
LMMS_MIN_PIXELS, LMMS_MAX_PIXELS = 256 * 28 * 28, 1605632


def video_frame_count(path: str) -> int:
    """The frames of a video file as lmms-eval's ``qwen3_vl`` counts them before capping ``nframes`` (decord, the
    reader qwen-vl-utils uses), or PyAV's decoded count where decord is not installed."""
    try:
        import decord
    except ImportError:
        import av

        with av.open(path) as container:
            return sum(1 for _ in container.decode(video=0))
    return len(decord.VideoReader(path))


@dataclass(frozen=True)
class Qwen3VLAdapter(QwenVLAdapter):
    def vision_tables(self, tower: nn.Module, grid: tuple[tuple[int, ...], ...]) -> dict:
        """The Qwen tables (rotary, segments; no windows) and the learned positions interpolated to each item (added
        to the patch embeddings), from the tower's own helpers given the grid on the host."""
        learned = tower.fast_pos_embed_interpolate(torch.tensor(grid)).to(next(tower.parameters()).device)
        return super().vision_tables(tower, grid) | {"learned_positions": learned}

    def vision_forward(self, tower: nn.Module, pixels: torch.Tensor, tables: dict) -> BaseModelOutputWithPooling:
        """Qwen3-VL's tower forward on the tables, DeepStack features included (Qwen3.5's tower has none)."""
        hidden = tower.patch_embed(pixels) + tables["learned_positions"]
        taps = list(getattr(tower, "deepstack_visual_indexes", ()))
        features = []
        for index, block in enumerate(tower.blocks):
            hidden = block(hidden, cu_seqlens=tables["segments"], position_embeddings=tables["position_embeddings"])
            if index in taps:
                features.append(tower.deepstack_merger_list[taps.index(index)](hidden))
        merged = tower.merger(hidden)
        if not hasattr(tower, "deepstack_merger_list"):
            return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)
        return BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=hidden, pooler_output=merged, deepstack_features=features
        )

    def base_model_class(self, model_type: str) -> type:
        return Qwen3VLModel  # the MoE model's get_rope_index is the same function of the config

    def first_decision_layer(self, config) -> int:
        """DeepStack adds the taps' features after decoder layers ``0..n-1``: halting starts above them."""
        return len(config.vision_config.deepstack_visual_indexes)

    def take_decoder_additions(self, decoder_kwargs: dict) -> DecoderAdditions | None:
        """DeepStack's features, added at the visual positions after decoder layers ``0..n-1``."""
        positions, values = decoder_kwargs.get("visual_pos_masks"), decoder_kwargs.get("deepstack_visual_embeds")
        decoder_kwargs["visual_pos_masks"] = decoder_kwargs["deepstack_visual_embeds"] = None
        return DecoderAdditions(positions, list(values)) if values else None  # a tower without taps gives []

    def vision_taps(self, tower: nn.Module) -> dict[int, nn.Module]:
        """The DeepStack mergers, by the block whose output each reads."""
        return dict(zip(tower.deepstack_visual_indexes, tower.deepstack_merger_list, strict=True))

    def rotate(self, attention: nn.Module, states: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
        # The interleaved M-RoPE sections are folded into cos / sin by the decoder's rotary embedding.
        return ModelAdapter.rotate(self, attention, states, position_embeddings)

    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        """Images and videos through qwen-vl-utils under the pixel budget, as lmms-eval's ``qwen3_vl`` reads them: a
        video file gives ``min(max_frames, its frames)`` evenly spaced frames (``nframes``; rounded down to an even
        count, where lmms-eval's rounding up past the file fails), a frame list every frame (at ``sample_fps`` where
        the loader decoded it); each video's metadata (frame indices and rate) gives the processor its timestamps. The
        processor does not resize again."""
        limits = self.vision_limits(processor, min_pixels, max_pixels)
        content = []
        for item in items:
            entry = {key: value for key, value in item.items() if key != "max_frames"} | limits
            if item["type"] == "video" and isinstance(item["video"], str):
                frames = min(item.get("max_frames") or DEFAULT_MAX_FRAMES, video_frame_count(item["video"]))
                entry["nframes"] = max(2, frames // 2 * 2)
            content.append(entry)
        return self.processor_vision(processor, content, limits)

    def processor_vision(self, processor: ProcessorMixin, content: list[dict], limits: dict) -> dict:
        """The processor's vision arguments from qwen-vl-utils' reading of ``content``: images, and videos with their
        metadata (frame indices and rate, for the timestamps); the processor does not resize again."""
        images, videos, video_kwargs = self.read_vision(processor, content, limits, return_video_metadata=True)
        vision = {"images": images, "do_resize": False}
        if videos:
            frames, metadata = map(list, zip(*videos, strict=True))
            vision |= {"videos": frames, "video_metadata": metadata, **video_kwargs}
        return vision

    def tiny_model(
        self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2, **settings
    ) -> PreTrainedModel:
        return tiny_qwen3_vl(model_type, attn_implementation, vision_layers=vision_layers, **settings)

    def tiny_sample(
        self, model_type: str, grids: list[tuple[int, int, int]], text_lengths: list[int], video: bool, seed: int
    ) -> dict:
        return qwen3_vl_sample(grids, text_lengths, video, seed)

    def chat_template(self) -> str:
        return QWEN3_VL_CHAT_TEMPLATE

    def tiny_words(self) -> list[str]:
        return TIMESTAMP_WORDS

    def tiny_processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        return tiny_qwen3_vl_processor(tokenizer)


# The words of the processor's frame timestamps ("<1.5 seconds>"), so that a tiny checkpoint's tokenizer knows them.
TIMESTAMP_WORDS = ["seconds", "<", ">", *map(str, range(10))]


def tiny_deepstack(vision_layers: int) -> list[int]:
    """The tiny tower's one DeepStack tap: block ``vision_layers // 2`` (above the decision block at the default
    ``vision_start_ratio``: the last of 2 blocks, a middle one of 6), so that the decoder's DeepStack layer (layer 0)
    lies below the decision layer of every method's default (DASH's layer 2, FastV's layer 1)."""
    return [vision_layers // 2]


def tiny_vision_ids(text_overrides: dict) -> dict:
    """The tiny models' vision token ids, those given among ``text_overrides`` taken out of it."""
    ids = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return ids | {key: text_overrides.pop(key) for key in list(ids) if key in text_overrides}


def tiny_qwen3_tower(vision_layers: int, vision_width: int, out_hidden_size: int) -> dict:
    """The config of a tiny Qwen3-VL / Qwen3.5 tower (4 px patches, 2x2 merge, 2 frames a temporal patch)."""
    return dict(
        depth=vision_layers,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=out_hidden_size,
        num_position_embeddings=64,  # an 8x8 grid of learned positions, interpolated to each image
    )


def tiny_qwen3_vl(
    model_type: str = "qwen3_vl",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    deepstack: list[int] | None = None,
    **text_overrides,
) -> PreTrainedModel:
    """A 5-layer Qwen3-VL (``model_type="qwen3_vl"``) or Qwen3-VL-MoE (``"qwen3_vl_moe"``: 4 experts, 2 per token, a
    sparse block in every layer) in float32, eval mode; DeepStack taps at ``deepstack`` (default
    :func:`tiny_deepstack`).

    ``text_overrides`` replace entries of the decoder config ``TEXT`` (vision token ids too).
    """
    torch.manual_seed(seed)
    ids = tiny_vision_ids(text_overrides)
    text = TEXT | text_overrides
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": interleaved_mrope_sections(text["head_dim"] // 2),
        "mrope_interleaved": True,
    }
    if model_type == "qwen3_vl_moe":
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = tiny_qwen3_tower(vision_layers, vision_width, text["hidden_size"])
    vision["deepstack_visual_indexes"] = tiny_deepstack(vision_layers) if deepstack is None else list(deepstack)
    config_class, model_class = MODEL_CLASSES[model_type]
    config = config_class(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def interleaved_mrope_sections(pairs: int) -> list[int]:
    """Temporal, height and width rotary pairs in the published proportion (24 / 20 / 20 of Qwen3-VL's 64 pairs), so
    that height and width take frequencies across the whole range: ``[4, 2, 2]`` of 8 pairs, ``[6, 5, 5]`` of 16.
    transformers gives every pair outside the height and width sections the temporal position, which all of an image's
    tokens share: ``[4, 2, 2]`` over 16 pairs left height and width four fast pairs, and a dash-shapes model trained
    so stayed at chance on left / right and above / below."""
    spatial = pairs * 20 // 64
    return [pairs - 2 * spatial, spatial, spatial]


def qwen3_vl_sample(
    grids: list[tuple[int, int, int]], text_lengths: list[int], video: bool = False, seed: int = 0
) -> dict:
    """One prompt of the tiny model: ``qwen_vl_sample`` with a 2-token timestamp text before each frame group."""
    return qwen_vl_sample(grids, text_lengths, video, seed, timestamp_tokens=2)


# The chat template of the Qwen/Qwen3-VL-8B-Instruct checkpoint, byte for byte (5,292 bytes, SHA-256 3636d0f0...a489e4,
# as its GGUF release ships it): unlike Qwen2-VL's, it adds no system message of its own.
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "qwen3_vl.jinja").read_text()


def qwen3_vl_processor(
    tokenizer: PreTrainedTokenizerFast, patch_size: int, image_size: dict[str, int], video_size: dict[str, int]
) -> ProcessorMixin:
    """The real Qwen3-VL processor classes around ``tokenizer``: ``patch_size`` px patches merged 2x2, 2 frames a
    temporal patch, images and frames normalised to [-1, 1] as the published checkpoints' are, under the pixel
    budgets ``image_size`` / ``video_size`` (``shortest_edge``, ``longest_edge``)."""
    from transformers import Qwen2VLImageProcessorFast, Qwen3VLProcessor, Qwen3VLVideoProcessor

    common = dict(patch_size=patch_size, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorFast(**common, size=image_size),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**common, size=video_size),
        chat_template=tokenizer.chat_template,
    )


def tiny_qwen3_vl_processor(
    tokenizer: PreTrainedTokenizerFast, min_pixels: int = 16 * 16, max_pixels: int = 128 * 128
) -> ProcessorMixin:
    """The real Qwen3-VL processor classes at the tiny model's patch sizes (4 px patches, 2x2 merge, 2 frames)."""
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return qwen3_vl_processor(tokenizer, PATCH, size, size)


@dataclass(frozen=True)
class Qwen3VLPreset(QwenVLPreset):
    """A Qwen3-VL (``model_type="qwen3_vl"``) or Qwen3-VL-MoE (``"qwen3_vl_moe"``) shape."""

    model_type: str = "qwen3_vl"
    chat_template: ClassVar[str] = QWEN3_VL_CHAT_TEMPLATE

    def model_classes(self) -> tuple[type, type]:
        return MODEL_CLASSES[self.model_type]

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        return qwen3_vl_processor(tokenizer, self.config["vision_config"]["patch_size"], IMAGE_SIZE, VIDEO_SIZE)

    def shorten_vision(self, vision_config: dict, blocks: int) -> None:
        vision_config["depth"] = blocks
        vision_config["deepstack_visual_indexes"] = [
            index for index in vision_config["deepstack_visual_indexes"] if index < blocks
        ]

    def video_inputs(self, video: np.ndarray) -> tuple[dict, list[int]]:
        """Every frame kept; each frame group in its own markers after a timestamp text (``<0.5 seconds>``: 6 tokens of
        Qwen's tokenizer), as Qwen3-VL's processor lays a video out."""
        from transformers import Qwen3VLVideoProcessor

        vision, ids = self.config["vision_config"], self.config
        merge = vision["spatial_merge_size"]
        processor = Qwen3VLVideoProcessor(
            patch_size=vision["patch_size"], merge_size=merge, size={"shortest_edge": 64, "longest_edge": 4096**2}
        )
        pixels = dict(processor(videos=[video], do_sample_frames=False, return_tensors="pt"))
        pixels.pop("video_metadata", None)
        groups, height, width = pixels["video_grid_thw"][0].tolist()
        group = [ids["vision_start_token_id"], *[ids["video_token_id"]] * (height * width // merge**2)]
        timestamp = list(range(self.text_ids[0], self.text_ids[0] + 6))
        return pixels, [token for _ in range(groups) for token in [*timestamp, *group, ids["vision_end_token_id"]]]


# The published checkpoints' processor budgets (their preprocessor_config.json / video_preprocessor_config.json).
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


def qwen3_vl_text(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    """A Qwen3-VL decoder: 128-wide heads, interleaved M-RoPE (24 / 20 / 20 pairs), theta 5,000,000, 262,144
    positions, the 151,936-token vocabulary: the values every published size shares."""
    return dict(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        **extra,
    )


def qwen3_vl_vision(depth: int, hidden: int, ffn: int, out: int, deepstack: list[int]) -> dict:
    """A Qwen3-VL tower: 16 heads, 16 px patches merged 2x2, 2 frames a temporal patch, 48x48 learned positions."""
    return dict(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_heads=16,
        out_hidden_size=out,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=deepstack,
        hidden_act="gelu_pytorch_tanh",
    )


# Each value from the checkpoint's config.json on the Hugging Face hub (huggingface.co/Qwen/<name>/blob/main/
# config.json, transformers 4.57 names: rope_theta and rope_scaling there are rope_parameters here), cross-checked
# against the 2B / 8B / 30B-A3B flavours of torchtitan's experiments/qwen3_vl; the 8B and 30B-A3B built here have
# exactly their checkpoints' parameters (8,767,123,696 and 31,070,754,032: tests/test_bench.py).
PRESETS = (
    Qwen3VLPreset(  # Qwen/Qwen3-VL-2B-Instruct: tied embeddings
        "qwen3-vl-2b",
        dict(
            text_config=qwen3_vl_text(hidden=2048, ffn=6144, layers=28, heads=16, kv_heads=8),
            vision_config=qwen3_vl_vision(depth=24, hidden=1024, ffn=4096, out=2048, deepstack=[5, 11, 17]),
            tie_word_embeddings=True,
            **QWEN_IDS,
        ),
    ),
    Qwen3VLPreset(  # Qwen/Qwen3-VL-8B-Instruct
        "qwen3-vl-8b",
        dict(
            text_config=qwen3_vl_text(hidden=4096, ffn=12288, layers=36, heads=32, kv_heads=8),
            vision_config=qwen3_vl_vision(depth=27, hidden=1152, ffn=4304, out=4096, deepstack=[8, 16, 24]),
            **QWEN_IDS,
        ),
    ),
    Qwen3VLPreset(  # Qwen/Qwen3-VL-30B-A3B-Instruct: 128 experts, 8 a token, a sparse block in every layer
        "qwen3-vl-30b-a3b",
        dict(
            text_config=qwen3_vl_text(
                hidden=2048,
                ffn=6144,
                layers=48,
                heads=32,
                kv_heads=4,
                num_experts=128,
                num_experts_per_tok=8,
                moe_intermediate_size=768,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                norm_topk_prob=True,
            ),
            vision_config=qwen3_vl_vision(depth=27, hidden=1152, ffn=4304, out=2048, deepstack=[8, 16, 24]),
            **QWEN_IDS,
        ),
        model_type="qwen3_vl_moe",
    ),
)

QWEN3_VL = register_adapter(Qwen3VLAdapter(model_types=tuple(MODEL_CLASSES), presets=PRESETS))
