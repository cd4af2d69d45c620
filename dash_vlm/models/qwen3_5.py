"""Qwen3.5, dense (``qwen3_5``) and mixture-of-experts (``qwen3_5_moe``): Qwen3-VL's tower (without DeepStack) and
processor in front of a hybrid decoder (DESIGN.md section 11).

What differs from Qwen3-VL:

- The decoder interleaves Gated DeltaNet layers (linear attention: a causal depthwise convolution, then a gated
  delta-rule recurrence, ``linear_attn``) with gated full-attention layers (``self_attn``), by
  ``config.text_config.layer_types``. The adapter names the recurrent layers and each layer's token mixer; the shared
  mechanism does the rest (rule 16).
- Full attention rotates only the first ``partial_rotary_factor`` of each head and gates its output: its query
  projection yields the queries and the gate side by side (FastV reads the queries alone).
- No DeepStack: the decoder takes nothing between layers, the tower has no taps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
    ProcessorMixin,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model, apply_rotary_pos_emb

from dash_vlm.models import DecoderAdditions, register_adapter
from dash_vlm.models.qwen2_vl import TINY_PRESET_CONFIG
from dash_vlm.models.qwen3_vl import (
    TIMESTAMP_WORDS,
    Qwen3VLAdapter,
    Qwen3VLPreset,
    tiny_qwen3_tower,
    tiny_vision_ids,
)
from dash_vlm.models.tiny import TEXT

MODEL_CLASSES = {
    "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
    "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration),
}
RECURRENT = "linear_attention"


@dataclass(frozen=True)
class Qwen3_5Adapter(Qwen3VLAdapter):
    hybrid_decoder: bool = True

    def base_model_class(self, model_type: str) -> type:
        return Qwen3_5Model  # the MoE model's get_rope_index is the same function of the config

    def recurrent_layers(self, config) -> frozenset[int]:
        kinds = config.get_text_config().layer_types
        return frozenset(index for index, kind in enumerate(kinds) if kind == RECURRENT)

    def token_mixer(self, layer: nn.Module) -> nn.Module:
        return layer.linear_attn if layer.layer_type == RECURRENT else layer.self_attn

    def recurrent_kernels(self, model: nn.Module) -> str:
        """ "fla" where transformers found flash-linear-attention's Triton kernels (the ``fla`` package, on a GPU),
        else "torch" (its PyTorch loops)."""
        layer = self.decoder_layers(model)[min(self.recurrent_layers(model.config))]
        return "fla" if layer.linear_attn.chunk_gated_delta_rule.__module__.startswith("fla") else "torch"

    def attention_queries(self, attention: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The queries without the output gate that the same projection yields beside them."""
        projected = attention.q_proj(states).view(*states.shape[:2], -1, 2 * attention.head_dim)
        return attention.q_norm(projected[..., : attention.head_dim]).transpose(1, 2)

    def rotate(self, attention: nn.Module, states: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
        # Partial rotary: cos / sin cover the first dimensions of a head (interleaved M-RoPE folded into them).
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(states, states, cos, sin)[0]

    def first_decision_layer(self, config) -> int:
        return 0  # no DeepStack

    def take_decoder_additions(self, decoder_kwargs: dict) -> DecoderAdditions | None:
        return None

    def vision_taps(self, tower: nn.Module) -> dict[int, nn.Module]:
        return {}

    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        """Qwen3-VL's reading, except for video entries that name ``total_pixels`` (lmms-eval's ``qwen3_5`` reading,
        from :meth:`lmms_conversation`): those go to qwen-vl-utils as they are, with the budget's ``min_pixels``, so
        that it samples 2 frames a second (at least 4, at most the entry's ``max_frames``) and shares ``total_pixels``
        among the frames. Images keep the budget; a batch mixing such entries with other videos is refused."""
        videos = [item for item in items if item["type"] == "video"]
        budgeted = [item for item in videos if "total_pixels" in item]
        if not budgeted:
            return super().vision_inputs(processor, items, min_pixels, max_pixels)
        if len(budgeted) != len(videos):
            raise ValueError(
                f"{len(budgeted)} of {len(videos)} video entries name total_pixels (lmms-eval's qwen3_5 reading); "
                "give it to every video of the batch or to none"
            )
        limits = self.vision_limits(processor, min_pixels, max_pixels)
        content = [
            item | limits if item["type"] == "image" else item | {"min_pixels": limits["min_pixels"]} for item in items
        ]
        return self.processor_vision(processor, content, limits)

    def lmms_conversation(
        self,
        context: str,
        visuals: list,
        processor: ProcessorMixin,
        total_pixels: int | None = None,
        enable_thinking: bool = True,
        **options,
    ) -> tuple[list[dict], str]:
        """As lmms-eval's ``qwen3_5``: Qwen3-VL's conversation (``options``: its system prompt and frame cap), each
        video entry naming ``total_pixels`` where given (see :meth:`vision_inputs`; ``None``: videos read as
        Qwen3-VL's), and the prompt rendered with the chat template's ``enable_thinking`` switch (``False`` closes the
        thinking block empty)."""
        conversation, _ = super().lmms_conversation(context, visuals, processor, **options)
        if total_pixels is not None:
            for item in conversation[-1]["content"]:
                if item["type"] == "video":
                    item["total_pixels"] = total_pixels
        prompt = processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return conversation, prompt

    def tiny_model(
        self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2, **settings
    ) -> PreTrainedModel:
        return tiny_qwen3_5(model_type, attn_implementation, vision_layers=vision_layers, **settings)

    def chat_template(self) -> str:
        return QWEN3_5_CHAT_TEMPLATE

    def tiny_words(self) -> list[str]:
        return [*TIMESTAMP_WORDS, *THINKING_WORDS]


# The chat template of the published Qwen3.5 checkpoints, byte for byte (7,756 bytes, SHA-256 a4aee8af...28f715: the
# Qwen3.5-35B-A3B GGUF's, identical to Qwen3.5-27B's tokenizer_config.json): no system message of its own; the
# assistant's turn opens a thinking block unless ``enable_thinking=False`` closes it empty.
QWEN3_5_CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "qwen3_5.jinja").read_text()
THINKING_WORDS = ["<think>", "</think>"]


