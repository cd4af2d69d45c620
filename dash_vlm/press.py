"""DeltaPress: DASH as a kvpress press. ``with press(model): model.generate(...)``.

Inside the block, every prefill (a forward on an empty cache, or without one) is executed as follows:

1. the prefill module's pre-hook finds the eligible tokens and how many halt per sample (one host sync, before any
   layer runs: the compact length is a shape; none at compression ratio 0, where nothing else happens either);
2. hooks on the decision layer give the method's scorer what it reads there (``scorers.py``);
3. a pre-hook on the first deeper layer makes the plan (``plan.py``: who halts, the compact layout and inputs) and
   gathers the kept tokens once; every deeper layer gets the plan's compact position embeddings and mask; the cache
   keeps compact keys and values;
4. a pre-hook on the final norm puts the kept tokens' states back among the halted tokens' layer-``s`` states.

The hooks of steps 2-4 are added in step 1 and removed when the prefill ends, so a prefill at ratio 0 and every
decode step run the model's own forward with no press hook per layer. With ``vision_compression_ratio > 0`` the
vision tower's passes halt patches too (``vision.py``, DESIGN.md section 6). The hooks only wire: the rule is in
``halting.py``, the methods in ``scorers.py``, the plan in ``plan.py``, the insertion points on the model adapter.
"""

from __future__ import annotations

import functools
import logging
import numbers
import time
import weakref
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
from kvpress import BasePress
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from dash_vlm.attention import FLASH_ATTENTION_4
from dash_vlm.cache import attach_halted_layers, check_cache, is_list_cache, key_value_bytes
from dash_vlm.chunking import TokenChunks
from dash_vlm.compact import computed_once
from dash_vlm.halting import (
    SCOPES,
    SELECTIONS,
    eligible_tokens,
    halt_counts,
    halt_counts_on_device,
    placeholders,
    selection_rule,
    token_groups,
)
from dash_vlm.models import ModelAdapter, adapter_for, model_types_with
from dash_vlm.plan import HaltPlan, plan_halting
from dash_vlm.scorers import SCORERS, Reading, Scorer, read_decision_layer
from dash_vlm.vision import VisionHalting, VisionPass, vision_counts

logger = logging.getLogger(__name__)
SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", FLASH_ATTENTION_4)
_EXECUTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its executor, inside `with press(model)`


@dataclass
class PrefillStats:
    """What one sample's prefill did (DESIGN.md section 2).

    ``halted_positions`` index the sample's unpadded prompt; ``prefill_ms`` is the whole prefill call, the same for
    every sample of a batch; ``kv_cache_bytes`` counts this sample's keys and values after the prefill.
    ``vision_patches`` counts the sample's patches in the vision tower and ``vision_kept`` those that ran every block
    (all of them unless ``vision_compression_ratio > 0``); ``vision_halted_patches`` indexes the others among the
    sample's patches (its images', then its videos', in the processor's order). All three are ``None`` for a family
    whose placeholder tokens do not stand for a fixed number of patches (LLaVA) or a prefill given only
    ``inputs_embeds``.
    """

    tokens: int
    eligible: int
    kept: int
    decision_layer: int
    halted_positions: list[int]
    kv_cache_bytes: int
    prefill_ms: float
    vision_patches: int | None = None
    vision_kept: int | None = None
    vision_halted_patches: list[int] | None = None


