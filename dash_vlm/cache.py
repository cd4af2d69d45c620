"""The halted KV cache: layers above the decision layer hold only the kept prompt positions.

A forward that continues a halted cache (a decode step, a question chunk, a chat's next turn) needs, in those
layers, an attention mask over the compact keys instead of the model's full-layout mask. That knowledge travels
with the cache, not with the press, and the model carries no hook between forwards: the cache layer of the decision
layer (:class:`ArmingLayer`; in a hybrid decoder's list cache, the last attention layer at or below it,
:class:`HaltedListCache`) is updated in every such forward before any deeper layer runs, and only then gives the
first deeper attention layer a one-shot pre-hook that rewrites its mask, arms the next one's and removes itself. So
such forwards work inside or outside ``with press(model)``, as kvpress's pipeline needs, and after any forward the
model can be saved or copied as it was. A halted cache deep-copies; it refers weakly to its model's layers, so it
does not pickle (a clear ``TypeError``).
"""

from __future__ import annotations

import copy
import functools
import threading
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

    def __init__(self, record: HaltRecord, layer_idx: int, leader: bool):
        super().__init__()
        self.record, self.layer_idx, self.leader = record, layer_idx, leader

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


class _RefusesPickling:
    """A halted cache's part that refers weakly to the model's layers: deep copies share those references (the copy
    serves the same model), pickling is refused with a clear error instead of failing on a weak reference."""

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a halted cache ({type(self).__name__}) refers to its model's decoder layers and cannot be pickled; "
            "pickle the model, or a cache filled without a halting press"
        )

    def __deepcopy__(self, memo: dict):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class ArmingLayer(_RefusesPickling, DynamicLayer):
    """The decision layer's ``DynamicLayer`` in a halted cache (every prompt position). Its ``update`` runs in each
    forward that continues the cache, after the model has built its masks and before any deeper layer runs: it arms
    the first deeper layer's one-shot mask rewrite (:class:`MaskRewrite`), which arms the next one as it runs."""

    def __init__(self, record: HaltRecord, decoder_layers: list[nn.Module], first_halted: int):
        super().__init__()
        self.record = record
        # Weak: the cache must not keep the model alive; copied as they are by deepcopy (weak references are atomic).
        self.chain = [(first_halted + offset, weakref.ref(layer)) for offset, layer in enumerate(decoder_layers)]
        self.one_mask = share_one_mask(decoder_layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None):
        if self.get_seq_length() > 0:  # a later forward; the prefill and a cache being filled arm nothing
            MaskRewrite(self.chain, self.record, may_stop=self.one_mask)
        return super().update(key_states, value_states, cache_kwargs)


class HaltedListCache(_RefusesPickling):
    """What a halted cache that keeps plain per-layer lists (``key_cache``, ``value_cache``; a hybrid decoder's
    recurrent layers' ``conv_states`` and ``recurrent_states``: Qwen3.5's ``Qwen3_5DynamicCache``) adds to its own
    class (:func:`attach_halted_layers` gives the instance a subclass of both). Updating ``arming_layer``, the last
    attention layer at or below the decision layer, in a later forward arms the mask rewrite of the deeper attention
    layers (``rewrite_chain``); the deeper recurrent layers need none, each sample's states being its kept tokens'.
    The cache's length stays the full layout's, read from its first attention layer (DESIGN.md section 11)."""

    halt_record: HaltRecord
    arming_layer: int
    rewrite_chain: list[tuple[int, weakref.ref]]
    one_mask: bool  # the deeper attention layers share one mask (share_one_mask)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        if layer_idx == self.arming_layer and self.rewrite_chain and self.key_cache[layer_idx] is not None:
            MaskRewrite(self.rewrite_chain, self.halt_record, may_stop=self.one_mask)
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.halt_record.select_batch(beam_idx.to(self.halt_record.index.device))


@functools.cache
def _halted_list_class(cache_class: type) -> type:
    return type(f"Halted{cache_class.__name__}", (HaltedListCache, cache_class), {})


def is_list_cache(cache: object) -> bool:
    """Whether ``cache`` keeps plain per-layer lists of keys, values and recurrent states (``HaltedListCache``)."""
    return not isinstance(cache, DynamicCache) and all(
        hasattr(cache, name) for name in ("key_cache", "value_cache", "recurrent_states")
    )


def halted_state(cache: object, layer_idx: int) -> tuple[HaltRecord, int] | None:
    """The halt record of cache layer ``layer_idx`` and how many keys it holds, or ``None`` when it is not halted."""
    if isinstance(cache, HaltedListCache):
        if layer_idx not in (index for index, _ in cache.rewrite_chain):
            return None
        return cache.halt_record, cache.key_cache[layer_idx].shape[-2]
    layers = getattr(cache, "layers", [])
    layer = layers[layer_idx] if layer_idx < len(layers) else None
    record = getattr(layer, "record", None)
    return None if record is None else (record, layer.get_seq_length())


