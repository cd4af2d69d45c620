"""Model-family adapters: the only place that knows about model families.

A family is one module here (``qwen2_vl.py``, ``llava.py``, ``text.py``) that registers its adapter. The adapter tells
the press where the module that runs a whole prefill is (it sees ``input_ids``), where its insertion points are (the
decoder layers, the final norm, the vision blocks), and which token ids are vision placeholders; everything else
(M-RoPE or 1-D positions, GQA, masks) is handled generically because it reaches the decoder layers as ordinary
tensors. The adapter also carries what the rest of the project needs of the family: its processor inputs, its
tiny test models and inputs, its real-shape speed presets, and its lmms-eval prompt rule.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dash_vlm.models.presets import PRESETS, Preset


@dataclass(frozen=True, eq=False)
class TokenGrid:
    """One view of an image (or of a video frame group) as the decoder sees it: the picture its vision tower was given
    and the decoder token of each cell of a grid laid over that picture.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``[height, width, 3]`` uint8, the processor's pixels, de-normalised: the image as the model saw it.
    positions : torch.Tensor
        ``[rows, cols]`` long, the prompt position of the token of each cell; cells are ``height / rows`` by
        ``width / cols`` pixels, in raster order.
    item : int
        Which image or video frame group of its sample the view shows, in prompt order (LLaVA-NeXT shows each image
        twice: its base view and its tiled view).
    patches : torch.Tensor, optional
        ``[rows * k, cols * k]`` long, for a family whose vision tower halts (DESIGN.md section 6): the index of each
        tower patch among its sample's patches (``PrefillStats.vision_halted_patches`` counts the same way); a
        token's cell holds ``k x k`` patches.
    """

    pixels: np.ndarray
    positions: torch.Tensor
    item: int
    patches: torch.Tensor | None = None


def rgb_pixels(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """``[3, height, width]`` processor pixels back to ``[height, width, 3]`` uint8, undoing its normalisation."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
    values = (pixels.detach().float().cpu() * std + mean).clamp(0, 1)
    return (values * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def item_positions(is_token: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """The sample and the prompt positions of each vision item (image or video), from the ``[batch, tokens]`` mask of
    its kind of placeholder and the number of placeholders of each item, items in the processor's order (sample by
    sample, in prompt order)."""
    per_sample = [row.nonzero()[:, 0] for row in is_token.cpu()]
    if sum(counts) != sum(len(positions) for positions in per_sample):
        raise ValueError(f"the inputs hold {sum(map(len, per_sample))} placeholders, their items {sum(counts)}")
    items, sample, used = [], 0, 0
    for count in counts:
        while used == len(per_sample[sample]):
            sample, used = sample + 1, 0
        items.append((sample, per_sample[sample][used : used + count]))
        used += count
    return items


def in_prompt_order(views: list[tuple], items: list[int] | None = None) -> list[TokenGrid]:
    """Views (pixels, positions and optionally patches, as :class:`TokenGrid` takes them) as token grids sorted by
    prompt position, each numbered by its item: ``items`` gives the item of each view (views of one item share it),
    by default one item per view."""
    items = list(range(len(views))) if items is None else items
    order = sorted(range(len(views)), key=lambda view: int(views[view][1].min()))
    numbers = {item: number for number, item in enumerate(dict.fromkeys(items[view] for view in order))}
    return [TokenGrid(views[view][0], views[view][1], numbers[items[view]], *views[view][2:]) for view in order]


@dataclass(frozen=True)
class DecoderAdditions:
    """What a decoder adds to its hidden states between layers (Qwen3-VL's DeepStack): after layer ``i``, ``values[i]``
    (``[rows, hidden]``) is added at the ``True`` positions of ``positions`` (``[batch, tokens]``), in row-major order.
    """

    positions: torch.Tensor
    values: list[torch.Tensor]


@dataclass(frozen=True)
class ModelAdapter:
    """Layout of one model family.

    Parameters
    ----------
    model_types : tuple of str
        The ``config.model_type`` values this adapter serves.
    vision_token_attributes : tuple of str
        Config attributes holding the ids of the vision placeholder tokens, in the order the model runs its vision
        tower over them (images, then videos); empty for a text-only model.
    video : bool
        Whether the family takes video input.
    pixel_limits : bool
        Whether its processor resizes images to a pixel budget (``min_pixels`` / ``max_pixels``).
    vision_tower_attribute : str, optional
        Attribute of the prefill module that holds the vision tower (the speed harness times it).
    vision_blocks_path : str, optional
        Dotted path, from the vision tower, of its list of transformer blocks.
    halts_in_vision_tower : bool
        Whether the vision tower is a halting site (``vision_compression_ratio``, DESIGN.md section 6); such a
        family gives :meth:`vision_segments` and :meth:`vision_patches_per_token`.
    vision_attention_attribute : str
        Attribute of a vision block that holds its attention sublayer.
    vision_packs_segments : bool
        Whether the vision tower packs its segments (images, windows) into one sequence with ``cu_seqlens``, so that
        its attention can run them in one call (``attention.VARLEN_SDPA``).
    vision_grid_keys : tuple of str
        The inputs holding the grids the vision tower derives its tables from (:meth:`vision_tables`), read on the
        host once per prefill on the fast path; empty: the tower has no tables.
    hybrid_decoder : bool
        Whether the decoder has recurrent (linear-attention) layers among its attention layers (DESIGN.md section 1
        rule 16; :meth:`recurrent_layers` says which).
    presets : tuple of Preset
        Real model shapes with random weights, for the speed harness (``dash_vlm.models.presets.PRESETS``).
    """

    model_types: tuple[str, ...]
    vision_token_attributes: tuple[str, ...] = ()
    video: bool = False
    pixel_limits: bool = False
    vision_tower_attribute: str | None = None
    vision_blocks_path: str | None = None
    halts_in_vision_tower: bool = False
    vision_attention_attribute: str = "attn"
    vision_packs_segments: bool = False
    vision_grid_keys: tuple[str, ...] = ()
    hybrid_decoder: bool = False
    presets: tuple[Preset, ...] = ()

    @property
    def is_vision_language(self) -> bool:
        return bool(self.vision_token_attributes)

    def prefill_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward sees ``input_ids`` and runs a whole prefill (vision tower included)."""
        return getattr(model, "model", model)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack: it has ``layers`` and the final ``norm``."""
        base = self.prefill_module(model)
        return getattr(base, "language_model", base)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, each with a token mixer (:meth:`token_mixer`): the decision layer and the compact layers
        are among them."""
        return self.decoder(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm after the last decoder layer, where the halted tokens' states rejoin the kept ones."""
        return self.decoder(model).norm

    def token_mixer(self, layer: nn.Module) -> nn.Module:
        """The sublayer of a decoder layer whose output (before the residual add) DASH scores: its self-attention, or
        the linear-attention mixer of a hybrid decoder's recurrent layer (DESIGN.md section 1 rules 2 and 16)."""
        return layer.self_attn

    def recurrent_layers(self, config: PretrainedConfig) -> frozenset[int]:
        """The decoder layers of a model of ``config`` that carry a recurrent state instead of keys and values (a hybrid
        decoder's linear-attention layers, DESIGN.md section 1 rule 16); none by default."""
        return frozenset()

    def recurrent_kernels(self, model: nn.Module) -> str | None:
        """What the recurrent layers of a model run on (the bench reports it), or ``None`` without recurrent layers."""
        return None

    def attention_queries(self, attention: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The queries of a decoder attention module for ``states`` (``[batch, tokens, hidden]``), as
        ``[batch, heads, tokens, head_dim]`` before the rotary embedding, its query norm applied if it has one."""
        return _heads(attention, "q", states)

    def attention_keys(self, attention: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The keys of a decoder attention module for ``states``, as :meth:`attention_queries` gives its queries."""
        return _heads(attention, "k", states)

    def decoder_depth(self, config: PretrainedConfig) -> int:
        """The number of decoder layers of a model of ``config``."""
        return config.get_text_config().num_hidden_layers

    def first_decision_layer(self, config: PretrainedConfig) -> int:
        """The lowest decoder layer that may decide (DESIGN.md section 1 rule 13): the layers below it add vision
        features to the hidden states inside the decoder (Qwen3-VL's DeepStack), which a compact layer could not
        take."""
        return 0

    def take_decoder_additions(self, decoder_kwargs: dict) -> DecoderAdditions | None:
        """Take the additions between decoder layers out of the decoder's forward arguments (``decoder_kwargs`` is
        changed so that the decoder adds nothing itself), for a caller that runs the layers itself (the fast path's
        captured prefill); ``None`` when there are none."""
        return None

    def per_token_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose output row depends on its input row alone, which a long prefill runs in chunks of tokens
        (``dash_vlm.chunking``): the decoder layers' MLPs."""
        return [layer.mlp for layer in self.decoder_layers(model) if hasattr(layer, "mlp")]

    def segment_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Vision attention modules that attend within the segments of their ``cu_seqlens`` only, which a long
        prefill runs on whole segments in chunks (``dash_vlm.chunking``); none by default."""
        return []

    def vision_depth(self, config: PretrainedConfig) -> int:
        """The number of blocks of the vision tower of a model of ``config`` (a family whose tower halts)."""
        raise NotImplementedError(f"{self.model_types} does not halt in its vision tower")

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        """The vision tower (whose output the decoder reads), or ``None`` for a text-only model."""
        if self.vision_tower_attribute is None:
            return None
        return getattr(self.prefill_module(model), self.vision_tower_attribute)

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList | None:
        """The vision tower's transformer blocks (the vision-halting site, DESIGN.md section 6), or ``None``."""
        if self.vision_blocks_path is None:
            return None
        return functools.reduce(getattr, self.vision_blocks_path.split("."), self.vision_tower(model))

    def vision_attention(self, block: nn.Module) -> nn.Module:
        """The attention sublayer of a vision block: the vision scorer reads its output."""
        return getattr(block, self.vision_attention_attribute)

    def vision_taps(self, tower: nn.Module) -> dict[int, nn.Module]:
        """Modules that read the output of a vision block other than the last one, by block index (Qwen3-VL's
        DeepStack mergers): under vision-tower halting they are handed every patch (DESIGN.md section 6)."""
        return {}

    def vision_segments(self, tower_args: tuple, tower_kwargs: dict) -> tuple[list[int], torch.Tensor]:
        """The patches of each attention segment (an image, a frame group of a video) of one vision-tower pass, from
        the tower's arguments: on the host, and on the device of the tower's inputs."""
        raise NotImplementedError(f"{self.model_types} does not halt in its vision tower")

    def vision_patch_order(self, tower: nn.Module, tower_args: tuple, tower_kwargs: dict) -> torch.Tensor | None:
        """For a tower that runs its patches in another order than the processor gives them: the processor index of
        the patch at each place of the tower's sequence (``None``: the same order)."""
        return None

    def vision_tables(self, tower: nn.Module, grid: tuple[tuple[int, ...], ...]) -> dict:
        """What the tower computes from the grid of its inputs alone (rotary tables, segment boundaries, a window
        order), made from the grid on the host: the fast path computes them once per grid (``dash_vlm.tower``) for a
        family that names ``vision_grid_keys``."""
        raise NotImplementedError(f"{self.model_types} has no vision tables")

    def vision_forward(self, tower: nn.Module, pixels: torch.Tensor, tables: dict):
        """The tower's forward on ``tables`` (:meth:`vision_tables`): the same output as the tower's own, with no
        read of the grid."""
        raise NotImplementedError(f"{self.model_types} has no vision tables")

    def vision_patches_per_token(self, config: PretrainedConfig) -> int | None:
        """How many tower patches one vision placeholder token stands for, or ``None`` when that is not fixed."""
        return None

    def rotate(self, attention: nn.Module, states: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
        """Queries or keys of a decoder attention module (``[batch, heads, tokens, head_dim]``) with the rotary
        embedding the module applies (1-D RoPE here; M-RoPE in the Qwen2-VL family)."""
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(states, states, cos, sin)[0]

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

    def default_pixel_limits(self, processor: ProcessorMixin) -> tuple[int, int] | None:
        """The pixel budget (``min_pixels``, ``max_pixels``) the processor applies when none is given, for a family
        whose processor resizes to one (``pixel_limits``)."""
        return None

    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        """The processor's keyword arguments for the image (and video) entries ``items`` of a batch."""
        images = [item["image"] for item in items if item["type"] == "image"]
        return {"images": images or None}

    def token_positions(self, config: PretrainedConfig, inputs: dict) -> list[list[torch.Tensor]]:
        """Per sample of a batch of model inputs, the ``[rows, cols]`` token grids of its images and video frame
        groups (prompt positions in the padded batch): the rows of ``selection="per_row"``, the groups of
        ``"per_frame"``; :meth:`token_grids` lays the same grids over pixels."""
        raise NotImplementedError(f"{self.model_types} has no token grid")

    def token_grids(self, config: PretrainedConfig, processor: ProcessorMixin, inputs: dict) -> list[list[TokenGrid]]:
        """Per sample of a batch of model inputs, the views of its images and video frame groups, by prompt position,
        with each view's token grid (positions in the padded batch)."""
        raise NotImplementedError(f"{self.model_types} has no token grid")

    def lmms_conversation(
        self, context: str, visuals: list, processor: ProcessorMixin, **options
    ) -> tuple[list[dict], str | None]:
        """The lmms-eval prompt rule: the chat conversation of a request (images as loaded ``PIL`` images) and, when
        lmms-eval's own model of the family renders the prompt in its own way, that prompt text; so that ratio-0
        scores are comparable with published lmms-eval numbers. ``options`` are the family's prompt settings."""
        raise NotImplementedError(f"{self.model_types} has no lmms-eval prompt rule")

    # The tiny models below run on a CPU in seconds: the test suite checks every family through them.

    def tiny_model(self, model_type: str, attn_implementation: str = "sdpa", vision_layers: int = 2) -> PreTrainedModel:
        """A 5-layer model of ``model_type`` with random weights, float32, eval mode; a vision tower of
        ``vision_layers`` blocks where the family has one."""
        raise NotImplementedError(f"{model_type} has no tiny model")

    def tiny_sample(
        self, model_type: str, grids: list[tuple[int, int, int]], text_lengths: list[int], video: bool, seed: int
    ) -> dict:
        """One prompt for the tiny model of a family whose tower halts: text chunks of ``text_lengths`` around images
        (or one video) of patch grids ``grids`` (frame groups, height, width), random pixels of ``seed``."""
        raise NotImplementedError(f"{model_type} has no tiny sample")

    def tiny_inputs(self, model_type: str) -> dict[str, dict]:
        """Single-prompt inputs of the tiny model by kind ("image", "images", and "video" for a family with video)."""
        raise NotImplementedError(f"{model_type} has no tiny inputs")

    def tiny_batch(self, model_type: str) -> tuple[dict, list[dict]]:
        """A left-padded batch of differently sized prompts for the tiny model, and each prompt alone."""
        raise NotImplementedError(f"{model_type} has no tiny batch")

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
        """A tiny model with its real processor class and a word-level tokenizer over ``words``, ready for
        ``save_pretrained`` (``tiny.tiny_checkpoint`` documents the arguments)."""
        raise NotImplementedError(f"{model_type} has no tiny checkpoint")

    def host_training_inputs(self, config: PretrainedConfig, batch: dict) -> tuple[dict, tuple[str, ...]]:
        """``batch`` (processor outputs on the host) completed for a training step, and the names of the entries that
        must stay on the host when the rest moves to the GPU. By default nothing is added and everything moves."""
        return batch, ()


def _heads(attention: nn.Module, kind: str, states: torch.Tensor) -> torch.Tensor:
    """``states`` through an attention module's ``{kind}_proj`` (and ``{kind}_norm`` if it has one), split into
    heads: ``[batch, heads, tokens, head_dim]``."""
    projected = getattr(attention, f"{kind}_proj")(states).view(*states.shape[:2], -1, attention.head_dim)
    norm = getattr(attention, f"{kind}_norm", None)
    return (projected if norm is None else norm(projected)).transpose(1, 2)


DEFAULT_MAX_FRAMES = 32  # lmms-eval's qwen2_vl default
# No video of more frames fits one GPU (5,120 frames of 448 px filled an H200, BENCHMARKS.md "Video"): a larger cap
# is a mistake, refused rather than honoured.
MAX_FRAMES_LIMIT = 65536


def check_max_frames(max_frames: object, name: str = "max_frames") -> int:
    """``max_frames`` as an int in ``1..MAX_FRAMES_LIMIT``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1:
        raise ValueError(f"{name} must be a positive int, got {max_frames!r}")
    if max_frames > MAX_FRAMES_LIMIT:
        raise ValueError(f"{name} must be at most {MAX_FRAMES_LIMIT} (more frames than fit a GPU), got {max_frames}")
    return int(max_frames)


def frame_indices(frames: int, max_frames: int) -> np.ndarray:
    """Which of ``frames`` sampled frames a video keeps under a cap of ``max_frames``, as lmms-eval's ``qwen2_vl``
    picks them: evenly spaced, first and last included, no index twice. The work is bounded by the clip: a cap above
    ``frames`` keeps every frame."""
    max_frames = check_max_frames(max_frames)
    return np.unique(np.linspace(0, frames - 1, min(max_frames, max(frames, 1)), dtype=int))


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
    """Make ``adapter`` serve its model types, and its presets available to the speed harness."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    PRESETS.update({preset.name: preset for preset in adapter.presets})
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def model_types_with(capability: str) -> list[str]:
    """The supported model types whose adapter has ``capability`` (a bool attribute: ``video``, ``pixel_limits``,
    ``is_vision_language``)."""
    return sorted(model_type for model_type, adapter in _REGISTRY.items() if getattr(adapter, capability))


def adapter_for(model: nn.Module | PretrainedConfig | str) -> ModelAdapter:
    """The adapter of a model, a config or a ``model_type``; ``ValueError`` for an unsupported model."""
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"DASH does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]


# Imported for their registrations.
from dash_vlm.models import llava, qwen2_vl, qwen3_5, qwen3_vl, text  # noqa: E402, F401
