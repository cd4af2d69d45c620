"""LLaVA-1.5 and LLaVA-NeXT: every position the processor filled with image features is eligible.

The family's tiny test models, its speed presets (``llava-1.5-7b``, ``llava-next-7b``) and its lmms-eval prompt rule
live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorFast,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorFast,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from dash_vlm.models import ModelAdapter, TokenGrid, in_prompt_order, item_positions, register_adapter, rgb_pixels
from dash_vlm.models.presets import Preset
from dash_vlm.models.tiny import IMAGE_TOKEN, TEXT, special_token_ids, tiny_tokenizer, word_tokenizer

# lmms-eval's llava_hf fallback template (lmms_eval/models/simple/llava_hf.py), written out because importing that
# module needs decord, which lmms-eval does not install.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class LlavaAdapter(ModelAdapter):
    def lmms_conversation(
        self, context: str, visuals: list, processor: ProcessorMixin
    ) -> tuple[list[dict], str | None]:
        """As lmms-eval's ``llava_hf``: ``<image>`` tags before the text (unless it has them), one user message
        rendered by the tokenizer's chat template, or lmms-eval's Vicuna template when the tokenizer has none."""
        if visuals and "<image>" not in context:
            context = " ".join(["<image>"] * len(visuals)) + "\n" + context
        tokenizer = processor.tokenizer
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": context}],
            chat_template=tokenizer.chat_template or VICUNA_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        content = [{"type": "image", "image": visual} for visual in visuals] + [{"type": "text", "text": context}]
        return [{"role": "user", "content": content}], prompt

    def _views(self, config, inputs: dict):
        """Per image: its sample, its index, and each of its views as (token positions ``[rows, cols]``, the tiles'
        grid and the view's first canvas cell for the tiled view, ``None`` for the base view)."""
        if inputs.get("pixel_values") is None:
            return
        side = config.vision_config.image_size // config.vision_config.patch_size
        counts, tiled = [side * side] * len(inputs["pixel_values"]), []
        if config.model_type == "llava_next":
            for image_size in inputs["image_sizes"].tolist():
                rows, columns = get_anyres_image_grid_shape(
                    image_size, config.image_grid_pinpoints, config.vision_config.image_size
                )
                canvas = torch.arange(rows * side * columns * side).view(1, rows * side, columns * side)
                cells = unpad_image(canvas, image_size)[0]  # the canvas cells the model keeps, as it cuts them
                counts[len(tiled)] += cells.shape[0] * (cells.shape[1] + 1)  # each row ends in a newline token
                # An image so thin that unpadding keeps no cell has no tiled view (a tall one keeps its newlines).
                tiled.append(
                    (rows, columns, divmod(int(cells[0, 0]), columns * side), cells.shape) if cells.numel() else None
                )
        owners = item_positions(inputs["input_ids"] == config.image_token_id, counts)
        for image, (sample, positions) in enumerate(owners):
            views = [(positions[: side * side].view(side, side), None)]
            if tiled and tiled[image] is not None:
                rows, columns, corner, (height, width) = tiled[image]
                grid = positions[side * side :].view(height, width + 1)[:, :-1]  # without the row-end newlines
                views.append((grid, (rows, columns, corner)))
            yield sample, image, views

    def token_positions(self, config, inputs: dict) -> list[list[torch.Tensor]]:
        """LLaVA-1.5: each image's square patch grid. LLaVA-NeXT: each image's base grid and unpadded tiled grid."""
        positions = [[] for _ in inputs["input_ids"]]
        for sample, _, views in self._views(config, inputs):
            positions[sample] += [grid for grid, _ in views]
        return positions

    def token_grids(self, config, processor: ProcessorMixin, inputs: dict) -> list[list[TokenGrid]]:
        """LLaVA-1.5: one view per image, its square grid of patches. LLaVA-NeXT: the base view (the whole image at
        the tower's resolution), then the tiled view: the tiles at the best resolution, cut back to the image's own
        aspect as the model unpads them; the newline token ending each of its rows belongs to no cell."""
        patch = config.vision_config.patch_size
        views = [[] for _ in inputs["input_ids"]]
        items = [[] for _ in views]
        for sample, image, image_views in self._views(config, inputs):
            pixels = inputs["pixel_values"][image]
            for grid, tiles in image_views:
                if tiles is None:
                    picture = pixels[0] if pixels.ndim == 4 else pixels
                else:
                    rows, columns, (top, left) = tiles
                    canvas = pixels[1 : 1 + rows * columns].unflatten(0, (rows, columns))
                    canvas = canvas.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)
                    height, width = grid.shape
                    picture = canvas[:, top * patch : (top + height) * patch, left * patch : (left + width) * patch]
                views[sample].append((rgb_pixels(picture, processor.image_processor), grid))
                items[sample].append(image)
        return [in_prompt_order(v, i) for v, i in zip(views, items, strict=True)]

    def tiny_model(self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2) -> PreTrainedModel:
        return tiny_llava(model_type == "llava_next", attn_implementation, vision_layers=vision_layers)

    def tiny_inputs(self, model_type: str) -> dict[str, dict]:
        return {
            "image": llava_inputs(model_type, ["w5 w6 w7 <image> w8 w9 w10 w11"], [[random_image(40, 90, 1)]]),
            "images": llava_inputs(
                model_type, ["w3 <image> w4 w5 <image> w9 w10"], [[random_image(64, 64, 2), random_image(50, 30, 3)]]
            ),
        }

    def tiny_batch(self, model_type: str) -> tuple[dict, list[dict]]:
        prompts = ["w5 w6 <image> w7 w8 w9", "w9 <image> w10", "w11 w12 w13 w14 <image> w15 w16"]
        images = [[random_image(40, 90, 4)], [random_image(64, 64, 5)], [random_image(90, 40, 6)]]
        singles = [llava_inputs(model_type, [p], [i]) for p, i in zip(prompts, images, strict=True)]
        return llava_inputs(model_type, prompts, images), singles

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
        tokenizer = word_tokenizer(words, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, prepend_bos=True)
        next_version = model_type == "llava_next"
        model = tiny_llava(
            next_version,
            seed=seed,
            vocab_size=len(tokenizer),
            image_side=image_side,
            vision_layers=vision_layers,
            vision_width=vision_width,
            **special_token_ids(tokenizer, LLAVA_SPECIAL_TOKENS),
            **text_overrides,
        )
        return model, tiny_llava_processor(next_version, tokenizer, image_side)


