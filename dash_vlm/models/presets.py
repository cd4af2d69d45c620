"""Real model shapes with random weights, built on the target device in seconds (no download), and their inputs.

The speed harness (``dash_vlm.bench``) measures these: speed depends on shapes, not on trained weights. Each family
module defines its presets (a :class:`Preset` subclass says how the family builds a model and turns an image into
inputs) and registers them with its adapter; ``PRESETS`` holds them all by name, ``tiny`` among them (a small
Qwen2-VL that runs on a CPU in seconds, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, ProcessorMixin


@dataclass(frozen=True)
class Preset:
    """A model shape: its config (``text_config`` and ``vision_config`` among the entries) and whether images keep
    their side (``dynamic_resolution``); a family subclass gives :meth:`model_classes` and :meth:`image_inputs`."""

    name: str
    config: dict
    dynamic_resolution: bool = True
    text_ids: tuple[int, int] = (1000, 20000)  # range of the random text token ids, clear of special tokens
    special_tokens: ClassVar[dict[str, str]] = {}  # the family's special tokens by role, for offline tokenizers
    chat_template: ClassVar[str | None] = None
    prepend_bos: ClassVar[bool] = False

    def build(
        self,
        device: str | torch.device,
        dtype: torch.dtype,
        attn_implementation: str = "sdpa",
        layers: int | None = None,
        vision_layers: int | None = None,
    ) -> torch.nn.Module:
        """The model with random weights, created directly on ``device``, in eval mode; ``layers`` and
        ``vision_layers`` shorten the decoder and the vision tower (real widths, fewer layers)."""
        settings = {**self.config, "text_config": dict(self.config["text_config"])}
        settings["vision_config"] = dict(self.config["vision_config"])
        if layers:
            self.shorten_decoder(settings["text_config"], layers)
        if vision_layers:
            self.shorten_vision(settings["vision_config"], vision_layers)
        config_class, model_class = self.model_classes()
        config = config_class(**settings)
        config._attn_implementation = attn_implementation
        with torch.device(device):
            return model_class._from_config(config, dtype=dtype).eval()

    def inputs(self, image_side: int, text_tokens: int = 64, seed: int = 0, frames: int = 0) -> dict:
        """One prompt: ``text_tokens / 2`` random text tokens, one random image of ``image_side`` pixels (ignored by
        fixed-resolution models) or, with ``frames``, a random video of that many frames of that side, the rest of the
        text; the model's own image (video) processor makes the pixel inputs."""
        rng = np.random.default_rng(seed)
        if frames:
            pixels, image_ids = self.video_inputs(rng.integers(0, 256, (frames, image_side, image_side, 3), np.uint8))
        else:
            image = Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
            pixels, image_ids = self.image_inputs(image)
        head, tail = (
            rng.integers(*self.text_ids, text_tokens // 2),
            rng.integers(*self.text_ids, text_tokens - text_tokens // 2),
        )
        input_ids = torch.tensor([[*head, *image_ids, *tail]])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}

    def checkpoint(
        self, device: str | torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"
    ) -> tuple[torch.nn.Module, ProcessorMixin]:
        """The model with random weights and its real processor class over an offline word-level tokenizer that fills
        the vocabulary (so every generated id decodes to a word); the config's special token ids are the tokenizer's.
        Ready for ``save_pretrained`` and ``DashVLM.from_pretrained`` (the multi-GPU test scripts use it)."""
        from dash_vlm.models.tiny import CHAT_WORDS, special_token_ids, word_tokenizer

        model = self.build(device, dtype, attn_implementation)
        vocab_size = model.config.text_config.vocab_size
        fillers = vocab_size - len(set(self.special_tokens.values())) - 1 - len(CHAT_WORDS)  # 1: the unknown token
        words = [*CHAT_WORDS, *(f"w{i}" for i in range(fillers))]
        tokenizer = word_tokenizer(words, self.special_tokens, self.chat_template, prepend_bos=self.prepend_bos)
        for name, token_id in special_token_ids(tokenizer, self.special_tokens).items():
            if hasattr(model.config, name):
                setattr(model.config, name, token_id)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, self.processor(tokenizer)

    def model_classes(self) -> tuple[type, type]:
        """The transformers config class and model class."""
        raise NotImplementedError

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        """The family's real processor class at this shape's image sizes, around ``tokenizer``."""
        raise NotImplementedError

    def shorten_decoder(self, text_config: dict, layers: int) -> None:
        """Keep the first ``layers`` decoder layers (``build(layers=...)``)."""
        text_config["num_hidden_layers"] = layers
        if "layer_types" in text_config:  # a hybrid or sliding-window layout: the first layers' kinds
            text_config["layer_types"] = text_config["layer_types"][:layers]

    def shorten_vision(self, vision_config: dict, blocks: int) -> None:
        """Make ``vision_config`` a tower of ``blocks`` blocks."""
        vision_config["num_hidden_layers"] = blocks

    def image_inputs(self, image: Image.Image) -> tuple[dict, list[int]]:
        """The image processor's outputs for ``image``, and the prompt token ids that stand for the image."""
        raise NotImplementedError

    def video_inputs(self, video: np.ndarray) -> tuple[dict, list[int]]:
        """The video processor's outputs for ``video`` (``[frames, height, width, 3]``, every frame kept), and the
        prompt token ids that stand for it; only for families that take video."""
        raise NotImplementedError(f"preset {self.name!r} takes no video")


PRESETS: dict[str, Preset] = {}  # filled by dash_vlm.models.register_adapter with every family's presets
