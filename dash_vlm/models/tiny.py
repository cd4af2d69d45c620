"""Tiny models built from config with random weights and hand-built multimodal inputs: the demo and the tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
EOS = 127
PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)


def tiny_qwen_vl(
    family: str = "qwen2_vl",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    **text_overrides,
) -> torch.nn.Module:
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
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(vision, embed_dim=vision_width, hidden_size=text["hidden_size"], mlp_ratio=2),
            **ids,
        )
        model_class = Qwen2VLForConditionalGeneration
    else:
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(
                vision,
                hidden_size=vision_width,
                out_hidden_size=text["hidden_size"],
                intermediate_size=2 * vision_width,
                window_size=16,
                fullatt_block_indexes=[vision_layers - 1],
            ),
            **ids,
        )
        model_class = Qwen2_5_VLForConditionalGeneration
    config._attn_implementation = attn_implementation
    return model_class(config).eval()


TEXT_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_text_model(model_type: str = "llama", attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A 5-layer text decoder of one of the families kvpress supports, float32, eval mode."""
    torch.manual_seed(seed)
    config_class, model_class = TEXT_MODELS[model_type]
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    config = config_class(**TEXT, **extra)
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
    grids: list[tuple[int, int, int]], text_lengths: list[int], video: bool = False, seed: int = 0
) -> dict:
    """One prompt: text chunks interleaved with images (or videos). ``len(text_lengths) == len(grids) + 1``."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    pixels = []
    for i, length in enumerate(text_lengths):
        ids += torch.randint(1, 100, (length,), generator=generator).tolist()
        if i < len(grids):
            block, patch = vision_block(grids[i], video, seed=seed * 7 + i)
            ids += block
            pixels.append(patch)
    key = "video" if video else "image"
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        f"pixel_values{'_videos' if video else ''}": torch.cat(pixels),
        f"{key}_grid_thw": torch.tensor(grids),
    }


def left_pad_batch(samples: list[dict], pad_id: int = 0) -> dict:
    """Stack single-prompt inputs into a left-padded batch (pixel tensors and grids concatenate)."""
    length = max(sample["input_ids"].shape[1] for sample in samples)
    batch: dict = {"input_ids": [], "attention_mask": []}
    for sample in samples:
        pad = length - sample["input_ids"].shape[1]
        batch["input_ids"].append(torch.cat([torch.full((1, pad), pad_id), sample["input_ids"]], dim=1))
        batch["attention_mask"].append(torch.cat([torch.zeros(1, pad, dtype=torch.long), sample["attention_mask"]], 1))
    batch = {key: torch.cat(value) for key, value in batch.items()}
    for key in samples[0]:
        if key not in batch:
            batch[key] = torch.cat([sample[key] for sample in samples])
    return batch


def text_sample(length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (1, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_tokenizer():
    """An offline word-level tokenizer of the tiny vocabulary: words ``w2 .. w126``, 0 pads, 1 starts, 127 ends,
    ``<image>`` is 120."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(2, EOS) if i != IMAGE_TOKEN}
    vocab = words | {"<pad>": 0, "<s>": 1, "</s>": EOS, "<image>": IMAGE_TOKEN}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
        model_max_length=512,
        extra_special_tokens={"image_token": "<image>"},
    )


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
) -> torch.nn.Module:
    """A LLaVA-1.5 (or LLaVA-NeXT) with a 2-layer CLIP tower on 32 px images and a 5-layer Llama, float32.

    ``text_overrides`` replace entries of the decoder config ``TEXT``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

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


def tiny_llava_processor(next_version: bool = False, tokenizer=None, image_side: int = LLAVA_IMAGE_SIDE):
    """The real LLaVA (or LLaVA-NeXT anyres) processor class, with ``tokenizer`` (default: the tiny tokenizer)."""
    from transformers import (
        CLIPImageProcessorFast,
        LlavaNextImageProcessorFast,
        LlavaNextProcessor,
        LlavaProcessor,
    )

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


# The chat templates of the Qwen/Qwen2-VL-7B-Instruct and llava-hf/llava-1.5-7b-hf checkpoints.
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
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
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
LLAVA_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "image_token": "<image>"}
CHAT_WORDS = "system you are a helpful assistant user picture video : . , ? !".split()


def word_tokenizer(
    words: list[str], special_tokens: dict[str, str], chat_template: str | None = None, prepend_bos: bool = False
):
    """An offline, lower-casing word-level tokenizer: the special tokens get ids ``0..``, then ``<unk>``, the words.

    ``special_tokens`` maps roles to tokens: ``pad_token``, ``bos_token``, ``eos_token`` and any extra named tokens
    (``image_token`` ...), which the tokenizer exposes as attributes the way HF processors expect. With
    ``prepend_bos`` every encoded text starts with the BOS token, as Llama's tokenizer does.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(special_tokens.values()))
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, "<unk>", *(w.lower() for w in words)]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if prepend_bos:
        bos = special_tokens["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    standard = ("pad_token", "bos_token", "eos_token")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        model_max_length=4096,
        chat_template=chat_template,
        extra_special_tokens={role: token for role, token in special_tokens.items() if role not in standard},
        **{role: special_tokens[role] for role in standard},
    )