# Tiny models: a 2-layer CLIP tower on 32 px images in 8 px patches.
LLAVA_IMAGE_SIDE, LLAVA_PATCH = 32, 8
LLAVA_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava(
    next_version: bool = False,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_token_id: int = IMAGE_TOKEN,
    vision_layers: int = 2,
    vision_width: int = 32,
    image_side: int = LLAVA_IMAGE_SIDE,
    **text_overrides,
) -> PreTrainedModel:
    """A LLaVA-1.5 (or LLaVA-NeXT) with a 2-layer CLIP tower on 32 px images and a 5-layer Llama, float32.

    ``text_overrides`` replace entries of the decoder config ``TEXT``.
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=image_side,
        patch_size=LLAVA_PATCH,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        projection_dim=vision_width,
    )
    text = LlamaConfig(**(TEXT | text_overrides))
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(image_side // LLAVA_PATCH) ** 2,
    )
    if next_version:
        config = LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_PINPOINTS)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


def tiny_llava_processor(
    next_version: bool = False, tokenizer: PreTrainedTokenizerFast | None = None, image_side: int = LLAVA_IMAGE_SIDE
) -> ProcessorMixin:
    """The real LLaVA (or LLaVA-NeXT anyres) processor class, with ``tokenizer`` (default: the tiny tokenizer)."""
    sizes = dict(size={"shortest_edge": image_side}, crop_size={"height": image_side, "width": image_side})
    common = dict(
        tokenizer=tokenizer or tiny_tokenizer(),
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    if getattr(common["tokenizer"], "chat_template", None):
        common["chat_template"] = common["tokenizer"].chat_template
    if next_version:
        return LlavaNextProcessor(LlavaNextImageProcessorFast(**sizes, image_grid_pinpoints=LLAVA_PINPOINTS), **common)
    return LlavaProcessor(CLIPImageProcessorFast(**sizes), **common)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def llava_inputs(model_type: str, prompts: list[str], images: list[list[Image.Image]]) -> dict:
    """A left-padded batch of the tiny tokenizer's prompts (``<image>`` tags) and their images, by the real
    processor of ``model_type``."""
    processor = tiny_llava_processor(model_type == "llava_next")
    flat = [image for sample in images for image in sample]
    return dict(processor(text=prompts, images=flat, return_tensors="pt", padding=True, padding_side="left"))


# The chat template of the llava-hf/llava-1.5-7b-hf checkpoint.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "image_token": "<image>"}


# Speed presets: Vicuna-7B (a Llama-7B) behind CLIP ViT-L/14-336, as llava-hf's 7B checkpoints, random weights.
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
LLAVA_7B = dict(
    text_config=dict(LLAMA_7B, model_type="llama"),
    vision_config=dict(CLIP_L_336, model_type="clip_vision_model"),
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)
CLIP_SIZES = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
REAL_PROCESSOR_SETTINGS = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


@dataclass(frozen=True)
class LlavaFamilyPreset(Preset):
    """A shape of the LLaVA family: a Llama tokenizer's special tokens and the llava-hf chat template."""

    special_tokens: ClassVar[dict[str, str]] = LLAVA_SPECIAL_TOKENS
    chat_template: ClassVar[str] = LLAVA_CHAT_TEMPLATE
    prepend_bos: ClassVar[bool] = True


