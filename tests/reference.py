"""An independent, slow, masked implementation of DASH, written from DESIGN.md section 1 alone.

Every token stays in the sequence. Above the decision layer, halted tokens are masked out as keys (in the prefill
and in every later forward) and their rows are reset to their decision-layer output after every layer. It shares
no code with ``dash_vlm``: the selection is a Python sort per sample.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


class MaskedReference:
    def __init__(
        self,
        model,
        compression_ratio: float,
        start_ratio: float = 0.4,
        scope: str = "vision",
        protect_last: int = 1,
        protect_first: int = 0,
        protect: torch.Tensor | None = None,
    ):
        self.model, self.ratio, self.scope = model, compression_ratio, scope
        self.protect_last, self.protect_first, self.protect = protect_last, protect_first, protect
        base = model.model
        self.base = base
        self.decoder = getattr(base, "language_model", base)
        self.layers = self.decoder.layers
        self.s = math.floor(start_ratio * len(self.layers))
        config = model.config
        self.vision_ids = {
            getattr(config, name)
            for name in ("image_token_id", "video_token_id")
            if getattr(config, name, None) is not None
        }
        self.halted: torch.Tensor | None = None  # [batch, prompt] of the last prefill
        self.halted_per_sample: list[list[int]] = []

    def _on_prefill_start(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self.in_prefill = cache is None or cache.get_seq_length() == 0
        if not self.in_prefill:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        self.eligible = []
        for b in range(ids.shape[0]):
            real = [t for t in range(ids.shape[1]) if mask[b, t]]
            candidates = [t for t in real if self.scope == "all" or int(ids[b, t]) in self.vision_ids]
            start, end = real[self.protect_first :], real[: len(real) - self.protect_last]
            allowed = set(start) & set(end)
            if self.protect is not None:
                allowed -= {t for t in real if self.protect[b, t]}
            self.eligible.append([t for t in candidates if t in allowed])

    def _on_decision(self, module, args, kwargs, output):
        if not self.in_prefill:
            return
        scores = output[0].float().norm(dim=-1)
        batch, length = scores.shape
        self.halted = torch.zeros(batch, length, dtype=torch.bool, device=scores.device)
        self.halted_per_sample = []
        for b, eligible in enumerate(self.eligible):
            n_drop = round(self.ratio * len(eligible))
            chosen = sorted(eligible, key=lambda t: (scores[b, t].item(), t))[:n_drop]
            self.halted[b, chosen] = True
            self.halted_per_sample.append(sorted(chosen))

    def _on_decision_layer_output(self, module, args, kwargs, output):
        if self.in_prefill:
            self.layer_s_output = (output[0] if isinstance(output, tuple) else output).clone()

    def _mask_halted_keys(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        queries = hidden.shape[1]
        if mask is None:
            cache = kwargs.get("past_key_values")
            keys = queries if cache is None else cache.get_seq_length(0)  # layer 0 already holds this forward's keys
            offset = keys - queries
            positions = torch.arange(keys, device=hidden.device)
            mask = (positions[None, :] <= (offset + positions[:queries])[:, None])[None, None]
            mask = mask.expand(hidden.shape[0], 1, queries, keys)
        halted = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
        halted[:, : self.halted.shape[1]] = self.halted
        halted = halted[:, None, None, :]
        if mask.dtype == torch.bool:
            mask = mask & ~halted
        else:
            mask = mask.masked_fill(halted, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    def _reset_halted_rows(self, module, args, kwargs, output):
        if not self.in_prefill:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.where(self.halted[..., None], self.layer_s_output, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @contextmanager
    def __call__(self):
        handles = [
            self.base.register_forward_pre_hook(self._on_prefill_start, with_kwargs=True),
            self.layers[self.s].self_attn.register_forward_hook(self._on_decision, with_kwargs=True),
            self.layers[self.s].register_forward_hook(self._on_decision_layer_output, with_kwargs=True),
        ]
        for layer in self.layers[self.s + 1 :]:
            handles.append(layer.register_forward_pre_hook(self._mask_halted_keys, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._reset_halted_rows, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
