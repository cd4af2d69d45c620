"""Model-family adapters: the only place that knows how a supported model is laid out.

An adapter tells the press where the module that runs a whole prefill is (it sees ``input_ids``), where the decoder
stack is, and which token ids are vision placeholders. Everything else (M-RoPE or 1-D positions, GQA, masks) is
handled generically because it reaches the decoder layers as ordinary tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import BatchFeature, PretrainedConfig, ProcessorMixin


@dataclass(frozen=True)
class ModelAdapter:
    """Layout of one model family.

    Parameters
    ----------
    model_types : tuple of str
        The ``config.model_type`` values this adapter serves.
    vision_token_attributes : tuple of str
        Config attributes holding the ids of the vision placeholder tokens; empty for a text-only model.
    video : bool
        Whether the family takes video input.
    pixel_limits : bool
        Whether its processor resizes images to a pixel budget (``min_pixels`` / ``max_pixels``).
    vision_tower_attribute : str, optional
        Attribute of the prefill module that holds the vision tower (the speed harness times it).
    """

    model_types: tuple[str, ...]
    vision_token_attributes: tuple[str, ...] = ()
    video: bool = False
    pixel_limits: bool = False
    vision_tower_attribute: str | None = None

    @property
    def is_vision_language(self) -> bool:
        return bool(self.vision_token_attributes)

    def prefill_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward sees ``input_ids`` and runs a whole prefill (vision tower included)."""
        return getattr(model, "model", model)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack: it has ``layers`` (each with ``self_attn``) and the final ``norm``."""
        base = self.prefill_module(model)
        return getattr(base, "language_model", base)

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        """The vision tower (whose output the decoder reads), or ``None`` for a text-only model."""
        if self.vision_tower_attribute is None:
            return None
        return getattr(self.prefill_module(model), self.vision_tower_attribute)

    def vision_token_ids(self, config: PretrainedConfig) -> list[int]:
        return [
            getattr(config, name) for name in self.vision_token_attributes if getattr(config, name, None) is not None
        ]

    def processor_inputs(
        self,
        processor: ProcessorMixin,
        conversations: list[list[dict]],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        prompts: list[str] | None = None,
    ) -> BatchFeature:
        """Model inputs of a batch of chat conversations, prompts built by the checkpoint's chat template unless
        ``prompts`` gives them.

        Image entries of the conversations hold loaded ``PIL`` images; the tokenizer pads on the side it is set to.
        """
        prompts = chat_prompts(processor, conversations) if prompts is None else prompts
        vision = self.vision_inputs(processor, vision_items(conversations), min_pixels, max_pixels)
        return processor(text=prompts, padding=True, return_tensors="pt", **vision)

    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        """The processor's keyword arguments for the image (and video) entries ``items`` of a batch."""
        images = [item["image"] for item in items if item["type"] == "image"]
        return {"images": images or None}


def vision_items(conversations: list[list[dict]]) -> list[dict]:
    """The image and video entries of the conversations, in order."""
    return [
        item
        for chat in conversations
        for message in chat
        if not isinstance(message["content"], str)
        for item in message["content"]
        if item["type"] in ("image", "video")
    ]


def chat_prompts(processor: ProcessorMixin, conversations: list[list[dict]]) -> list[str]:
    """The prompt text of each conversation, by the checkpoint's chat template, ready for the assistant's answer."""
    return [processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in conversations]


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def model_types_with(capability: str) -> list[str]:
    """The supported model types whose adapter has ``capability`` (a bool field: ``video``, ``pixel_limits``)."""
    return sorted(model_type for model_type, adapter in _REGISTRY.items() if getattr(adapter, capability))


def adapter_for(model: nn.Module | PretrainedConfig) -> ModelAdapter:
    """The adapter of a model (or config), by ``model_type``; ``ValueError`` for an unsupported model."""
    model_type = getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"DASH does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]


# Imported for their registrations.
from dash_vlm.models import llava, qwen2_vl, text  # noqa: E402, F401