@dataclass(frozen=True)
class LlavaPreset(LlavaFamilyPreset):
    """A LLaVA-1.5 shape: every image is resized to the tower's 336 px and fills ``image_seq_length`` tokens."""

    def model_classes(self) -> tuple[type, type]:
        return LlavaConfig, LlavaForConditionalGeneration

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        return LlavaProcessor(CLIPImageProcessorFast(**CLIP_SIZES), tokenizer, **REAL_PROCESSOR_SETTINGS)

    def image_inputs(self, image: Image.Image) -> tuple[dict, list[int]]:
        pixels = dict(CLIPImageProcessorFast(**CLIP_SIZES)(images=[image], return_tensors="pt"))
        return pixels, [self.config["image_token_index"]] * self.config["image_seq_length"]


@dataclass(frozen=True)
class LlavaNextPreset(LlavaFamilyPreset):
    """A LLaVA-NeXT shape: anyres tiles, so the token count follows the image's side."""

    def model_classes(self) -> tuple[type, type]:
        return LlavaNextConfig, LlavaNextForConditionalGeneration

    def processor(self, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
        image_processor = LlavaNextImageProcessorFast(**CLIP_SIZES, image_grid_pinpoints=NEXT_PINPOINTS)
        return LlavaNextProcessor(image_processor, tokenizer, **REAL_PROCESSOR_SETTINGS)

    def image_inputs(self, image: Image.Image) -> tuple[dict, list[int]]:
        processor = self.processor(word_tokenizer([], LLAVA_SPECIAL_TOKENS))
        pixels = dict(processor.image_processor(images=[image], return_tensors="pt"))
        # The count of image tokens (anyres grid, unpadded, newline tokens) as LLaVA-NeXT's processor makes it.
        ids = processor(text=["<image>"], images=[image], return_tensors="pt")["input_ids"]
        count = int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
        return pixels, [self.config["image_token_index"]] * count


LLAVA = register_adapter(
    LlavaAdapter(
        model_types=("llava", "llava_next"),
        vision_token_attributes=("image_token_id",),
        vision_tower_attribute="vision_tower",
        vision_blocks_path="vision_model.encoder.layers",
        presets=(
            LlavaPreset("llava-1.5-7b", LLAVA_7B | {"image_seq_length": 576}, dynamic_resolution=False),
            LlavaNextPreset("llava-next-7b", LLAVA_7B | {"image_grid_pinpoints": NEXT_PINPOINTS}),
        ),
    )
)