@dataclass
class DeltaPress(BasePress):
    """Delta Attention Selective Halting: prompt tokens whose self-attention output is smallest at the decision
    layer skip every deeper layer of the prefill (DESIGN.md section 1).

    Its fields are the halting parameters, declared here only; they are validated when the press is built and again
    when it is applied, since users reassign them.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the eligible tokens that halt, in [0, 1).
    start_ratio : float
        The decision layer is ``floor(start_ratio * num_layers)``, in [0, 1).
    scope : str
        "vision" (image and video tokens), "all" (every real prompt token) or "auto" (vision for a vision-language
        model, all for a text-only model).
    selection : str
        How the halted tokens are chosen from the scores: "global" (the DASH rule: the lowest-scoring eligible
        tokens of the sample), "per_row" (each row of each image's token grid halts its share, DESIGN.md section
        1; vision-language models) or "per_frame" (each video frame group, and each image, halts its share).
    protect_last, protect_first : int
        How many of the last (>= 1: the token that predicts the answer) and first (>= 0) real prompt tokens never
        halt.
    method : str
        The scorer, a name in ``dash_vlm.scorers.SCORERS``: "dash" (the rule), "random" (the baseline that isolates
        the score's value: as many tokens halt at the same layer, chosen pseudo-randomly per sample), "layer_delta"
        (DASH's ablation: the norm of the decision layer's whole update) or "fastv" (FastV: the attention the last
        prompt token gives each token at layer ``fastv_layer - 1``).
    seed : int
        Seed of the "random" method, in [0, 2**31).
    fastv_layer : int
        The "fastv" method's ``K``: tokens halt from layer ``K`` on; in ``1..num_layers - 1`` (checked when the press
        is applied).
    vision_compression_ratio : float
        Fraction of the patches of each image (each frame group of a video) that halt inside the vision tower, in
        [0, 1); 0 (the default) leaves the tower untouched. Qwen2-VL and Qwen2.5-VL (DESIGN.md section 6).
    vision_start_ratio : float
        The tower's decision block is ``floor(vision_start_ratio * blocks)``, in [0, 1).
    prefill_chunk : int or str
        Tokens per chunk of the prefill's per-token work (the decoder's and the tower's MLPs; a Qwen tower's
        attention on whole segments), which computes the same values in less memory for long videos
        (``dash_vlm.chunking``, DESIGN.md section 1 rule 17): "auto" (the default: from the free GPU memory when the
        block starts; none on a CPU), 0 (none) or a whole number >= 1 (text such as "8192" is read as one).
    """

    compression_ratio: float = 0.667
    start_ratio: float = 0.4
    scope: str = "auto"
    selection: str = "global"
    protect_last: int = 1
    protect_first: int = 0
    method: str = "dash"
    seed: int = 0
    fastv_layer: int = 2
    vision_compression_ratio: float = 0.0
    vision_start_ratio: float = 0.3
    prefill_chunk: int | str = "auto"
    _last_prefill: _PrefillRecord | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.prefill_chunk, str) and self.prefill_chunk.strip().isdigit():  # command line, model args
            self.prefill_chunk = int(self.prefill_chunk)
        self.validate()
        for parameter in fields(self):  # NumPy and other numeric scalars become Python numbers of the field's type
            if parameter.init and isinstance(parameter.default, (int, float)):
                setattr(self, parameter.name, type(parameter.default)(getattr(self, parameter.name)))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of its accepted range."""
        for name in ("compression_ratio", "start_ratio", "vision_compression_ratio", "vision_start_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.method not in SCORERS:
            raise ValueError(f"method must be one of {tuple(SCORERS)}, got {self.method!r}")
        for name, minimum in (("protect_last", 1), ("protect_first", 0), ("fastv_layer", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        chunk = self.prefill_chunk
        if chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 0):
            raise ValueError(
                f"prefill_chunk must be 'auto', 0 (no chunks) or a whole number of tokens >= 1, got {chunk!r}"
            )
        if self.vision_compression_ratio > 0 and not SCORERS[self.method].vision_tower:
            raise ValueError(
                f"method={self.method!r} cannot halt inside the vision tower; use vision_compression_ratio=0 or a "
                f"method in {tuple(name for name, scorer in SCORERS.items() if scorer.vision_tower)}"
            )

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The halting parameters, in declaration order: every entry point (``DashVLM``, the command line, the lmms-eval
        model args, the bench) takes exactly these, by name."""
        return tuple(parameter.name for parameter in fields(cls) if parameter.init)

    @classmethod
    def pop_parameters(cls, options: dict) -> dict:
        """Remove the halting parameters from ``options`` (keyword arguments meant for several receivers) and return
        them, by name."""
        return {name: options.pop(name) for name in cls.parameter_names() if name in options}

    @classmethod
    def from_options(cls, **options: object) -> DeltaPress:
        """A press from halting parameters given by name, as values or as text (command-line flags, lmms-eval model
        args): text is converted to the type of the field's default. ``ValueError`` names an unknown parameter or a
        value that does not convert."""
        defaults = {parameter.name: parameter.default for parameter in fields(cls) if parameter.init}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"unknown halting parameters {unknown}; DeltaPress takes {tuple(defaults)}")
        converted = {}
        for name, value in options.items():
            kind = type(defaults[name])
            if isinstance(value, str) and kind is not str:
                try:
                    value = kind(value)
                except ValueError as error:
                    raise ValueError(f"{name} must be given as {kind.__name__}, got {value!r}") from error
            converted[name] = value
        return cls(**converted)

    def halting_config(self) -> DeltaPress:
        """A validated copy of the halting fields (``ValueError`` if one was set out of range): what a
        ``with press(model)`` block applies, whatever is reassigned during the block."""
        return replace(self)

    def check_model(self, model_config: PretrainedConfig) -> None:
        """Raise ``ValueError`` naming the field when this press cannot apply to a model of ``model_config``: an
        unsupported model type, a field the family cannot honour, or a decision layer (block) with no deeper one left to
        skip. ``press(model)`` checks this; ``DashVLM`` does before any weights load."""
        adapter, model_type = adapter_for(model_config), model_config.model_type
        if self.scope == "vision" and not adapter.is_vision_language:
            raise ValueError(f"scope='vision' needs a vision-language model; {model_type!r} is text-only")
        if self.selection != "global" and not adapter.is_vision_language:
            raise ValueError(
                f"selection={self.selection!r} needs a vision-language model (its groups are image and video token "
                f"grids); {model_type!r} is text-only"
            )
        if self.vision_compression_ratio > 0 and not adapter.halts_in_vision_tower:
            raise ValueError(
                f"vision_compression_ratio > 0 needs a model whose vision tower can halt "
                f"({', '.join(model_types_with('halts_in_vision_tower'))}); {model_type!r} has none"
            )
        layers = adapter.decoder_depth(model_config)
        if self.compression_ratio > 0 and self.decision_layer(layers) >= layers - 1:
            raise ValueError(
                f"start_ratio={self.start_ratio} puts the decision layer at the last of {layers} decoder layers, so no "
                f"token would skip anything; start_ratio must be below {(layers - 1) / layers:.4g} for this model"
            )
        if self.compression_ratio > 0:
            self._check_decision_layer(adapter, model_config, layers)
        if self.vision_compression_ratio > 0:
            blocks = adapter.vision_depth(model_config)
            if self.vision_scorer().layer(blocks) >= blocks - 1:
                raise ValueError(
                    f"vision_start_ratio={self.vision_start_ratio} puts the tower's decision block at the last of "
                    f"{blocks} blocks, so no patch would skip anything; vision_start_ratio must be below "
                    f"{(blocks - 1) / blocks:.4g} for this model"
                )

    def _check_decision_layer(self, adapter: ModelAdapter, model_config: PretrainedConfig, layers: int) -> None:
        """Rule 13's floors on the decision layer (DeepStack's layers, a hybrid decoder's first attention layer) and
        rule 16's attention layer for FastV."""
        model_type, decision, scorer = model_config.model_type, self.decision_layer(layers), self.scorer()
        recurrent = adapter.recurrent_layers(model_config)
        if "last_token_attention" in scorer.reads and decision in recurrent:
            attention = [index + 1 for index in range(layers - 1) if index not in recurrent]
            raise ValueError(
                f"fastv_layer={self.fastv_layer} reads attention weights at decoder layer {decision}, a recurrent "
                f"(linear-attention) layer of {model_type!r}, which has none; fastv_layer - 1 must be an attention "
                f"layer: fastv_layer in {attention} for this model"
            )
        deepstack = adapter.first_decision_layer(model_config)
        below = "decoder layer 0" if deepstack == 1 else f"decoder layers 0..{deepstack - 1}"
        floors = [
            (deepstack, f"adds vision features to the hidden states of {below}, so halting must start above them")
        ]
        if recurrent:
            first_attention = min(set(range(layers)) - recurrent)
            floors.append(
                (
                    first_attention,
                    "is hybrid, and a halted cache learns of later forwards from an attention layer at or below the "
                    f"decision layer (its first is decoder layer {first_attention})",
                )
            )
        for first, reason in floors:
            if decision < first:
                setting = scorer.setting_for_layer(first, layers)
                name, fix = (
                    (f"method={self.method!r}", f"its decision layer must be at least {first}")
                    if setting is None
                    else (f"{setting[0]}={getattr(self, setting[0])}", f"{setting[0]} must be at least {setting[1]:g}")
                )
                raise ValueError(
                    f"{name} puts the decision layer at layer {decision}, but {model_type!r} {reason}; {fix} for this "
                    "model"
                )

    def scorer(self) -> Scorer:
        """The scorer of ``method``, built from the fields it names."""
        return SCORERS[self.method].from_press(self)

    def decision_layer(self, num_layers: int) -> int:
        """Index ``s`` of the layer the scorer reads; the layers above it run on the kept tokens."""
        return self.scorer().layer(num_layers)

    def vision_scorer(self) -> Scorer:
        """The scorer of ``method`` in the vision tower: it reads block ``floor(vision_start_ratio * blocks)``."""
        return replace(self.scorer(), start_ratio=self.vision_start_ratio)

    @contextmanager
    def __call__(self, model: PreTrainedModel, protect: torch.Tensor | None = None) -> Generator:
        """Apply DASH to every prefill of ``model`` inside the block.

        Parameters
        ----------
        model : PreTrainedModel
            A supported model (see ``dash_vlm.models.supported_model_types()``).
        protect : torch.Tensor, optional
            ``[batch, tokens]`` bool mask of prompt positions that must not halt.
        """
        executor = _Executor(self, model, protect)
        try:
            yield
        finally:
            executor.remove()

    def compress(self, *args, **kwargs):
        """kvpress's wrappers (``ComposedPress``, ``PerLayerCompressionPress``, ...) call a press's ``compress`` on
        each attention layer's keys and values; DASH does not compress a cache, it changes which tokens deeper layers
        run on, so it is applied on its own."""
        raise NotImplementedError(
            "DeltaPress cannot run inside kvpress's ComposedPress or other wrapper presses: it halts tokens across "
            "layers instead of compressing each layer's cache; apply it alone, `with press(model): ...`"
        )

    @property
    def last_stats(self) -> list[PrefillStats]:
        """Statistics of the last prefill run under this press, one per sample (empty before any)."""
        return [] if self._last_prefill is None else self._last_prefill.stats()


