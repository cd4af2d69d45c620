"""The DASH rule: which prompt tokens halt, as small pure tensor functions.

Nothing here knows about models or hooks. The scorers (``scorers.py``) score the tokens, the plan (``plan.py``)
turns the scores into who halts and the compact layout with these functions, and ``press.py`` wires the plan into a
model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

SCOPES = ("auto", "vision", "all")
SELECTIONS = ("global", "per_row", "per_frame")

Selection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A selection rule, the step after scoring: ``(scores, eligible, n_halt) -> halted``, as :func:`select_halted`."""


def decision_layer(start_ratio: float, num_layers: int) -> int:
    """Index ``s = floor(start_ratio * num_layers)`` of the layer that decides; deeper layers run compact."""
    return math.floor(start_ratio * num_layers)


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


def token_groups(members: list[list[torch.Tensor]], vision: torch.Tensor) -> torch.Tensor:
    """The groups of ``selection="per_row"`` and ``"per_frame"`` (DESIGN.md section 1): each member list is a group
    (a row of a token grid, or a whole grid), and so are a sample's tokens that are not vision placeholders,
    together; a vision placeholder in no member list (LLaVA-NeXT's row-end newline tokens) is in no group and never
    halts.

    Parameters
    ----------
    members : list of list of torch.Tensor
        Per sample, the positions of each group's tokens, groups in any order.
    vision : torch.Tensor
        ``[batch, tokens]`` bool, the vision placeholders.

    Returns
    -------
    torch.Tensor
        ``[batch, tokens]`` long: the token's group, numbered from 0 within its sample, in the order of each group's
        first position; -1 for a placeholder in no group.
    """
    batch, length = vision.shape
    groups = torch.full((batch, length), -1, dtype=torch.long)
    text_tokens = (~vision).cpu()
    for sample, sample_members in enumerate(members):
        positions = [member.cpu().flatten() for member in sample_members]
        text = text_tokens[sample].nonzero()[:, 0]
        if len(text):
            positions.append(text)
        for number, member in enumerate(sorted(positions, key=lambda group: int(group.min()))):
            groups[sample, member] = number
    return groups.to(vision.device)


def select_halted_in_groups(
    scores: torch.Tensor, eligible: torch.Tensor, n_halt: torch.Tensor, groups: torch.Tensor, compression_ratio: float
) -> torch.Tensor:
    """``selection="per_row"`` or ``"per_frame"``: each group (:func:`token_groups`) halts
    ``floor(compression_ratio * n)`` of its ``n`` eligible tokens, those with the smallest scores (ties: the earlier
    position); the rest of each sample's ``n_halt`` goes, one token each, to its groups with the largest fractional
    parts of ``compression_ratio * n`` (ties: the earlier group). Shapes are ``[batch, tokens]`` throughout, with no
    copy to or from the host.
    """
    batch, length = scores.shape
    flat = torch.arange(batch, device=scores.device)[:, None] * length + groups  # a group id unique in the batch
    member = eligible & (groups >= 0)
    flat = torch.where(member, flat, batch * length)  # non-members: one spare group past the end
    counts = torch.zeros(batch * length + 1, dtype=torch.long, device=scores.device)
    counts = counts.scatter_add(0, flat.flatten(), member.flatten().long())[:-1]
    exact = counts.double() * compression_ratio
    floors = exact.floor().long()
    fraction = torch.where(counts > 0, exact - floors, -1.0).view(batch, length)  # empty groups come last
    remainder = n_halt - floors.view(batch, length).sum(-1)
    # Groups are numbered in order of their first position, so a stable sort by fraction breaks ties by group.
    order = torch.sort(-fraction, dim=-1, stable=True).indices
    extra = order.argsort(dim=-1) < remainder[:, None]
    quota = torch.cat([(floors.view(batch, length) + extra.long()).flatten(), counts.new_zeros(1)])
    # Rank each member within its group: by score (ties: position), then grouped, both sorts stable.
    keyed = scores.float().masked_fill(~member, math.inf).flatten()
    by_score = torch.sort(keyed, stable=True).indices
    by_group = by_score[torch.sort(flat.flatten()[by_score], stable=True).indices]
    first_of_group = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rank = torch.empty_like(by_group)
    rank[by_group] = torch.arange(batch * length, device=scores.device)
    rank = rank - first_of_group[flat.flatten()]
    return member & (rank < quota[flat.flatten()]).view(batch, length)