# The tiny decoder's layout: layer 2, the default decision layer of 5, is recurrent, and both kinds lie above it.
# DECISION_AT_ATTENTION puts attention at layer 2 instead (rule 2's two readings).
TINY_LAYER_TYPES = ("linear_attention", "full_attention", "linear_attention", "full_attention", "linear_attention")
DECISION_AT_ATTENTION = ("linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention")


def tiny_qwen3_5(
    model_type: str = "qwen3_5",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    layer_types: tuple[str, ...] = TINY_LAYER_TYPES,
    **text_overrides,
) -> PreTrainedModel:
    """A 5-layer Qwen3.5 (``model_type="qwen3_5"``) or Qwen3.5-MoE (``"qwen3_5_moe"``: 4 experts, 2 per token, and a
    shared expert) in float32, eval mode, its decoder layers of the kinds ``layer_types``. Its Gated DeltaNet layers
    have 2 key heads and 4 value heads of 16 dimensions; attention rotates half of each 16-dimension head.

    ``text_overrides`` replace entries of the decoder config ``TEXT`` (vision token ids too).
    """
    torch.manual_seed(seed)
    ids = tiny_vision_ids(text_overrides)
    text = TEXT | dict(
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=list(layer_types),
        # Interleaved M-RoPE over the 4 rotary pairs of half a head: 2 temporal, 1 height, 1 width.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.5,
        },
    )
    text |= text_overrides
    if model_type == "qwen3_5_moe":
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    vision = tiny_qwen3_tower(vision_layers, vision_width, text["hidden_size"])
    config_class, model_class = MODEL_CLASSES[model_type]
    config = config_class(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


@dataclass(frozen=True)
class Qwen3_5Preset(Qwen3VLPreset):
    """A Qwen3.5 (``model_type="qwen3_5"``) or Qwen3.5-MoE (``"qwen3_5_moe"``) shape: Qwen3-VL's processor."""

    model_type: str = "qwen3_5"
    chat_template: ClassVar[str] = QWEN3_5_CHAT_TEMPLATE

    def model_classes(self) -> tuple[type, type]:
        return MODEL_CLASSES[self.model_type]

    def shorten_vision(self, vision_config: dict, blocks: int) -> None:
        vision_config["depth"] = blocks  # no DeepStack taps to keep below the cut


@dataclass(frozen=True)
class TinyQwen3_5Preset(Qwen3_5Preset):
    """The tests' tiny Qwen3.5 (``tiny_qwen3_5``: both kinds of layer above the decision layer), for the harness on a
    CPU; ``config`` holds only what its inputs need, ``vision_layers`` is ignored (the tiny tower has 2 blocks)."""

    def build(
        self,
        device: str | torch.device,
        dtype: torch.dtype,
        attn_implementation: str = "sdpa",
        layers: int | None = None,
        vision_layers: int | None = None,
    ) -> nn.Module:
        overrides = {"num_hidden_layers": layers, "layer_types": TINY_LAYER_TYPES[:layers]} if layers else {}
        return tiny_qwen3_5(attn_implementation=attn_implementation, **overrides).to(device, dtype)


QWEN3_5_IDS = dict(
    image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054
)


def qwen3_5_text(hidden: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    """A Qwen3.5 decoder: every fourth layer gated full attention (256-wide heads, a quarter of each rotated,
    interleaved M-RoPE 11 / 11 / 10 pairs, theta 10,000,000), the others Gated DeltaNet (16 key and 32 value heads of
    128, kernel 4); 262,144 positions, the 248,320-token vocabulary: the values the published 9B and 35B-A3B share."""
    return dict(
        vocab_size=248320,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=256,
        layer_types=["full_attention" if (index + 1) % 4 == 0 else "linear_attention" for index in range(layers)],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        **extra,
    )


def qwen3_5_vision(out: int) -> dict:
    """Qwen3.5's tower (Qwen3-VL's 27-block tower of the 8B, without DeepStack) projecting to ``out``."""
    return dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=out,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        hidden_act="gelu_pytorch_tanh",
    )


# Each value from the published config.json of the checkpoint, which no machine here can reach; read from copies: the
# 9B's from the MLX conversion leo-kreisman/Qwen3.5-9B-MLX-8bit (config.json at 57b66137, the official layout plus
# quantization keys); the 35B-A3B's from the config of InternScience/Agents-A1, a fine-tune that keeps the
# architecture (as printed in its published run log). Both agree with transformers 5.2's configuration_qwen3_5(_moe)
# defaults where those name the same size.
PRESETS = (
    Qwen3_5Preset(  # Qwen/Qwen3.5-9B
        "qwen3.5-9b",
        dict(
            text_config=qwen3_5_text(hidden=4096, layers=32, heads=16, kv_heads=4, intermediate_size=12288),
            vision_config=qwen3_5_vision(out=4096),
            **QWEN3_5_IDS,
        ),
    ),
    Qwen3_5Preset(  # Qwen/Qwen3.5-35B-A3B: 256 experts, 8 a token, and a shared expert, in every layer
        "qwen3.5-35b-a3b",
        dict(
            text_config=qwen3_5_text(
                hidden=2048,
                layers=40,
                heads=16,
                kv_heads=2,
                num_experts=256,
                num_experts_per_tok=8,
                moe_intermediate_size=512,
                shared_expert_intermediate_size=512,
            ),
            vision_config=qwen3_5_vision(out=2048),
            **QWEN3_5_IDS,
        ),
        model_type="qwen3_5_moe",
    ),
    TinyQwen3_5Preset("tiny-qwen3.5", TINY_PRESET_CONFIG, text_ids=(7, 100)),
)

QWEN3_5 = register_adapter(Qwen3_5Adapter(model_types=tuple(MODEL_CLASSES), presets=PRESETS))
