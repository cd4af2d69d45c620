"""DeltaPress: DASH as a kvpress press. ``with press(model): model.generate(...)``.

Inside the block, every prefill (a forward on an empty cache, or without one) is executed as follows:

1. the prefill module's pre-hook finds the eligible tokens and how many halt per sample (one host sync, before any
   layer runs: the compact length is a shape; none at compression ratio 0, where nothing else happens either);
2. a forward hook on the decision layer's self-attention scores the tokens and selects the halted ones;
3. a pre-hook on the first deeper layer gathers the kept tokens once; every deeper layer gets the compact hidden
   states, position embeddings and mask, all precomputed at the decision; the cache keeps compact keys and values;
4. a pre-hook on the final norm puts the kept tokens' states back among the halted tokens' layer-``s`` states.

The hooks of steps 2-4 are added in step 1 and removed when the prefill ends, so a prefill at ratio 0 and every
decode step run the model's own forward with no press hook per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from torch import nn
from transformers import PreTrainedModel

from dash_vlm.cache import HaltRecord, attach_halted_layers, check_cache
from dash_vlm.compact import restrict_attention_mask, take_tokens
from dash_vlm.halting import (
    HaltingConfig,
    compact_layout,
    eligible_tokens,
    halt_counts,
    halt_counts_on_device,
    random_scores,
    select_halted,
    token_scores,
)
from dash_vlm.models import ModelAdapter, adapter_for

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class PrefillStats:
    """What one sample's prefill did (DESIGN.md section 2).

    ``halted_positions`` index the sample's unpadded prompt; ``prefill_ms`` is the whole prefill call, the same for
    every sample of a batch; ``kv_cache_bytes`` counts this sample's keys and values after the prefill.
    """

    tokens: int
    eligible: int
    kept: int
    decision_layer: int
    halted_positions: list[int]
    kv_cache_bytes: int
    prefill_ms: float


@dataclass
class DeltaPress(BasePress):
    """Delta Attention Selective Halting: prompt tokens whose self-attention output is smallest at the decision
    layer skip every deeper layer of the prefill.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the eligible tokens that halt, in [0, 1).
    start_ratio : float
        The decision layer is ``floor(start_ratio * num_layers)``, in [0, 1).
    scope : str
        "vision", "all", or "auto" (vision for a vision-language model, all for a text-only model).
    protect_last, protect_first : int
        How many of the last (>= 1) and first (>= 0) real prompt tokens never halt.
    method : str
        "dash", or "random" (the baseline: as many tokens halt, chosen pseudo-randomly per sample).
    seed : int
        Seed of the "random" method.
    """

    compression_ratio: float = 0.667
    start_ratio: float = 0.4
    scope: str = "auto"
    protect_last: int = 1
    protect_first: int = 0
    method: str = "dash"
    seed: int = 0
    _last_prefill: _PrefillRecord | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.halting_config()

    def halting_config(self) -> HaltingConfig:
        """The validated rule; raises ``ValueError`` if a field was set out of range."""
        return HaltingConfig(
            self.compression_ratio,
            self.start_ratio,
            self.scope,
            self.protect_last,
            self.protect_first,
            self.method,
            self.seed,
        )

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

    @property
    def last_stats(self) -> list[PrefillStats]:
        """Statistics of the last prefill run under this press, one per sample (empty before any)."""
        return [] if self._last_prefill is None else self._last_prefill.stats()


class Timer:
    """Wall time of a call: CUDA events on a GPU (read only when asked, so no sync), else ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        else:
            self.start_time = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
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
    halt_counts: list[int]
    timer: Timer
    halt_counts_tensor: torch.Tensor | None = None  # computed on the device: nothing is copied from the host
    fixed_scores: torch.Tensor | None = None  # the "random" method's scores, known before any layer runs
    halted: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    index: torch.Tensor | None = None  # [batch, slots] position held by each compact slot
    slot_of_position: torch.Tensor | None = None
    compact_kwargs: dict = field(default_factory=dict)
    layer_output: torch.Tensor | None = None  # output of the decision layer, the halted tokens' final state
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
        """Put the token masks and the halt counts on ``device`` (no copy when they are there already)."""
        real, eligible = self._token_masks()
        self._masks = real.to(device), eligible.to(device)
        self.halt_counts_tensor = self.halt_counts_tensor.to(device)
        if self.fixed_scores is not None:
            self.fixed_scores = self.fixed_scores.to(device)

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

    def stats(self) -> list[PrefillStats]:
        prefill = self.prefill
        milliseconds = prefill.timer.milliseconds()
        halted_positions: list[list[int]] = [[] for _ in prefill.tokens]
        if prefill.halted is not None:
            rank = prefill.real.long().cumsum(-1) - 1
            halted_positions = [rank[b][prefill.halted[b]].tolist() for b in range(len(prefill.tokens))]
        stats = []
        for tokens, eligible, kept, positions in zip(
            prefill.tokens, prefill.eligible_counts, prefill.kept_counts, halted_positions, strict=True
        ):
            kv_bytes = sum(
                size * (tokens if layer <= self.decision_layer else kept)
                for layer, size in enumerate(self.bytes_per_token)
            )
            stats.append(PrefillStats(tokens, eligible, kept, self.decision_layer, positions, kv_bytes, milliseconds))
        return stats


