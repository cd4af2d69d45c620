"""The plan of one halting prefill (DESIGN.md section 1, items 4-7), as pure tensor functions: which tokens halt, where
the kept ones sit in the compact sequence, and the inputs of the layers that run on it.

Nothing here knows about hooks: ``press.py`` calls :func:`plan_halting` once per prefill and hands each deeper layer
the plan's precomputed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dash_vlm.cache import HaltRecord
from dash_vlm.compact import restrict_attention_mask, take_tokens
from dash_vlm.halting import Selection, compact_layout, select_halted


@dataclass(frozen=True)
class HaltPlan:
    """Who halts in one prefill, and where the kept tokens go in the compact sequence of the deeper layers.

    Parameters
    ----------
    halted, kept : torch.Tensor
        ``[batch, tokens]`` bool; padding is neither.
    index : torch.Tensor
        ``[batch, slots]`` long, the position each compact slot holds (``halting.compact_layout``).
    valid : torch.Tensor
        ``[batch, slots]`` bool, False on filler slots.
    slot_of_position : torch.Tensor
        ``[batch, tokens]`` long, the slot that holds each kept position.
    has_filler : bool
        Whether some sample keeps fewer tokens than there are slots.
    filler_last : bool
        Whether filler slots trail the kept ones (``halting.compact_layout``): then a prompt without padding needs no
        mask in the compact layers either.
    """

    halted: torch.Tensor
    kept: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    slot_of_position: torch.Tensor
    has_filler: bool
    filler_last: bool = False

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The kept tokens' states: ``[batch, tokens, hidden] -> [batch, slots, hidden]``."""
        return self._take(hidden_states)

    def compact_inputs(self, layer_kwargs: dict, flash: bool, recurrent: bool = False) -> dict:
        """The attention mask, position embeddings and position ids of the compact sequence, from a layer's keyword
        arguments for the full prompt; ``flash``: whether the layers run FlashAttention (2-D masks). A ``recurrent``
        layer (DESIGN.md section 11 item 2) gets the valid slots as its 2-D padding mask, which zeroes the filler
        before it mixes; none without filler."""
        mask, position_ids = layer_kwargs.get("attention_mask"), layer_kwargs.get("position_ids")
        device = self.index.device if mask is None else mask.device  # a layer's inputs may sit on another device
        index, valid = self.index.to(device), self.valid.to(device)
        if recurrent:
            compact_mask = valid if self.has_filler else None
        elif mask is None and self.filler_last and not flash:  # causal attention keeps the trailing filler out
            compact_mask = None
        else:
            compact_mask = restrict_attention_mask(
                mask, index, valid, index, compact_queries=True, has_filler=self.has_filler, flash=flash
            )
        return {
            "attention_mask": compact_mask,
            "position_embeddings": tuple(self._take(part) for part in layer_kwargs["position_embeddings"]),
            "position_ids": None if position_ids is None else self._take(position_ids, trailing_dims=0),
        }

    def _take(self, tensor: torch.Tensor, trailing_dims: int = 1) -> torch.Tensor:
        return take_tokens(tensor, self.index.to(tensor.device), trailing_dims)

    def restore(self, compact: torch.Tensor, decision_output: torch.Tensor) -> torch.Tensor:
        """The full sequence after the last layer: each kept token's state from its slot of ``compact``, each halted
        (and padding) token's from ``decision_output``, the decision layer's output. On ``compact``'s device."""
        device = compact.device  # the last layers may sit on another device than the decision (device_map="auto")
        return torch.where(
            self.kept.to(device)[..., None],
            take_tokens(compact, self.slot_of_position.to(device)),
            decision_output.to(device),
        )

    def unpadded(self, length: int) -> HaltPlan:
        """This plan for the first ``length`` positions of a prompt padded on the right (a captured prefill's bucket),
        copied out of the buffers it was computed in; filler slots that point at padding point at position 0."""
        index = torch.where(self.valid, self.index, 0)
        return HaltPlan(
            self.halted[:, :length].clone(),
            self.kept[:, :length].clone(),
            index,
            self.valid.clone(),
            self.slot_of_position[:, :length].clone(),
            self.has_filler,
            self.filler_last,
        )

    def cache_record(self, flash: bool) -> HaltRecord:
        """What a halted KV cache keeps of this plan, for the forwards that continue it."""
        return HaltRecord(self.index, self.valid, self.kept.shape[-1], self.has_filler, flash)


