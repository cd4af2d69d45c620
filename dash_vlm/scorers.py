"""Halting methods as scorers (DESIGN.md section 7), in the style of kvpress's ``ScorerPress``.

A scorer says which layer it reads and what it reads there, and turns that reading into ``[batch, tokens]`` scores,
lowest halting first. Everything else is the same for every method: eligibility, the halt counts, the selection
(``halting.select_halted``), the compact execution and the cache. ``DeltaPress(method=name)`` builds
``SCORERS[name]`` from its fields of the same names.

The press reads a decoder layer: ``[batch, tokens, ...]`` tensors. The vision-tower site (``vision.py``) reads a
vision block through the same interface, each image or frame group as one sample (a row of a padded batch).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from dash_vlm.compact import take_tokens
from dash_vlm.halting import decision_layer, random_scores, token_scores

if TYPE_CHECKING:
    from dash_vlm.models import ModelAdapter


@dataclass(frozen=True)
class Reading:
    """What a scorer reads, for one prefill; a field that is not in the scorer's ``reads`` is ``None``.

    Parameters
    ----------
    real : torch.Tensor
        ``[batch, tokens]`` bool, False on padding; always given.
    input_ids : torch.Tensor, optional
        ``[batch, tokens]``, the prompt; read before any layer runs.
    attention_output : torch.Tensor, optional
        ``[batch, tokens, hidden]``, the output of the layer's self-attention sublayer (after its output projection,
        before the residual add).
    layer_input, layer_output : torch.Tensor, optional
        ``[batch, tokens, hidden]``, the hidden states that enter and leave the layer.
    last_token_attention : torch.Tensor, optional
        ``[batch, tokens]`` float32, the attention each token receives from the sample's last real token in the
        layer's self-attention, averaged over heads (:func:`last_token_attention`).
    """

    real: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_output: torch.Tensor | None = None
    layer_input: torch.Tensor | None = None
    layer_output: torch.Tensor | None = None
    last_token_attention: torch.Tensor | None = None


@dataclass(frozen=True)
class Scorer(ABC):
    """A halting method. Its dataclass fields are fields of ``DeltaPress`` of the same names."""

    reads: ClassVar[tuple[str, ...]]  # names of the ``Reading`` fields it needs
    vision_tower: ClassVar[bool] = True  # whether it can score patches inside the vision tower too

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(getattr(cls, "reads", ())) - {f.name for f in fields(Reading)}
        if unknown:  # the press wires exactly the Reading fields: anything else would never arrive
            raise TypeError(f"{cls.__name__} reads {sorted(unknown)}, not fields of Reading")

    @classmethod
    def from_press(cls, press: object) -> Scorer:
        """The scorer of ``press``, its fields taken from the press's fields of the same names."""
        return cls(**{f.name: getattr(press, f.name) for f in fields(cls)})

    @abstractmethod
    def layer(self, num_layers: int) -> int:
        """Index of the layer it reads, which is the decision layer: the layers above it run on the kept tokens."""

    @abstractmethod
    def score(self, reading: Reading) -> torch.Tensor:
        """``[batch, tokens]`` scores, on the device of the reading; the lowest halt first."""

    def setting_for_layer(self, layer: int, num_layers: int) -> tuple[str, float | int] | None:
        """The press field that places its decision layer and the smallest value of it that puts the decision at
        ``layer`` or above, for an error to name when a model needs a higher decision layer (``None``: no one field
        does)."""
        return None


