"""Halting methods as scorers (DESIGN.md section 7), in the style of kvpress's ``ScorerPress``.

A scorer says which layer it reads and what it reads there, and turns that reading into ``[batch, tokens]`` scores,
lowest halting first. Everything else is the same for every method: eligibility, the halt counts, the selection
(``halting.select_halted``), the compact execution and the cache. ``DeltaPress(method=name)`` builds
``SCORERS[name]`` from its fields of the same names.

The press reads a decoder layer: ``[batch, tokens, ...]`` tensors. The vision-tower site (``vision.py``) reads a
vision block through the same interface, each image or frame group as one sample (a row of a padded batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from dash_vlm.halting import decision_layer, random_scores, token_scores


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
    """

    real: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_output: torch.Tensor | None = None
    layer_input: torch.Tensor | None = None
    layer_output: torch.Tensor | None = None


@dataclass(frozen=True)
class Scorer(ABC):
    """A halting method. Its dataclass fields are fields of ``DeltaPress`` of the same names."""

    reads: ClassVar[tuple[str, ...]]  # names of the ``Reading`` fields it needs

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


@dataclass(frozen=True)
class StartRatioScorer(Scorer):
    """A scorer that reads layer ``floor(start_ratio * num_layers)``, DASH's decision layer (the vision tower's
    scorer is the same one with ``start_ratio`` replaced by ``vision_start_ratio``)."""

    start_ratio: float

    def layer(self, num_layers: int) -> int:
        return decision_layer(self.start_ratio, num_layers)


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


SCORERS: dict[str, type[Scorer]] = {"dash": DashScorer, "random": RandomScorer, "layer_delta": LayerDeltaScorer}