def selection_rule(groups: torch.Tensor | None, compression_ratio: float) -> Selection:
    """The selection of a prefill: :func:`select_halted_in_groups` over ``groups`` (``selection="per_row"`` or
    ``"per_frame"``), or the global :func:`select_halted` when there are none."""
    if groups is None:
        return select_halted
    return functools.partial(select_halted_in_groups, groups=groups, compression_ratio=compression_ratio)


def placeholders(input_ids: torch.Tensor, token_ids) -> torch.Tensor:
    """``[batch, tokens]`` bool: where ``input_ids`` holds one of ``token_ids`` (Python ints: nothing is copied to the
    device)."""
    found = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in token_ids:
        found |= input_ids == token_id
    return found


def compact_layout(kept: torch.Tensor, num_slots: int, filler_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each sample's kept tokens go in the shorter sequence that deeper layers run on.

    Each sample's kept positions, ascending, fill the last slots; the leading slots of a sample that keeps fewer
    than ``num_slots`` tokens are filler (they point at one of its non-kept positions and are masked). With
    ``filler_last`` the kept positions fill the first slots and the filler trails them, where causal attention alone
    keeps the kept slots from it.

    Returns
    -------
    index : torch.Tensor
        ``[batch, num_slots]`` long, the original position held by each slot.
    valid : torch.Tensor
        ``[batch, num_slots]`` bool, False on filler slots.
    """
    length = kept.shape[-1]
    positions = torch.arange(length, device=kept.device).expand_as(kept)
    if filler_last:  # kept first, then non-kept, each ascending
        index = torch.sort(torch.where(kept, positions, positions + length), dim=-1).values[:, :num_slots] % length
    else:  # non-kept first, then kept, each ascending
        index = torch.sort(torch.where(kept, positions, positions - length), dim=-1).values[:, -num_slots:] % length
    return index, kept.gather(-1, index)


def segment_halt_counts(lengths: list[int], compression_ratio: float) -> list[int]:
    """The vision tower's halt counts: ``min(round(compression_ratio * n), n - 1)`` per segment of ``n`` patches, so
    that every segment keeps a patch (DESIGN.md section 6)."""
    halted = halt_counts(lengths, compression_ratio)
    return [min(count, length - 1) for count, length in zip(halted, lengths, strict=True)]


def segment_halt_counts_on_device(lengths: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """:func:`segment_halt_counts` where ``lengths`` is, with no copy to or from the host."""
    return torch.minimum(halt_counts_on_device(lengths, compression_ratio), lengths.long() - 1)


def segment_rows(cu_seqlens: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The segments of a flat sequence as rows of a padded ``[segments, longest]`` batch, so that the per-sample rule
    (:func:`select_halted`) applies per segment.

    Parameters
    ----------
    cu_seqlens : torch.Tensor
        ``[segments + 1]`` segment boundaries, from 0 to the sequence length ``n``.
    longest : int
        The longest segment (a shape).

    Returns
    -------
    index : torch.Tensor
        ``[segments, longest]`` long, the flat position of each slot; ``n`` (one past the end) outside the segment.
    inside : torch.Tensor
        ``[segments, longest]`` bool, False on padding.
    """
    starts = cu_seqlens[:-1].long()
    offsets = torch.arange(longest, device=cu_seqlens.device)
    inside = offsets < (cu_seqlens[1:].long() - starts)[:, None]
    return torch.where(inside, starts[:, None] + offsets, cu_seqlens[-1].long()), inside