@dataclass(frozen=True)
class StartRatioScorer(Scorer):
    """A scorer that reads layer ``floor(start_ratio * num_layers)``, DASH's decision layer (the vision tower's
    scorer is the same one with ``start_ratio`` replaced by ``vision_start_ratio``)."""

    start_ratio: float

    def layer(self, num_layers: int) -> int:
        return decision_layer(self.start_ratio, num_layers)

    def setting_for_layer(self, layer: int, num_layers: int) -> tuple[str, float]:
        ratio = -(-layer * 10**4 // num_layers) / 10**4  # the exact bound rounded up to a value to type
        while decision_layer(ratio, num_layers) < layer:  # float rounding
            ratio = math.nextafter(ratio, 1.0)
        return "start_ratio", ratio


@dataclass(frozen=True)
class DashScorer(StartRatioScorer):
    """DASH: the L2 norm of each token's self-attention output at layer ``floor(start_ratio * num_layers)``."""

    reads: ClassVar[tuple[str, ...]] = ("attention_output",)

    def score(self, reading: Reading) -> torch.Tensor:
        return token_scores(reading.attention_output)


@dataclass(frozen=True)
class RandomScorer(StartRatioScorer):
    """The baseline that isolates the score's value: the same number of tokens halt at the same layer as with DASH,
    chosen by a pseudo-random hash of the sample and ``seed`` (a sample scores the same alone or in a batch)."""

    seed: int
    reads: ClassVar[tuple[str, ...]] = ("input_ids",)

    def score(self, reading: Reading) -> torch.Tensor:
        return random_scores(reading.input_ids, reading.real, self.seed)


@dataclass(frozen=True)
class LayerDeltaScorer(StartRatioScorer):
    """DASH's layer-delta ablation: the L2 norm of the whole update of layer ``floor(start_ratio * num_layers)``, its
    output minus its input (attention and FFN together), in float32."""

    reads: ClassVar[tuple[str, ...]] = ("layer_input", "layer_output")

    def score(self, reading: Reading) -> torch.Tensor:
        return token_scores(reading.layer_output.float() - reading.layer_input.float())


@dataclass(frozen=True)
class FastVScorer(Scorer):
    """FastV's rule: at layer ``fastv_layer - 1``, the attention each token receives from the last real prompt token,
    averaged over heads; tokens halt from layer ``fastv_layer`` on. ``start_ratio`` plays no part."""

    fastv_layer: int
    reads: ClassVar[tuple[str, ...]] = ("last_token_attention",)
    vision_tower: ClassVar[bool] = False  # no last prompt token there

    def layer(self, num_layers: int) -> int:
        if not 1 <= self.fastv_layer <= num_layers - 1:
            raise ValueError(
                f"fastv_layer must be in 1..{num_layers - 1} for a {num_layers}-layer decoder, got {self.fastv_layer}"
            )
        return self.fastv_layer - 1

    def setting_for_layer(self, layer: int, num_layers: int) -> tuple[str, int]:
        return "fastv_layer", layer + 1

    def score(self, reading: Reading) -> torch.Tensor:
        return reading.last_token_attention


SCORERS: dict[str, type[Scorer]] = {
    "dash": DashScorer,
    "random": RandomScorer,
    "layer_delta": LayerDeltaScorer,
    "fastv": FastVScorer,
}


def last_token_attention(
    attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, real: torch.Tensor, family: ModelAdapter
) -> torch.Tensor:
    """The attention row of each sample's last real token in ``attention`` (a decoder layer's self-attention, given
    its input ``hidden``, ``[batch, tokens, hidden]``), averaged over heads, in float32: computed from the layer's own
    projections, rotary embedding and scaling (``family``'s ``attention_queries``, ``attention_keys`` and ``rotate``),
    one query per sample, so it needs no attention matrix and works whatever attention kernel the model runs. Keys
    after the last real token and padding get no attention."""
    positions = torch.arange(real.shape[-1], device=real.device)
    last = (positions * real).argmax(-1, keepdim=True)  # [batch, 1]
    query = family.attention_queries(attention, take_tokens(hidden, last))
    query = family.rotate(attention, query, tuple(take_tokens(part, last) for part in position_embeddings))
    key = family.rotate(attention, family.attention_keys(attention, hidden), position_embeddings)
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    logits = (query.float() @ key.float().transpose(-1, -2))[:, :, 0] * attention.scaling  # [batch, heads, tokens]
    allowed = real & (positions <= last)
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)


def read_decision_layer(
    layer: nn.Module,
    attention: nn.Module,
    reads: tuple[str, ...],
    record: Callable[[str, torch.Tensor], None],
    real: Callable[[], torch.Tensor] | None = None,
    family: ModelAdapter | None = None,
) -> list:
    """Hooks on a decoder layer or vision block and its ``attention`` sublayer (a decoder layer's token mixer) that
    hand ``record(name, tensor)`` each reading in ``reads`` (``last_token_attention`` also needs ``real()``, the
    ``[batch, tokens]`` real tokens of the forward, and the model's ``family`` adapter); returns their handles, for the
    caller to remove."""
    handles = []
    if "layer_input" in reads:
        handles.append(
            layer.register_forward_pre_hook(
                lambda module, args, kwargs: record("layer_input", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
        )
    if "last_token_attention" in reads:

        def read_attention_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            value = last_token_attention(module, hidden, kwargs["position_embeddings"], real(), family)
            record("last_token_attention", value)

        handles.append(attention.register_forward_pre_hook(read_attention_input, with_kwargs=True))
    if "attention_output" in reads:
        handles.append(
            attention.register_forward_hook(
                lambda module, args, output: record(
                    "attention_output", output[0] if isinstance(output, tuple) else output
                )
            )
        )
    if "layer_output" in reads:
        handles.append(
            layer.register_forward_hook(
                lambda module, args, output: record("layer_output", output[0] if isinstance(output, tuple) else output)
            )
        )
    return handles
