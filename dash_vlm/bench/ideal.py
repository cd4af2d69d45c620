"""The ideal gains: one decoder layer of each kind timed at ``T`` and at ``K``, one vision block at every patch and at
the kept ones, and the formulas that turn them into the gain a perfect implementation would reach."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from dash_vlm.bench.timers import replay_milliseconds
from dash_vlm.compact import take_tokens
from dash_vlm.models import adapter_for
from dash_vlm.press import DeltaPress


def layer_kinds(model: nn.Module) -> list[str]:
    """Each decoder layer's kind: "recurrent" (a hybrid decoder's linear-attention layers) or "attention"."""
    adapter = adapter_for(model)
    recurrent = adapter.recurrent_layers(model.config)
    return ["recurrent" if index in recurrent else "attention" for index in range(len(adapter.decoder(model).layers))]


def layer_milliseconds(model: nn.Module, inputs: dict, lengths: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Time of one decoder layer of each kind (:func:`layer_kinds`; a middle one of the kind, all have the same shape)
    at each sequence length, replaying the arguments the first layer of its kind receives in a vanilla prefill, cut to
    the first ``length`` positions (moved to the timed layer's device first, when the model is split over several
    GPUs); :func:`replay_milliseconds` times it."""
    layers = adapter_for(model).decoder(model).layers
    kinds = layer_kinds(model)
    captured = {}
    handles = [
        layers[kinds.index(kind)].register_forward_pre_hook(
            lambda module, args, kwargs, kind=kind: captured.setdefault(kind, (args, kwargs)), with_kwargs=True
        )
        for kind in dict.fromkeys(kinds)
    ]
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for kind, (args, kwargs) in captured.items():
        of_kind = [index for index, other in enumerate(kinds) if other == kind]
        layer = layers[of_kind[len(of_kind) // 2]]
        result[kind] = _replay_layer(layer, args, kwargs, lengths, repeats)
    return result


def _replay_layer(layer: nn.Module, args: tuple, kwargs: dict, lengths: list[int], repeats: int) -> dict[int, float]:
    device = next(layer.parameters()).device  # in a split model the inputs move to it once, before any timing

    def to_layer(value):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    hidden = to_layer(args[0] if args else kwargs["hidden_states"])
    kwargs = {
        key: tuple(map(to_layer, value)) if isinstance(value, tuple) else to_layer(value)
        for key, value in kwargs.items()
    }
    result = {}
    for length in lengths:
        index = torch.arange(length, device=device).expand(hidden.shape[0], -1)
        layer_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("hidden_states", "past_key_values", "attention_mask")
        }
        layer_kwargs["position_embeddings"] = tuple(take_tokens(part, index) for part in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            layer_kwargs["position_ids"] = take_tokens(kwargs["position_ids"], index, trailing_dims=0)
        mask = kwargs.get("attention_mask")  # 4-D for attention, 2-D padding for a recurrent layer
        layer_kwargs["attention_mask"] = (
            None if mask is None else mask[:, :length] if mask.ndim == 2 else mask[..., :length, :length]
        )
        layer_kwargs["use_cache"] = False
        result[length] = replay_milliseconds(layer, (hidden[:, :length],), layer_kwargs, repeats, captured=True)
    return result


def vision_block_milliseconds(
    model: nn.Module, inputs: dict, presses: dict[float, DeltaPress | None], repeats: int
) -> tuple[int, dict[float, float]]:
    """Time of one vision block above every decision block, per vision ratio (``None`` press: vanilla), replaying the
    arguments it receives in a prefill under that press: every patch, or the kept patches with their compact
    segments. Returns the block's index and the times."""
    blocks = adapter_for(model).vision_blocks(model)
    decisions = [press.vision_scorer().layer(len(blocks)) for press in presses.values() if press is not None]
    index = min(max([len(blocks) // 2, *(decision + 1 for decision in decisions)]), len(blocks) - 1)
    result = {}
    for vision_ratio, press in presses.items():
        captured = {}

        def capture(module, args, kwargs, output, captured=captured):
            captured.setdefault("call", (args, dict(kwargs)))

        handle = blocks[index].register_forward_hook(capture, with_kwargs=True)
        try:
            with torch.inference_mode(), press(model) if press is not None else nullcontext():
                model(**inputs, use_cache=False)
        finally:
            handle.remove()
        result[vision_ratio] = replay_milliseconds(blocks[index], *captured["call"], repeats)
    return index, result


def decoder_ideal_speedup(
    kinds: list[str], decision_layer: int, full_ms: dict[str, float], kept_ms: dict[str, float]
) -> float:
    """The decoder's ideal gain from the time of a layer of each kind at ``T`` (``full_ms``) and at ``K``
    (``kept_ms``): every layer's time at ``T`` over layers ``0..s`` at ``T`` plus the deeper ones at ``K``; a layer
    cannot take longer on fewer tokens (see :func:`ideal_speedup`). One kind: ``ideal_speedup``'s formula."""
    kept_ms = {kind: min(kept_ms[kind], full_ms[kind]) for kind in full_ms}
    whole = sum(full_ms[kind] for kind in kinds)
    halting = sum((full_ms if index <= decision_layer else kept_ms)[kind] for index, kind in enumerate(kinds))
    return whole / halting


def ideal_speedup(num_layers: int, decision_layer: int, full_ms: float, kept_ms: float) -> float:
    """``L t(T) / ((s + 1) t(T) + (L - s - 1) t(K))``, for the decoder's layers or the vision tower's blocks; a layer
    cannot take longer on fewer tokens, so a measured ``t(K) > t(T)`` (timing noise when ``K`` is close to ``T``)
    counts as ``t(T)``."""
    kept_ms = min(kept_ms, full_ms)
    deeper = num_layers - decision_layer - 1
    return num_layers * full_ms / ((decision_layer + 1) * full_ms + deeper * kept_ms)