class _Executor:
    """The hooks of one ``with press(model)`` block; ``remove`` restores the model exactly."""

    def __init__(self, press: DeltaPress, model: PreTrainedModel, protect: torch.Tensor | None):
        self.press, self.config = press, press.halting_config()
        adapter: ModelAdapter = adapter_for(model)
        attention = model.config._attn_implementation
        if attention not in SUPPORTED_ATTENTION:
            raise ValueError(f"DASH supports attn_implementation in {SUPPORTED_ATTENTION}, got {attention!r}")
        scope = self.config.scope
        if scope == "auto":
            scope = "vision" if adapter.is_vision_language else "all"
        if scope == "vision" and not adapter.is_vision_language:
            raise ValueError(f"scope='vision' needs a vision-language model; {model.config.model_type!r} is text-only")
        if protect is not None and (protect.dtype != torch.bool or protect.ndim != 2):
            raise ValueError(
                f"protect must be a [batch, tokens] bool tensor, got {protect.dtype} of shape {tuple(protect.shape)}"
            )
        self.vision_ids = tuple(adapter.vision_token_ids(model.config)) if scope == "vision" else None
        self.protect, self.flash = protect, attention.startswith("flash")
        self.decoder = adapter.decoder(model)
        self.layers: nn.ModuleList = self.decoder.layers
        self.decision_layer = self.config.decision_layer(len(self.layers))
        self.prefill: _Prefill | None = None
        prefill_module = adapter.prefill_module(model)
        self.compact_layers = self.layers[self.decision_layer + 1 :]
        self.handles = [
            prefill_module.register_forward_pre_hook(self._on_prefill_start, with_kwargs=True),
            prefill_module.register_forward_hook(self._on_prefill_end, with_kwargs=True),
        ]
        self.halting_handles: list = []
        self.first_compact_layer = self.compact_layers[0] if len(self.compact_layers) else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._remove_halting_hooks()
        self.prefill = None

    def _add_halting_hooks(self) -> None:
        """The per-layer hooks, present only during a prefill that halts: a prefill at ratio 0 and every decode step
        run the model's own forward, with no Python hook per layer."""
        self.halting_handles = [
            self.layers[self.decision_layer].self_attn.register_forward_hook(self._on_decision, with_kwargs=True),
            *(
                layer.register_forward_pre_hook(self._on_compact_layer, with_kwargs=True)
                for layer in self.compact_layers
            ),
            self.decoder.norm.register_forward_pre_hook(self._on_final_norm),
        ]

    def _remove_halting_hooks(self) -> None:
        for handle in self.halting_handles:
            handle.remove()
        self.halting_handles = []

    def _on_prefill_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.prefill = None
        self._remove_halting_hooks()  # left by a prefill that failed
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            return  # a later forward on a prefilled cache: nothing halts
        if kwargs.get("output_hidden_states"):
            raise ValueError("DASH does not support output_hidden_states=True in a prefill (deeper layers are compact)")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        timer = Timer(reference.device)
        batch, length = reference.shape[:2]
        if self.vision_ids is not None and input_ids is None:
            raise ValueError("scope='vision' needs input_ids to find the vision tokens; got only inputs_embeds")
        if self.protect is not None and tuple(self.protect.shape) != (batch, length):
            raise ValueError(f"protect has shape {tuple(self.protect.shape)}, the prompt is {(batch, length)}")
        attention_mask = kwargs.get("attention_mask")

        def token_masks() -> tuple[torch.Tensor, torch.Tensor]:
            real = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
            if attention_mask is not None:
                real = attention_mask.bool()
            candidates = real
            if self.vision_ids is not None:  # compared with Python ints: nothing is copied to the device
                candidates = torch.zeros_like(input_ids, dtype=torch.bool)
                for token_id in self.vision_ids:
                    candidates |= input_ids == token_id
            protect = None if self.protect is None else self.protect.to(real.device)
            return real, eligible_tokens(real, candidates, self.config.protect_first, self.config.protect_last, protect)

        if self.config.compression_ratio == 0:  # nothing can halt: no host sync, no work at all
            self.prefill = _Prefill(token_masks, [0] * batch, timer)
            return
        self.prefill = _Prefill(token_masks, [], timer)
        halt = halt_counts(self.prefill.eligible_counts, self.config.compression_ratio)  # the one host sync
        self.prefill.halt_counts = halt
        self.prefill.halt_counts_tensor = halt_counts_on_device(self.prefill.counts[1], self.config.compression_ratio)
        if self.config.method == "random":
            if input_ids is None:
                raise ValueError("method='random' needs input_ids to seed each sample; got only inputs_embeds")
            self.prefill.fixed_scores = random_scores(input_ids, self.prefill.real, self.config.seed)
        if self.prefill.halting:
            self._add_halting_hooks()

    def _on_decision(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        prefill = self.prefill
        prefill.move_to(output[0].device)  # the decision layer may sit on another device than the inputs
        scores = token_scores(output[0]) if prefill.fixed_scores is None else prefill.fixed_scores
        prefill.halted = select_halted(scores, prefill.eligible, prefill.halt_counts_tensor)
        prefill.kept = prefill.real & ~prefill.halted
        kept_counts = prefill.kept_counts
        slots = max(kept_counts)
        index, valid = compact_layout(prefill.kept, slots)
        batch, length = prefill.kept.shape
        prefill.index = index
        prefill.slot_of_position = torch.zeros_like(prefill.kept, dtype=torch.long).scatter_(
            -1, index, torch.arange(slots, device=index.device).expand(batch, -1)
        )
        has_filler = min(kept_counts) < slots
        position_ids = kwargs.get("position_ids")
        prefill.compact_kwargs = {
            "attention_mask": restrict_attention_mask(
                kwargs.get("attention_mask"),
                index,
                valid,
                index,
                compact_queries=True,
                has_filler=has_filler,
                flash=self.flash,
            ),
            "position_embeddings": tuple(take_tokens(part, index) for part in kwargs["position_embeddings"]),
            "position_ids": None if position_ids is None else take_tokens(position_ids, index, trailing_dims=0),
        }
        cache = kwargs.get("past_key_values")
        if cache is not None and self.first_compact_layer is not None:
            check_cache(cache, self.decision_layer + 1)
            record = HaltRecord(index, valid, length, has_filler, self.flash)
            attach_halted_layers(cache, self.layers, record, self.decision_layer + 1)

    def _on_compact_layer(self, module: nn.Module, args: tuple, kwargs: dict):
        prefill = self.prefill
        if module is self.first_compact_layer:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            prefill.layer_output = hidden
            args = (take_tokens(hidden, prefill.index), *args[1:])
        kwargs.update(prefill.compact_kwargs)
        return args, kwargs

    def _on_final_norm(self, module: nn.Module, args: tuple):
        prefill = self.prefill
        if prefill.layer_output is None:  # no deeper layer ran on the compact sequence
            return None
        compact = args[0]
        device = compact.device  # the last layers may sit on another device than the decision (device_map="auto")
        restored = torch.where(
            prefill.kept.to(device)[..., None],
            take_tokens(compact, prefill.slot_of_position.to(device)),
            prefill.layer_output.to(device),
        )
        return (restored, *args[1:])

    def _on_prefill_end(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._remove_halting_hooks()
        prefill = self.prefill
        if prefill is None:
            return
        prefill.timer.stop()
        prefill.layer_output = prefill.slot_of_position = None  # keep only what the statistics read
        prefill.compact_kwargs = {}
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        bytes_per_token = []
        for layer in [] if cache is None else cache.layers:
            if getattr(layer, "keys", None) is not None:
                keys, values = layer.keys, layer.values
                bytes_per_token.append(
                    keys.shape[1] * keys.shape[-1] * keys.element_size()
                    + values.shape[1] * values.shape[-1] * values.element_size()
                )
        self.press._last_prefill = _PrefillRecord(prefill, self.decision_layer, bytes_per_token)
        self.prefill = None