def as_protect_mask(protect: object) -> torch.Tensor | None:
    """``press(model, protect=...)``: a ``[batch, tokens]`` bool tensor from anything that converts to one cleanly (a
    tensor, a NumPy array, nested lists of bools); ``ValueError`` naming ``protect`` otherwise."""
    if protect is None:
        return None
    try:
        mask = torch.as_tensor(protect)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"protect must be a [batch, tokens] bool mask (a tensor, NumPy array or nested lists of bools), got "
            f"{type(protect).__name__} ({error})"
        ) from None
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(
            f"protect must be a [batch, tokens] bool mask (a tensor, NumPy array or nested lists of bools), got "
            f"{type(protect).__name__} of {mask.dtype} and shape {tuple(mask.shape)}"
        )
    return mask


def executor_of(model: PreTrainedModel) -> _Executor | None:
    """The hooks of the ``with press(model)`` block ``model`` is in, if any."""
    return _EXECUTORS.get(model)


class Timer:
    """Wall time of a call: CUDA events on a GPU (read only when asked, so no sync), else ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda, self.device = device.type == "cuda", device
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            with torch.cuda.device(device):  # an event records on the current device's stream: make it the model's
                self.start_event.record()
        else:
            self.start_time = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            with torch.cuda.device(self.device):
                self.end_event.record()
        else:
            self.end_time = time.perf_counter()

    def milliseconds(self) -> float:
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event)
        return (self.end_time - self.start_time) * 1000


@dataclass
class _Prefill:
    """State of one prefill forward under the press."""

    token_masks: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # real and eligible, [batch, tokens] bool
    timer: Timer
    input_ids: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # per_row and per_frame: each token's group (``halting.token_groups``)
    vision_passes: list[VisionPass] = field(default_factory=list)  # the vision tower's, when it halts
    halt_counts: list[int] = field(default_factory=list)
    halt_counts_tensor: torch.Tensor | None = None  # computed on the device: nothing is copied from the host
    reading: dict[str, torch.Tensor] = field(default_factory=dict)  # what the scorer has read so far
    scores: torch.Tensor | None = None
    plan: HaltPlan | None = None
    decision_output: torch.Tensor | None = None  # output of the decision layer, the halted tokens' final state
    compact_kwargs: dict = field(default_factory=dict)  # per kind of layer, compact inputs per mask (``computed_once``)
    _masks: tuple[torch.Tensor, torch.Tensor] | None = None
    _counts: torch.Tensor | None = None
    _host_counts: list[list[int]] | None = None

    @property
    def halting(self) -> bool:
        return any(self.halt_counts)

    @property
    def real(self) -> torch.Tensor:
        return self._token_masks()[0]

    @property
    def eligible(self) -> torch.Tensor:
        return self._token_masks()[1]

    def _token_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._masks is None:  # at ratio 0 only when statistics are asked for: the prefill itself does nothing
            self._masks = self.token_masks()
        return self._masks

    @property
    def counts(self) -> torch.Tensor:
        """``[2, batch]``: real and eligible tokens per sample, on the device."""
        if self._counts is None:
            real, eligible = self._token_masks()
            self._counts = torch.stack([real.sum(-1), eligible.sum(-1)])
        return self._counts

    @property
    def host_counts(self) -> list[list[int]]:
        """:attr:`counts` on the host (a sync)."""
        if self._host_counts is None:
            self._host_counts = self.counts.tolist()
        return self._host_counts

    def move_to(self, device: torch.device) -> None:
        """Put the token masks, the halt counts and the scores on ``device`` (no copy when they are there already)."""
        real, eligible = self._token_masks()
        self._masks = real.to(device), eligible.to(device)
        self.halt_counts_tensor = self.halt_counts_tensor.to(device)
        self.scores = self.scores.to(device)
        if self.groups is not None:
            self.groups = self.groups.to(device)

    def finish(self) -> None:
        """Drop what only the forward needed; the statistics read the masks, the counts and the plan's ``halted``."""
        self.reading, self.scores, self.decision_output, self.compact_kwargs = {}, None, None, {}

    @property
    def tokens(self) -> list[int]:
        return self.host_counts[0]

    @property
    def eligible_counts(self) -> list[int]:
        return self.host_counts[1]

    @property
    def kept_counts(self) -> list[int]:
        return [tokens - halted for tokens, halted in zip(self.tokens, self.halt_counts, strict=True)]