def share_one_mask(layers: list[nn.Module]) -> bool:
    """Whether decoder layers of one attention type receive one mask: when the first needs no rewrite, none does."""
    return len({getattr(layer, "attention_type", None) for layer in layers}) <= 1


class MaskRewrite:
    """The pre-hook of one deeper decoder layer for one forward on a halted cache, armed when the previous layer ran:
    it arms the next layer's, replaces this layer's full-layout mask with the compact one (``HaltRecord.later_mask``)
    and removes itself, so that the model carries at most one such hook, and none between forwards. ``chain`` lists
    the layers to rewrite, this one first, as (cache layer index, weak reference). With ``may_stop`` (the first
    deeper layer, when all deeper layers share one mask) a forward given no mask and no filler (a decode step after
    an unpadded prompt) arms nothing further. A forward of another thread leaves it in place; one of this thread on
    another cache (a forward that failed before reaching it) removes it."""

    def __init__(self, chain: list[tuple[int, weakref.ref]], record: HaltRecord, may_stop: bool = False):
        self.chain, self.record, self.may_stop = chain, weakref.ref(record), may_stop
        self.thread = threading.get_ident()
        module = chain[0][1]()
        self.handle = None if module is None else module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if threading.get_ident() != self.thread:
            return None
        self.handle.remove()
        record, cache = self.record(), kwargs.get("past_key_values")
        state = None if cache is None else halted_state(cache, self.chain[0][0])
        if record is None or state is None or state[0] is not record:
            return None
        mask = kwargs.get("attention_mask")
        needs_rewrite = mask is not None or record.has_filler
        if len(self.chain) > 1 and (needs_rewrite or not self.may_stop):
            MaskRewrite(self.chain[1:], record)
        if not needs_rewrite:  # causal, no padding, no filler: the compact keys need no mask either
            return None
        num_queries = (args[0] if args else kwargs["hidden_states"]).shape[-2]
        kwargs["attention_mask"] = record.later_mask(mask, num_queries, state[1] + num_queries)
        return args, kwargs


def check_cache(cache: object, first_halted_layer: int) -> None:
    """Raise ``ValueError`` unless ``cache`` can hold a halted prefill: a plain, non-offloaded ``DynamicCache``, whose
    layers from the decision layer on are plain ``DynamicLayer``s, or a list cache (:func:`is_list_cache`)."""
    if is_list_cache(cache):
        return
    if not isinstance(cache, DynamicCache) or cache.offloading:
        raise ValueError(
            "DASH needs past_key_values to be a transformers DynamicCache without offloading, "
            f"got {type(cache).__name__}"
        )
    for layer in cache.layers[first_halted_layer - 1 :]:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"DASH cannot halt tokens in a cache layer of type {type(layer).__name__} (sliding-window or "
                "quantized layers from the decision layer on are not supported)"
            )


def attach_halted_layers(
    cache: object,
    decoder_layers: nn.ModuleList,
    record: HaltRecord,
    first: int,
    recurrent: frozenset[int] = frozenset(),
) -> None:
    """Make the cache layers ``first..`` compact: they will store only the slots of ``record``. In a ``DynamicCache``,
    cache layer ``first - 1`` (full, holding every position) becomes the :class:`ArmingLayer` that prepares the later
    forwards' masks; a list cache becomes a :class:`HaltedListCache`, armed by its last attention layer below
    ``first`` (``recurrent``: the recurrent layers' indices)."""
    if is_list_cache(cache):
        attention = [index for index in range(len(decoder_layers)) if index not in recurrent]
        cache.__class__ = _halted_list_class(type(cache))
        cache.halt_record, cache.arming_layer = record, max(index for index in attention if index < first)
        deeper = [index for index in attention if index >= first]
        cache.rewrite_chain = [(index, weakref.ref(decoder_layers[index])) for index in deeper]
        cache.one_mask = share_one_mask([decoder_layers[index] for index in deeper])
        return
    while len(cache.layers) < len(decoder_layers):
        cache.layers.append(DynamicLayer())
    arming, full = ArmingLayer(record, list(decoder_layers[first:]), first), cache.layers[first - 1]
    if full.is_initialized:
        arming.lazy_initialization(full.keys, full.values)
        arming.keys, arming.values = full.keys, full.values
    cache.layers[first - 1] = arming
    for layer_idx in range(first, len(decoder_layers)):
        cache.layers[layer_idx] = HaltedLayer(record, layer_idx, leader=layer_idx == first)


def key_value_bytes(cache: object, num_layers: int) -> list[int]:
    """Per decoder layer, the bytes of the keys and values of one position of one sample in ``cache`` (0 for a layer
    that holds none: a recurrent layer, or one not filled)."""
    if is_list_cache(cache):
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    sizes = []
    for keys, values in pairs[:num_layers]:
        if keys is None or keys.ndim != 4:
            sizes.append(0)
        else:
            sizes.append(
                keys.shape[1] * keys.shape[-1] * keys.element_size()
                + values.shape[1] * values.shape[-1] * values.element_size()
            )
    return sizes + [0] * (num_layers - len(sizes))
