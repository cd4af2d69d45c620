"""Tensor helpers that move a layer's inputs from the full prompt to the compact sequence of kept tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch


def take_tokens(tensor: torch.Tensor, index: torch.Tensor, trailing_dims: int = 1) -> torch.Tensor:
    """Select token positions ``index`` (``[batch, slots]``) from ``tensor`` shaped ``[..., batch, tokens, *trailing]``.

    Leading dimensions (Qwen2-VL's 3 M-RoPE axes) and a batch dimension of 1 broadcast.
    """
    leading = tensor.ndim - 2 - trailing_dims
    view = (1,) * leading + tuple(index.shape) + (1,) * trailing_dims
    return torch.take_along_dim(tensor, index.view(view), dim=leading + 1)


def restrict_attention_mask(
    mask: torch.Tensor | None,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    *,
    compact_queries: bool,
    has_filler: bool,
    flash: bool,
) -> torch.Tensor | None:
    """The attention mask of a compact layer, from the mask the model built for the full layout.

    Parameters
    ----------
    mask : torch.Tensor or None
        The model's mask: 4-D ``[batch, 1, queries, keys]`` (bool for SDPA, additive float for eager), 2-D
        ``[batch, keys]`` for FlashAttention, or None for "causal, no padding".
    key_index : torch.Tensor
        ``[batch, compact_keys]`` position of every compact key in the full layout.
    key_valid : torch.Tensor
        ``[batch, compact_keys]`` bool, False on filler slots.
    query_index : torch.Tensor
        ``[batch, queries]`` position of every query in the full layout.
    compact_queries : bool
        True in the prefill, where the queries are the compact slots themselves (``query_index`` is
        ``key_index``): filler rows then attend to their own slot only, so that no row is fully masked.
    has_filler : bool
        Whether any slot is filler; without filler a missing mask stays missing (SDPA's causal fast path).
    flash : bool
        Whether the layer runs FlashAttention, which takes a 2-D padding mask and applies causality itself.
    """
    if mask is None and not has_filler:
        return None
    if flash:
        return key_valid if mask is None else torch.take_along_dim(mask, key_index, dim=-1).bool() & key_valid
    if mask is None:
        allowed = (key_index[:, None, :] <= query_index[:, :, None]) & key_valid[:, None, :]
    else:
        rows = torch.take_along_dim(mask, query_index[:, None, :, None], dim=2) if compact_queries else mask
        allowed = torch.take_along_dim(rows, key_index[:, None, None, :], dim=3)
        if allowed.dtype != torch.bool:
            allowed = allowed == 0  # additive eager mask: 0 attends, a large negative value does not
        allowed = allowed[:, 0] & key_valid[:, None, :]
    if compact_queries:
        slots = key_index.shape[-1]
        own_slot = torch.eye(slots, dtype=torch.bool, device=key_index.device)
        allowed = allowed | (own_slot & ~key_valid[:, :, None])
    allowed = allowed[:, None]
    if mask is None or mask.dtype == torch.bool:
        return allowed
    return additive_mask(allowed, mask.dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True attends) as the additive float mask of eager attention: 0, or the dtype's minimum."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def computed_once(store: dict, value: object, compute: Callable[[object], object]) -> object:
    """``compute(value)``, remembered in ``store`` by the identity of ``value``: the layers or blocks of one forward
    receive the very same mask, rotary or segment objects, so their compact forms are computed once per forward."""
    known = store.get(id(value))
    if known is None or known[0] is not value:  # an id can be reused once its object is gone: check the object
        known = store[id(value)] = (value, compute(value))
    return known[1]