def tiny_checkpoint(
    family: str,
    words: list[str] = (),
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    llava_image_side: int = LLAVA_IMAGE_SIDE,
    **text_overrides,
):
    """A random tiny VLM of ``family`` (``qwen2_vl``, ``qwen2_5_vl``, ``llava``, ``llava_next``) with its real processor
    class, an offline word-level tokenizer over ``CHAT_WORDS + words`` and the checkpoint family's chat template.

    ``text_overrides`` replace entries of the decoder config ``TEXT``. Returns ``(model, processor)``, ready for
    ``save_pretrained`` and ``DashVLM.from_pretrained``.
    """
    vision = dict(vision_layers=vision_layers, vision_width=vision_width)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        tokenizer = word_tokenizer([*CHAT_WORDS, *words], QWEN_VL_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE)
        ids = {name: tokenizer.convert_tokens_to_ids(QWEN_VL_SPECIAL_TOKENS[role]) for role, name in _QWEN_ID_NAMES}
        model = tiny_qwen_vl(family, seed=seed, vocab_size=len(tokenizer), **vision, **ids, **text_overrides)
        return model, tiny_qwen_vl_processor(tokenizer)
    if family in ("llava", "llava_next"):
        tokenizer = word_tokenizer([*CHAT_WORDS, *words], LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, prepend_bos=True)
        ids = {name: tokenizer.convert_tokens_to_ids(LLAVA_SPECIAL_TOKENS[role]) for role, name in _LLAVA_ID_NAMES}
        next_version = family == "llava_next"
        model = tiny_llava(
            next_version,
            seed=seed,
            vocab_size=len(tokenizer),
            image_side=llava_image_side,
            **vision,
            **ids,
            **text_overrides,
        )
        return model, tiny_llava_processor(next_version, tokenizer, llava_image_side)
    raise ValueError(f"family must be one of qwen2_vl, qwen2_5_vl, llava, llava_next; got {family!r}")


_COMMON_ID_NAMES = (("pad_token", "pad_token_id"), ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"))
_QWEN_ID_NAMES = (
    *_COMMON_ID_NAMES,
    ("image_token", "image_token_id"),
    ("video_token", "video_token_id"),
    ("vision_start_token", "vision_start_token_id"),
    ("vision_end_token", "vision_end_token_id"),
)
_LLAVA_ID_NAMES = (*_COMMON_ID_NAMES, ("image_token", "image_token_id"))


def tiny_qwen_vl_processor(tokenizer, min_pixels: int = 16 * 16, max_pixels: int = 128 * 128):
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