@dataclass
class _PrefillRecord:
    """A finished prefill; its statistics are read off the device only when asked for."""

    prefill: _Prefill
    decision_layer: int
    bytes_per_token: list[int]  # per layer, keys and values of one position
    vision_token_ids: list[int]
    patches_per_token: int | None

    def stats(self) -> list[PrefillStats]:
        prefill = self.prefill
        milliseconds = prefill.timer.milliseconds()
        batch = len(prefill.tokens)
        vision_patches: list[int | None] = [None] * batch
        vision_kept: list[int | None] = [None] * batch
        vision_halted: list[list[int] | None] = [None] * batch
        if self.patches_per_token is not None and prefill.input_ids is not None:
            vision_patches, vision_kept, vision_halted = vision_counts(
                prefill.input_ids, self.vision_token_ids, self.patches_per_token, prefill.vision_passes
            )
        halted_positions: list[list[int]] = [[] for _ in prefill.tokens]
        if prefill.plan is not None:
            rank = prefill.real.long().cumsum(-1) - 1
            halted_positions = [rank[b][prefill.plan.halted[b]].tolist() for b in range(len(prefill.tokens))]
        stats = []
        for tokens, eligible, kept, positions, *vision_figures in zip(
            prefill.tokens,
            prefill.eligible_counts,
            prefill.kept_counts,
            halted_positions,
            vision_patches,
            vision_kept,
            vision_halted,
            strict=True,
        ):
            kv_bytes = sum(
                size * (tokens if layer <= self.decision_layer else kept)
                for layer, size in enumerate(self.bytes_per_token)
            )
            stats.append(
                PrefillStats(
                    tokens, eligible, kept, self.decision_layer, positions, kv_bytes, milliseconds, *vision_figures
                )
            )
        return stats


