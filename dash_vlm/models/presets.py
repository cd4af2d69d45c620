"""Real model shapes with random weights, built on the target device in seconds (no download), and their inputs.

The speed harness (``dash_vlm.bench``) measures these: speed depends on shapes, not on trained weights. ``tiny`` is a
small Qwen2-VL that runs on a CPU in seconds, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
LLAMA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
LLAVA_7B = dict(  # Vicuna-7B (a Llama-7B) behind CLIP ViT-L/14-336, as llava-hf's 7B checkpoints
    text_config=dict(LLAMA_7B, model_type="llama"),
    vision_config=dict(CLIP_L_336, model_type="clip_vision_model"),
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)


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


QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2)


@dataclass(frozen=True)
class Preset:
    """A model shape: its family, its config, and whether images keep their side (``dynamic_resolution``)."""

    name: str
    family: str
    config: dict
    dynamic_resolution: bool = True
    text_ids: tuple[int, int] = (1000, 20000)  # range of the random text token ids, clear of special tokens

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
        from transformers import (
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
        )

        if self.family == "tiny":
            from dash_vlm.models.tiny import tiny_qwen_vl

            overrides = {"num_hidden_layers": layers} if layers else {}
            return tiny_qwen_vl(attn_implementation=attn_implementation, **overrides).to(device, dtype)
        config_class, model_class = {
            "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
            "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
            "llava": (LlavaConfig, LlavaForConditionalGeneration),
            "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
        }[self.family]
        settings = {**self.config, "text_config": dict(self.config["text_config"])}
        settings["vision_config"] = dict(self.config["vision_config"])
        if layers:
            settings["text_config"]["num_hidden_layers"] = layers
        if vision_layers:
            depth = "depth" if "depth" in settings["vision_config"] else "num_hidden_layers"
            settings["vision_config"][depth] = vision_layers
            if "fullatt_block_indexes" in settings["vision_config"]:
                settings["vision_config"]["fullatt_block_indexes"] = [vision_layers - 1]
        config = config_class(**settings)
        config._attn_implementation = attn_implementation
        with torch.device(device):
            return model_class._from_config(config, dtype=dtype).eval()

    def inputs(self, image_side: int, text_tokens: int = 64, seed: int = 0) -> dict:
        """One prompt: ``text_tokens / 2`` random text tokens, one random image of ``image_side`` pixels (ignored by
        fixed-resolution models), the rest of the text; the model's own image processor makes the pixel inputs."""
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
        pixels, image_tokens, ids = self._vision(image)
        head, tail = (
            rng.integers(*self.text_ids, text_tokens // 2),
            rng.integers(*self.text_ids, text_tokens - text_tokens // 2),
        )
        input_ids = torch.tensor([[*head, *ids(image_tokens), *tail]])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}

    def _vision(self, image: Image.Image):
        if self.family in ("qwen2_vl", "qwen2_5_vl", "tiny"):
            from transformers import Qwen2VLImageProcessorFast

            patch = 4 if self.family == "tiny" else 14
            processor = Qwen2VLImageProcessorFast(patch_size=patch, merge_size=2, min_pixels=64, max_pixels=4096 * 4096)
            pixels = dict(processor(images=[image], return_tensors="pt"))
            ids = self.token_ids()
            count = int(pixels["image_grid_thw"].prod()) // 4
            return (
                pixels,
                count,
                lambda n: [ids["vision_start_token_id"], *[ids["image_token_id"]] * n, ids["vision_end_token_id"]],
            )
        from transformers import CLIPImageProcessorFast, LlavaNextImageProcessorFast

        side = {"shortest_edge": 336}, {"height": 336, "width": 336}
        image_token = self.config["image_token_index"]
        if self.family == "llava":
            pixels = dict(CLIPImageProcessorFast(size=side[0], crop_size=side[1])(images=[image], return_tensors="pt"))
            return pixels, 576, lambda n: [image_token] * n
        processor = LlavaNextImageProcessorFast(size=side[0], crop_size=side[1], image_grid_pinpoints=NEXT_PINPOINTS)
        pixels = dict(processor(images=[image], return_tensors="pt"))
        return pixels, self._next_features(image), lambda n: [image_token] * n

    @staticmethod
    def _next_features(image: Image.Image) -> int:
        """LLaVA-NeXT's image token count for ``image`` (anyres grid, unpadded, newline tokens), by its processor."""
        from transformers import LlavaNextImageProcessorFast, LlavaNextProcessor

        from dash_vlm.models.tiny import LLAVA_SPECIAL_TOKENS, word_tokenizer

        processor = LlavaNextProcessor(
            LlavaNextImageProcessorFast(
                size={"shortest_edge": 336},
                crop_size={"height": 336, "width": 336},
                image_grid_pinpoints=NEXT_PINPOINTS,
            ),
            word_tokenizer([], LLAVA_SPECIAL_TOKENS),
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        ids = processor(text=["<image>"], images=[image], return_tensors="pt")["input_ids"]
        return int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())

    def token_ids(self) -> dict:
        if self.family == "tiny":
            from dash_vlm.models import tiny

            return dict(
                image_token_id=tiny.IMAGE_TOKEN,
                vision_start_token_id=tiny.VISION_START,
                vision_end_token_id=tiny.VISION_END,
            )
        return QWEN_IDS


def qwen2_vl_preset(name: str, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> Preset:
    """A Qwen2-VL size: its decoder, and the shared 32-layer vision tower merging into the decoder's width."""
    text = qwen2_vl_text(hidden, heads, kv_heads, ffn, vocab)
    return Preset(
        name, "qwen2_vl", dict(text_config=text, vision_config=QWEN2_VL_VISION | {"hidden_size": hidden}, **QWEN_IDS)
    )


PRESETS = {
    preset.name: preset
    for preset in (
        qwen2_vl_preset("qwen2-vl-2b", hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936),
        qwen2_vl_preset("qwen2-vl-7b", hidden=3584, heads=28, kv_heads=4, ffn=18944, vocab=152064),
        Preset(
            "qwen2.5-vl-7b",
            "qwen2_5_vl",
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
        ),
        Preset("llava-1.5-7b", "llava", LLAVA_7B | {"image_seq_length": 576}, dynamic_resolution=False),
        Preset("llava-next-7b", "llava_next", LLAVA_7B | {"image_grid_pinpoints": NEXT_PINPOINTS}),
        Preset("tiny", "tiny", {}, text_ids=(2, 100)),
    )
}
