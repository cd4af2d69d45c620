"""The prefill's per-token work in chunks of tokens (DESIGN.md section 1 rule 17): what a long video's prefill
allocates at once is the MLP activation of every prompt token (tens of GiB on Qwen2-VL-7B shapes at 5,000 frames) and
the vision tower's float32 rotary copy of every patch's queries and keys. A chunk of ``tokens`` rows at a time
computes the same values (each row's MLP reads that row only; a tower attention call reads its own segments only) in
a fraction of the memory.

Within a ``with press(model)`` block (``DeltaPress.prefill_chunk``), each per-token module of the adapter
(``ModelAdapter.per_token_modules``: the decoder layers' MLPs, full or compact, and a Qwen tower's block MLPs) runs on
at most ``tokens`` rows at a time, and each segment attention module (``ModelAdapter.segment_attention_modules``: a
Qwen tower block's attention) on whole segments packed into chunks of at most ``tokens`` patches (a segment longer
than that is a chunk of its own). A call on fewer rows (every decode step) runs as it is. The modules' ``forward`` is
swapped for the block and restored after it.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from dash_vlm.models import ModelAdapter

logger = logging.getLogger(__name__)

ALLOCATOR_SETTINGS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the older name and torch's newer one
EXPANDABLE = "expandable_segments:True"
AUTO_SHARE = 0.125  # of the free GPU memory, for one chunk's widest MLP intermediates
MIN_AUTO_TOKENS = 4096  # "auto" never chunks finer than this: a chunk's matmuls stay large enough to run at full rate
INTERMEDIATES = 3  # an MLP holds about three activations of its widest layer at once (gate, up, their product)


def prefer_expandable_segments() -> bool:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` when the user set no allocator configuration and CUDA
    has not started (its caching allocator reads the setting once, at its first allocation), and log it; whether it
    was set. A long video's prefill otherwise stops on fragmentation first: on the H200 the default allocator held
    32 GiB reserved but unallocated where the largest request failed (BENCHMARKS.md, "The longest video that fits").
    A user's own setting, whatever it says, is never changed."""
    if any(name in os.environ for name in ALLOCATOR_SETTINGS) or not torch.cuda.is_available():
        return False
    if torch.cuda.is_initialized():
        logger.debug("CUDA has started: the allocator keeps its settings (%s not set)", EXPANDABLE)
        return False
    os.environ[ALLOCATOR_SETTINGS[0]] = EXPANDABLE
    logger.info("set %s=%s (no allocator setting was given): long prompts fragment the default one less",
                ALLOCATOR_SETTINGS[0], EXPANDABLE)  # fmt: skip
    return True


def auto_chunk_tokens(modules: list[nn.Module], device: torch.device, free_bytes: int | None = None) -> int:
    """The chunk of ``prefill_chunk="auto"``: as many tokens as fit ``AUTO_SHARE`` of the free GPU memory in the widest
    module's intermediates, at least ``MIN_AUTO_TOKENS``; 0 (no chunking) on a CPU, whose memory is not the limit
    the chunks are for."""
    if device.type != "cuda" or not modules:
        return 0
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    widest = max(widest_row_bytes(module) for module in modules)
    return max(MIN_AUTO_TOKENS, int(free_bytes * AUTO_SHARE / (INTERMEDIATES * widest)))


def widest_row_bytes(module: nn.Module) -> int:
    """Bytes of one row of the widest output among a module's weights (a linear layer's, or a grouped expert's)."""
    widths = [(parameter.shape[-2] if parameter.ndim >= 2 else 1, parameter.element_size()) for parameter in
              module.parameters()]  # fmt: skip
    return max((width * size for width, size in widths), default=1)


class TokenChunks:
    """The swapped forwards of one ``with press(model)`` block; :meth:`remove` restores them exactly."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, setting: int | str):
        per_token, segment_attention = adapter.per_token_modules(model), adapter.segment_attention_modules(model)
        device = next(model.parameters()).device
        self.tokens = auto_chunk_tokens(per_token, device) if setting == "auto" else setting
        self._swapped: list[tuple[nn.Module, object]] = []
        if self.tokens <= 0:
            return
        logger.debug("prefill work in chunks of %d tokens", self.tokens)
        for modules, run in ((per_token, rows_in_chunks), (segment_attention, segments_in_chunks)):
            for module in modules:
                self._swapped.append((module, vars(module).get("forward")))  # accelerate's own swap, if any
                module.forward = functools.partial(run, module.forward, self.tokens)

    def remove(self) -> None:
        for module, previous in reversed(self._swapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._swapped = []


def rows_in_chunks(forward, tokens: int, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A per-token module on at most ``tokens`` rows at a time: the leading dimensions flattened into the token
    dimension, the input's rank kept (a sparse MoE block reads ``[batch, tokens, hidden]``)."""
    rows = hidden.shape[:-1].numel()
    if rows <= tokens:
        return forward(hidden, *args, **kwargs)
    flat = hidden.reshape(*(1,) * (hidden.ndim - 2), rows, hidden.shape[-1])
    parts = [forward(part, *args, **kwargs) for part in flat.split(tokens, dim=-2)]
    return torch.cat(parts, dim=-2).reshape(*hidden.shape[:-1], parts[0].shape[-1])


def segments_in_chunks(
    forward,
    tokens: int,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rotary_pos_emb: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """A Qwen vision attention (``[patches, hidden]``, attention within the segments of ``cu_seqlens``) on whole
    segments packed into chunks of at most ``tokens`` patches."""
    per_patch = {"rotary_pos_emb": rotary_pos_emb, "position_embeddings": position_embeddings}
    if hidden_states.shape[0] <= tokens:
        return forward(hidden_states, cu_seqlens=cu_seqlens, **per_patch, **kwargs)
    bounds = cu_seqlens.tolist()  # on the host: only for a pass larger than one chunk
    outputs, first = [], 0
    while first < len(bounds) - 1:
        last = first + 1
        while last < len(bounds) - 1 and bounds[last + 1] - bounds[first] <= tokens:
            last += 1
        rows = slice(bounds[first], bounds[last])
        sliced = {name: None if value is None else rows_of(value, rows) for name, value in per_patch.items()}
        chunk_bounds = cu_seqlens[first : last + 1] - bounds[first]
        outputs.append(forward(hidden_states[rows], cu_seqlens=chunk_bounds, **sliced, **kwargs))
        first = last
    return torch.cat(outputs)


def rows_of(value: torch.Tensor | tuple[torch.Tensor, ...], rows: slice) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return tuple(part[rows] for part in value) if isinstance(value, tuple) else value[rows]
