"""The DASH rule: which prompt tokens halt, as small pure tensor functions.

Nothing here knows about models or hooks. ``press.py`` feeds these functions the prompt's masks and the
self-attention output of the decision layer, and executes the plan they return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCOPES = ("auto", "vision", "all")
METHODS = ("dash", "random")


@dataclass
class HaltingConfig:
    """Hyperparameters of the halting rule (DESIGN.md section 1).

    Parameters
    ----------
    compression_ratio : float
        Fraction of the eligible tokens that halt, in [0, 1).
    start_ratio : float
        The decision layer is ``floor(start_ratio * num_layers)``, in [0, 1).
    scope : str
        "vision" (image and video tokens), "all" (every real prompt token) or "auto" (vision for a
        vision-language model, all for a text-only model).
    protect_last : int
        The last ``protect_last`` real tokens never halt (>= 1: the token that predicts the answer).
    protect_first : int
        The first ``protect_first`` real tokens never halt (>= 0).
    method : str
        "dash" (the rule) or "random": the same number of eligible tokens halt at the same layer, chosen by a
        pseudo-random score seeded per sample (``random_scores``), the baseline that isolates the score's value.
    seed : int
        Seed of the "random" method, in [0, 2**31).
    """

    compression_ratio: float = 0.667
    start_ratio: float = 0.4
    scope: str = "auto"
    protect_last: int = 1
    protect_first: int = 0
    method: str = "dash"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of its accepted range."""
        for name in ("compression_ratio", "start_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, minimum in (("protect_last", 1), ("protect_first", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")

    def decision_layer(self, num_layers: int) -> int:
        """Index ``s`` of the layer whose attention output scores the tokens."""
        return math.floor(self.start_ratio * num_layers)


def token_scores(attention_output: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's self-attention output, in float32: ``[batch, tokens, hidden] -> [batch, tokens]``."""
    return torch.linalg.vector_norm(attention_output.float(), dim=-1)


def random_scores(input_ids: torch.Tensor, real: torch.Tensor, seed: int) -> torch.Tensor:
    """Pseudo-random scores in [0, 1) that depend only on the sample: its real tokens, each token's position in the
    unpadded prompt, and ``seed`` (an integer hash on the device, so a sample scores the same alone or in a batch).
    """
    mask32 = 0xFFFFFFFF
    position = real.long().cumsum(-1)
    checksum = ((input_ids.long() % 65521 + 1) * position * real).sum(-1, keepdim=True) & mask32
    state = (position * 0x27D4EB2F + checksum * 0x165667B1 + seed * 0x61C88647) & mask32
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x046B6F4B), (16, 0)):
        state = state ^ (state >> shift)
        if multiplier:
            state = (state * multiplier) & mask32
    return state.float() / 2**32


def eligible_tokens(
    real: torch.Tensor,
    candidates: torch.Tensor,
    protect_first: int,
    protect_last: int,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens that may halt: the scope's candidates among real tokens, minus every protected position.

    Parameters
    ----------
    real : torch.Tensor
        ``[batch, tokens]`` bool, False on padding.
    candidates : torch.Tensor
        ``[batch, tokens]`` bool, the tokens of the scope (vision placeholders, or every token).
    protect_first, protect_last : int
        How many of the first / last real tokens of each sample never halt.
    protect : torch.Tensor, optional
        ``[batch, tokens]`` bool, positions the caller protects explicitly.
    """
    rank = real.long().cumsum(dim=-1) - 1  # index of each real token within its sample
    rank_from_end = real.sum(dim=-1, keepdim=True) - 1 - rank
    eligible = real & candidates & (rank >= protect_first) & (rank_from_end >= protect_last)
    if protect is not None:
        eligible &= ~protect
    return eligible


def halt_counts(eligible_counts: list[int], compression_ratio: float) -> list[int]:
    """``n_drop = round(compression_ratio * |eligible|)`` per sample, with Python's ``round``."""
    return [round(compression_ratio * count) for count in eligible_counts]


def halt_counts_on_device(eligible_counts: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """:func:`halt_counts` where the counts are, with no copy to or from the host: the same float64 product, rounded
    half to even as Python's ``round`` does."""
    return torch.round(eligible_counts.double() * compression_ratio).long()


def select_halted(scores: torch.Tensor, eligible: torch.Tensor, n_halt: torch.Tensor) -> torch.Tensor:
    """The ``n_halt[b]`` eligible tokens of each sample with the smallest scores; ties halt the earlier position.

    Parameters
    ----------
    scores : torch.Tensor
        ``[batch, tokens]`` float.
    eligible : torch.Tensor
        ``[batch, tokens]`` bool.
    n_halt : torch.Tensor
        ``[batch]`` long, at most the number of eligible tokens of each sample.

    Returns
    -------
    torch.Tensor
        ``[batch, tokens]`` bool, True where the token halts.
    """
    keyed = scores.float().masked_fill(~eligible, math.inf)
    order = torch.sort(keyed, dim=-1, stable=True).indices  # stable: equal scores keep position order
    ranks = order.argsort(dim=-1)  # rank of each position in that order
    return eligible & (ranks < n_halt[:, None])


def compact_layout(kept: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each sample's kept tokens go in the shorter sequence that deeper layers run on.

    Each sample's kept positions, ascending, fill the last slots; the leading slots of a sample that keeps fewer
    than ``num_slots`` tokens are filler (they point at one of its non-kept positions and are masked).

    Returns
    -------
    index : torch.Tensor
        ``[batch, num_slots]`` long, the original position held by each slot.
    valid : torch.Tensor
        ``[batch, num_slots]`` bool, False on filler slots.
    """
    positions = torch.arange(kept.shape[-1], device=kept.device).expand_as(kept)
    keyed = torch.where(kept, positions, positions - kept.shape[-1])  # non-kept first, then kept, each ascending
    index = torch.sort(keyed, dim=-1).values[:, -num_slots:] % kept.shape[-1]
    return index, kept.gather(-1, index)