def plan_halting(
    scores: torch.Tensor,
    real: torch.Tensor,
    eligible: torch.Tensor,
    n_halt: torch.Tensor,
    kept_counts: list[int],
    select: Selection = select_halted,
    slots: int | None = None,
    filler_last: bool = False,
) -> HaltPlan:
    """Select the halted tokens and lay the kept ones out, with no copy to or from the host.

    Parameters
    ----------
    scores : torch.Tensor
        ``[batch, tokens]``, the scorer's; the lowest halt first.
    real, eligible : torch.Tensor
        ``[batch, tokens]`` bool: False on padding; the tokens that may halt.
    n_halt : torch.Tensor
        ``[batch]`` long, how many tokens halt per sample, on the device.
    kept_counts : list of int
        The same knowledge on the host, real tokens minus halted per sample: the compact length is a shape.
    select : Selection
        The selection rule; the global rule by default.
    slots : int, optional
        The compact length; by default the largest kept count. A captured prefill gives its bucket: the same graph
        serves other prompts of its shape, so any slot may be filler (``has_filler``).
    filler_last : bool
        Put the filler after the kept slots (``halting.compact_layout``).
    """
    halted = select(scores, eligible, n_halt)
    kept = real & ~halted
    has_filler = slots is not None or min(kept_counts) < max(kept_counts)
    slots = max(kept_counts) if slots is None else slots
    index, valid = compact_layout(kept, slots, filler_last)
    slot_numbers = torch.arange(slots, device=index.device).expand(kept.shape[0], -1)
    slot_of_position = torch.zeros_like(kept, dtype=torch.long).scatter_(-1, index, slot_numbers)
    return HaltPlan(halted, kept, index, valid, slot_of_position, has_filler, filler_last)


@dataclass(frozen=True)
class SegmentPlan:
    """Who halts in one pass of a vision tower over its flat sequence of patches (DESIGN.md section 6), and the
    inputs of the blocks that run on the kept patches.

    Parameters
    ----------
    index : torch.Tensor
        ``[kept]`` long, the kept positions, ascending: the compact sequence.
    kept_before : torch.Tensor
        ``[patches + 1]`` long, how many patches before each position are kept (maps segment boundaries).
    """

    index: torch.Tensor
    kept_before: torch.Tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept patches' rows: ``[patches, ...] -> [kept, ...]`` (hidden states, rotary embeddings)."""
        return tensor.index_select(0, self.index.to(tensor.device))

    def compact_segments(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The boundaries of the same segments in the compact sequence, a segment left without a kept patch dropped
        (one host sync: the number of segments left is a shape)."""
        compact = self.kept_before.to(cu_seqlens.device)[cu_seqlens.long()].to(cu_seqlens.dtype)
        return torch.unique_consecutive(compact)

    def restore(self, compact: torch.Tensor, decision_output: torch.Tensor) -> torch.Tensor:
        """Every patch again: the kept ones from ``compact``, the halted ones from the decision block's output."""
        return decision_output.to(compact.device).index_copy(0, self.index.to(compact.device), compact)


def plan_segment_halting(
    scores: torch.Tensor, index: torch.Tensor, inside: torch.Tensor, n_halt: torch.Tensor, patches: int, kept: int
) -> SegmentPlan:
    """Select the halted patches per segment and lay the kept ones out, with no copy to or from the host.

    Parameters
    ----------
    scores : torch.Tensor
        ``[segments, longest]``, the scorer's, over the segments' padded rows (``halting.segment_rows``: ``index``,
        ``inside``); the lowest halt first.
    n_halt : torch.Tensor
        ``[segments]`` long, on the device.
    patches, kept : int
        The numbers of patches and of kept patches, known on the host: both are shapes.
    """
    halted_rows = select_halted(scores, inside, n_halt)
    halted = torch.zeros(patches + 1, dtype=torch.bool, device=index.device)  # the last slot takes the padding
    halted = halted.scatter_(0, index.flatten(), halted_rows.flatten())[:patches]
    compact_index, _ = compact_layout(~halted[None], kept)
    kept_before = torch.nn.functional.pad((~halted).long().cumsum(0), (1, 0))
    return SegmentPlan(compact_index[0], kept_before)
