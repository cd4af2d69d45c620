"""What the tiny test models of every family share: the decoder config, the vocabulary, offline tokenizers, batching.

Each family module builds its own tiny models and inputs on these (``adapter.tiny_model``, ``adapter.tiny_inputs``,
``adapter.tiny_checkpoint``); they run on a CPU in seconds, for the demo and the tests.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from dash_vlm.models import adapter_for, model_types_with

VOCAB = 128
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123
EOS = 127
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
CHAT_WORDS = "system you are a helpful assistant user picture video : . , ? !".split()


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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer of the tiny vocabulary: words ``w2 .. w126``, 0 pads, 1 starts, 127 ends,
    ``<image>`` is 120."""
    from tokenizers import Tokenizer, models, pre_tokenizers

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


def word_tokenizer(
    words: list[str], special_tokens: dict[str, str], chat_template: str | None = None, prepend_bos: bool = False
) -> PreTrainedTokenizerFast:
    """An offline, lower-casing word-level tokenizer: the special tokens get ids ``0..``, then ``<unk>``, the words.

    ``special_tokens`` maps roles to tokens: ``pad_token``, ``bos_token``, ``eos_token`` and any extra named tokens
    (``image_token`` ...), which the tokenizer exposes as attributes the way HF processors expect. With
    ``prepend_bos`` every encoded text starts with the BOS token, as Llama's tokenizer does.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

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


def special_token_ids(tokenizer: PreTrainedTokenizerFast, special_tokens: dict[str, str]) -> dict[str, int]:
    """The config entries of ``word_tokenizer``'s special tokens: ``{"<role>_id": id}`` (``image_token_id`` ...)."""
    return {f"{role}_id": tokenizer.convert_tokens_to_ids(token) for role, token in special_tokens.items()}


def tiny_checkpoint(
    family: str,
    words: list[str] = (),
    seed: int = 0,
    vision_layers: int = 2,
    vision_width: int = 32,
    image_side: int = 32,
    **text_overrides,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random tiny VLM of the model type ``family`` with its real processor class, an offline word-level tokenizer
    over ``CHAT_WORDS + words`` and the checkpoint family's chat template.

    ``image_side`` is the input side of a fixed-resolution vision tower (LLaVA's CLIP); dynamic-resolution families
    ignore it. ``text_overrides`` replace entries of the decoder config ``TEXT``. Returns ``(model, processor)``,
    ready for ``save_pretrained`` and ``DashVLM.from_pretrained``.
    """
    if family not in model_types_with("is_vision_language"):
        raise ValueError(f"family must be one of {', '.join(model_types_with('is_vision_language'))}; got {family!r}")
    return adapter_for(family).tiny_checkpoint(
        family, [*CHAT_WORDS, *words], seed, vision_layers, vision_width, image_side, **text_overrides
    )