class _Executor:
    """The hooks of one ``with press(model)`` block: they check the inputs and wire the scorer and the plan into the
    model at the adapter's insertion points; ``remove`` restores the model exactly."""

    def __init__(self, press: DeltaPress, model: PreTrainedModel, protect: torch.Tensor | None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"press(model) takes a model (a torch module), got {type(model).__name__}")
        if model in _EXECUTORS:  # a second press would re-plan the first one's compact layers and caches
            raise NotImplementedError(
                "DASH presses do not nest: this model is already inside a `with press(model)` block (in this thread "
                "or another; DashVLM serialises its calls)"
            )
        self.press, self.config = press, press.halting_config()
        adapter: ModelAdapter = adapter_for(model)
        attention = adapter.decoder(model).config._attn_implementation  # the fast path runs its decoder on SDPA
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(f"DASH supports attn_implementation in {SUPPORTED_ATTENTION}, got {attention!r}")
        self.config.check_model(model.config)
        scope = self.config.scope
        if scope == "auto":
            scope = "vision" if adapter.is_vision_language else "all"
        protect = as_protect_mask(protect)
        self.adapter, self.model_config = adapter, model.config
        self.vision_ids = tuple(adapter.vision_token_ids(model.config)) if scope == "vision" else None
        self.vision_token_ids = adapter.vision_token_ids(model.config)
        self.patches_per_token = adapter.vision_patches_per_token(model.config)
        self.protect, self.flash = protect, attention.startswith("flash")
        self.scorer = self.config.scorer()
        self.layers: nn.ModuleList = adapter.decoder_layers(model)
        self.final_norm = adapter.final_norm(model)
        self.decision_layer = self.scorer.layer(len(self.layers))
        self.recurrent = adapter.recurrent_layers(model.config)
        self.prefill: _Prefill | None = None
        self.vision: VisionHalting | None = None
        if self.config.vision_compression_ratio > 0:
            ratio, scorer = self.config.vision_compression_ratio, self.config.vision_scorer()
            self.vision = VisionHalting(model, adapter, ratio, scorer)
        prefill_module = adapter.prefill_module(model)
        self.chunks = TokenChunks(model, adapter, self.config.prefill_chunk)
        self.handles = [
            prefill_module.register_forward_pre_hook(self._on_prefill_start, with_kwargs=True),
            prefill_module.register_forward_hook(self._on_prefill_end, with_kwargs=True),
        ]
        if prefill_module is not model:  # the module that takes ``labels`` wraps the prefill module
            self.handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self.halting_handles: list = []
        self.warned_labels = False
        self.model = weakref.ref(model)
        _EXECUTORS[model] = self

    def remove(self) -> None:
        model = self.model()
        if model is not None:
            _EXECUTORS.pop(model, None)
        for handle in self.handles:
            handle.remove()
        self.chunks.remove()
        self._remove_halting_hooks()
        if self.vision is not None:
            self.vision.remove()
        self.prefill = self.vision = None

    def hand_over(self) -> _Prefill | None:
        """For a runner that executes the decoder layers itself (the fast path's prefill, ``graphs.py``), called from
        inside the decoder during a prefill: the prefill's state (token masks, halt counts, scorer inputs), with the
        per-layer hooks removed. The runner sets its ``plan`` (who halted, for the statistics) and fills the cache."""
        self._remove_halting_hooks()
        return self.prefill

    def _add_halting_hooks(self) -> None:
        """The per-layer hooks, present only during a prefill that halts: a prefill at ratio 0 and every decode step
        run the model's own forward, with no Python hook per layer."""
        decision = self.layers[self.decision_layer]
        handles = read_decision_layer(
            decision,
            self.adapter.token_mixer(decision),
            self.scorer.reads,
            self._read,
            self._real_on_layer,
            self.adapter,
        )
        for index in range(self.decision_layer + 1, len(self.layers)):
            hook = functools.partial(self._on_compact_layer, recurrent=index in self.recurrent)
            handles.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(self.final_norm.register_forward_pre_hook(self._on_final_norm))
        self.halting_handles = handles

    def _remove_halting_hooks(self) -> None:
        for handle in self.halting_handles:
            handle.remove()
        self.halting_handles = []

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and self.config.compression_ratio > 0 and not self.warned_labels:
            self.warned_labels = True  # once per block: a training loop would repeat it every step
            logger.warning(
                "labels given under a halting press: the loss also covers the halted positions, whose logits come "
                "from their decision-layer state (DESIGN.md section 1, rule 6); protect them (press(model, "
                "protect=...)) to score them exactly"
            )

    def _on_prefill_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.prefill = None
        self._remove_halting_hooks()  # left by a prefill that failed
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache) and not is_list_cache(cache):
            raise NotImplementedError(
                f"the press needs transformers' DynamicCache, got {type(cache).__name__} (for example from "
                "generate(..., cache_implementation='static')); for a static-cache decode use DashVLM(cuda_graphs=True)"
            )
        if cache is not None and cache.get_seq_length() > 0:
            return  # a later forward on a prefilled cache: nothing halts
        config = getattr(module, "config", None)
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(config, flag, False)):
                raise ValueError(f"DASH does not support {flag}=True in a prefill (deeper layers are compact)")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        timer = Timer(reference.device)
        batch, length = reference.shape[:2]
        if self.vision_ids is not None and input_ids is None:
            raise ValueError("scope='vision' needs input_ids to find the vision tokens; got only inputs_embeds")
        protect = self.protect
        if protect is not None and tuple(protect.shape) != (batch, length):
            raise ValueError(
                f"protect has shape {tuple(protect.shape)}, the prompt is {(batch, length)} (beam search expands each "
                "prompt in place: give protect.repeat_interleave(num_beams, 0))"
            )
        attention_mask = kwargs.get("attention_mask")
        groups = None
        selection = self.config.selection
        if selection != "global" and self.config.compression_ratio > 0:  # read on the host, up front
            if input_ids is None:
                raise ValueError(f"selection={selection!r} needs input_ids to find the image and video token grids")
            grids = self.adapter.token_positions(self.model_config, dict(kwargs, input_ids=input_ids))
            members = [
                [row for grid in sample for row in grid] if selection == "per_row" else list(sample) for sample in grids
            ]
            groups = token_groups(members, placeholders(input_ids, self.vision_token_ids))
        # The statistics read these masks after the block: the closure holds what it needs, never the executor and
        # with it the model.
        vision_ids, config = self.vision_ids, self.config

        def token_masks() -> tuple[torch.Tensor, torch.Tensor]:
            real = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
            if attention_mask is not None:
                real = attention_mask.bool()
            candidates = real if vision_ids is None else placeholders(input_ids, vision_ids)
            protected = None if protect is None else protect.to(real.device)
            eligible = eligible_tokens(real, candidates, config.protect_first, config.protect_last, protected)
            return real, eligible if groups is None else eligible & (groups >= 0)

        ratio = self.config.compression_ratio
        if ratio > 0 and "input_ids" in self.scorer.reads and input_ids is None:
            raise ValueError(f"method={self.config.method!r} needs input_ids; got only inputs_embeds")
        self.prefill = prefill = _Prefill(token_masks, timer, input_ids=input_ids, groups=groups)
        if self.vision is not None:
            self.vision.passes = prefill.vision_passes
        if ratio == 0:  # nothing can halt in the decoder: no host sync, no work at all
            prefill.halt_counts = [0] * batch
            return
        prefill.halt_counts = halt_counts(prefill.eligible_counts, ratio)  # the host sync (per_row read its grids)
        prefill.halt_counts_tensor = halt_counts_on_device(prefill.counts[1], ratio)
        if prefill.halting:
            if "input_ids" in self.scorer.reads:
                self._read("input_ids", input_ids)
            self._add_halting_hooks()

    def _read(self, name: str, tensor: torch.Tensor) -> None:
        """Keep one thing the scorer reads; score as soon as it has read everything, so the tensors read die here."""
        prefill = self.prefill
        prefill.reading[name] = tensor
        if len(prefill.reading) == len(self.scorer.reads):
            prefill.scores = self.scorer.score(Reading(prefill.real.to(tensor.device), **prefill.reading))
            prefill.reading = {}

    def _real_on_layer(self) -> torch.Tensor:
        """The prefill's real tokens, on the decision layer's device."""
        return self.prefill.real.to(next(self.layers[self.decision_layer].parameters()).device)

    def _decide(self, device: torch.device) -> HaltPlan:
        prefill = self.prefill
        prefill.move_to(device)  # the decision may sit on another device than the inputs (device_map="auto")
        prefill.plan = plan_halting(
            prefill.scores,
            prefill.real,
            prefill.eligible,
            prefill.halt_counts_tensor,
            prefill.kept_counts,
            selection_rule(prefill.groups, self.config.compression_ratio),
        )
        return prefill.plan

    def _on_compact_layer(self, module: nn.Module, args: tuple, kwargs: dict, recurrent: bool):
        prefill = self.prefill
        if prefill.plan is None:  # the first layer above the decision layer: decide, gather the kept tokens once
            hidden = args[0] if args else kwargs.pop("hidden_states")
            plan = self._decide(hidden.device)
            prefill.decision_output = hidden
            cache = kwargs.get("past_key_values")
            if cache is not None:
                check_cache(cache, self.decision_layer + 1)
                record = plan.cache_record(self.flash)
                attach_halted_layers(cache, self.layers, record, self.decision_layer + 1, self.recurrent)
            args = (plan.gather(hidden), *args[1:])
        # Layers of different attention types (full and sliding window) get different masks, and recurrent layers a
        # padding mask: compact each mask once per kind of layer.
        compact = computed_once(
            prefill.compact_kwargs.setdefault(recurrent, {}),
            kwargs.get("attention_mask"),
            lambda mask: prefill.plan.compact_inputs(kwargs, self.flash, recurrent),
        )
        kwargs.update(compact)
        return args, kwargs

    def _on_final_norm(self, module: nn.Module, args: tuple):
        prefill = self.prefill
        if prefill.plan is None:  # no layer above the decision layer: the plan only feeds the statistics
            self._decide(args[0].device)
            return None
        return (prefill.plan.restore(args[0], prefill.decision_output), *args[1:])

    def _on_prefill_end(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._remove_halting_hooks()
        prefill = self.prefill
        if prefill is None:
            return
        prefill.timer.stop()
        prefill.finish()
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        bytes_per_token = [] if cache is None else key_value_bytes(cache, len(self.layers))
        self.press._last_prefill = _PrefillRecord(
            prefill, self.decision_layer, bytes_per_token, self.vision_token_ids, self.patches_per_token
        )
        self.prefill = None
