"""The halted KV cache: layers above the decision layer hold only the kept prompt positions.

A forward that continues a halted cache (a decode step, a question chunk, a chat's next turn) needs, in those
layers, an attention mask over the compact keys instead of the model's full-layout mask. That knowledge travels
with the cache, not with the press: each :class:`HaltedLayer` watches its decoder layer with a forward pre-hook that
acts only on forwards given this very cache, and that is removed when the layer is garbage collected. So such
forwards work inside or outside ``with press(model)``, as kvpress's pipeline needs.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dash_vlm.compact import restrict_attention_mask


class HaltRecord:
    """Where each sample's kept prompt tokens sit in the compact layers; shared by a cache's halted layers.

    Parameters
    ----------
    index : torch.Tensor
        ``[batch, slots]`` original position of each compact slot.
    valid : torch.Tensor
        ``[batch, slots]`` bool, False on filler slots.
    prompt_length : int
        Length ``T`` of the (padded) prompt in the full layout.
    has_filler : bool
        Whether any sample keeps fewer tokens than there are slots.
    flash : bool
        Whether the model runs FlashAttention (2-D masks).
    """

    def __init__(self, index: torch.Tensor, valid: torch.Tensor, prompt_length: int, has_filler: bool, flash: bool):
        self.index, self.valid = index, valid
        self.prompt_length, self.has_filler, self.flash = prompt_length, has_filler, flash
        self._memo: tuple | None = None

    @property
    def slots(self) -> int:
        return self.index.shape[-1]

    def later_mask(self, mask: torch.Tensor | None, num_queries: int, compact_length: int) -> torch.Tensor | None:
        """Mask of a compact layer in a forward that continues the cache; computed once per forward.

        ``compact_length`` is the compact layer's key length in this forward (cached keys plus the queries).
        """
        if self._memo is not None and self._memo[0] is mask and self._memo[1] == compact_length:
            return self._memo[2]
        device = self.index.device if mask is None else mask.device  # layers may sit on several devices
        index, valid, batch = self.index.to(device), self.valid.to(device), self.index.shape[0]
        new_positions = self.prompt_length + torch.arange(compact_length - self.slots, device=device)
        key_index = torch.cat([index, new_positions.expand(batch, -1)], dim=-1)
        key_valid = torch.cat([valid, torch.ones_like(new_positions, dtype=torch.bool).expand(batch, -1)], -1)
        query_index = new_positions[-num_queries:].expand(batch, -1)
        restricted = restrict_attention_mask(
            mask, key_index, key_valid, query_index, compact_queries=False, has_filler=self.has_filler, flash=self.flash
        )
        self._memo = (mask, compact_length, restricted)
        return restricted

    def select_batch(self, indices: torch.Tensor) -> None:
        """Follow a batch reordering of the cache (beam search, contrastive search)."""
        self.index, self.valid = self.index[indices], self.valid[indices]
        self._memo = None


class HaltedLayer(DynamicLayer):
    """A ``DynamicLayer`` of a decoder layer above the decision layer: it stores compact keys and values.

    Lengths given by and to ``transformers`` (``get_seq_length``, ``crop``) follow its own compact storage, except
    that ``crop`` takes a length of the full layout, as the whole-cache ``crop`` does.
    """

    def __init__(self, record: HaltRecord, decoder_layer: nn.Module, layer_idx: int, leader: bool):
        super().__init__()
        self.record, self.layer_idx, self.leader = record, layer_idx, leader
        self._decoder_layer = weakref.ref(decoder_layer)
        self._watch()

    def _watch(self) -> None:
        decoder_layer = self._decoder_layer()
        if decoder_layer is None:
            return
        hook = _continue_halted_cache(weakref.ref(self), self.record)
        handle = decoder_layer.register_forward_pre_hook(hook, with_kwargs=True)
        weakref.finalize(self, handle.remove)

    def __deepcopy__(self, memo: dict) -> HaltedLayer:
        clone = HaltedLayer.__new__(HaltedLayer)
        memo[id(self)] = clone
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        clone._watch()
        return clone

    def crop(self, max_length: int) -> None:
        halted = self.record.prompt_length - self.record.slots  # full-layout positions this layer does not hold
        if max_length < 0:
            max_length = self.get_seq_length() + halted + max_length
        super().crop(max(max_length - halted, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.leader:
            self.record.select_batch(beam_idx.to(self.record.index.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.leader:
            indices = torch.arange(self.record.index.shape[0], device=self.record.index.device)
            self.record.select_batch(indices.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.leader:
            self.record.select_batch(indices)


def _continue_halted_cache(layer_ref: weakref.ref, record: HaltRecord):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask")
        if mask is None and not record.has_filler:  # causal, no padding: the compact keys need no mask either
            return None  # the common decode step: checked first, as this runs in every step of every deeper layer
        layer = layer_ref()
        cache = kwargs.get("past_key_values")
        if (
            layer is None
            or cache is None
            or layer.layer_idx >= len(cache.layers)
            or cache.layers[layer.layer_idx] is not layer
        ):
            return None
        cached = layer.get_seq_length()
        if cached == 0:  # the halting prefill itself: the press gives this layer its compact inputs
            return None
        num_queries = (args[0] if args else kwargs["hidden_states"]).shape[-2]
        kwargs["attention_mask"] = layer.record.later_mask(mask, num_queries, cached + num_queries)
        return args, kwargs

    return hook


def check_cache(cache: object, first_halted_layer: int) -> None:
    """Raise ``ValueError`` unless ``cache`` can hold a halted prefill (a plain, non-offloaded ``DynamicCache``)."""
    if not isinstance(cache, DynamicCache) or cache.offloading:
        raise ValueError(
            "DASH needs past_key_values to be a transformers DynamicCache without offloading, "
            f"got {type(cache).__name__}"
        )
    for layer in cache.layers[first_halted_layer:]:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"DASH cannot halt tokens in a cache layer of type {type(layer).__name__} (sliding-window or "
                "quantized layers above the decision layer are not supported)"
            )


def attach_halted_layers(cache: DynamicCache, decoder_layers: nn.ModuleList, record: HaltRecord, first: int) -> None:
    """Make cache layers ``first..`` compact: they will store only the slots of ``record``."""
    while len(cache.layers) < len(decoder_layers):
        cache.layers.append(DynamicLayer())
    for layer_idx in range(first, len(decoder_layers)):
        cache.layers[layer_idx] = HaltedLayer(record, decoder_layers[layer_idx], layer_idx, leader=layer_idx == first)
