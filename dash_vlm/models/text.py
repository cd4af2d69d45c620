"""Text-only decoders that kvpress supports: the prefill module is the decoder itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dash_vlm.models import ModelAdapter, register_adapter
from dash_vlm.models.tiny import TEXT

TEXT_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


@dataclass(frozen=True)
class TextAdapter(ModelAdapter):
    def tiny_model(self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2) -> PreTrainedModel:
        return tiny_text_model(model_type, attn_implementation)


TEXT_ADAPTER = register_adapter(TextAdapter(model_types=tuple(TEXT_MODELS)))


def tiny_text_model(model_type: str = "llama", attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """A 5-layer text decoder of one of the families kvpress supports, float32, eval mode."""
    torch.manual_seed(seed)
    config_class, model_class = TEXT_MODELS[model_type]
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    config = config_class(**TEXT, **extra)
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def text_sample(length: int, seed: int = 0) -> dict:
    """One prompt of ``length`` random tokens of the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (1, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
