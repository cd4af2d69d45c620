"""The masked reference: an independent, slow implementation of DASH, written from DESIGN.md sections 1 and 6 alone.

It is what the press is held to, by the tests and by ``dash-vlm check bf16`` on a user's GPU. Every token stays in the
sequence. Above the decision layer, halted tokens are masked out as keys (in the prefill and in every later forward)
and their rows are reset to their decision-layer output after every layer. It imports nothing from ``dash_vlm`` (no
plan, no selection, no gather: the selection is a Python sort per sample), and a test holds it to that.
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
        rows: list[list[list[int]]] | None = None,
        chosen: list[list[int]] | None = None,
    ):
        """``rows``: per sample, the positions of each image token row; given, the selection is per row (DESIGN.md
        section 1) and a vision token in no row never halts. ``chosen``: per sample, the positions that halt, instead
        of DASH's selection (another method's choice, to hold its execution to the reference)."""
        self.model, self.ratio, self.scope, self.rows, self.chosen = model, compression_ratio, scope, rows, chosen
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
            if self.rows is not None:
                in_rows = {t for row in self.rows[b] for t in row}
                allowed -= {t for t in real if int(ids[b, t]) in self.vision_ids and t not in in_rows}
            self.eligible.append([t for t in candidates if t in allowed])

    def _on_decision(self, module, args, kwargs, output):
        if not self.in_prefill:
            return
        scores = (output[0] if isinstance(output, tuple) else output).float().norm(dim=-1)
        batch, length = scores.shape
        self.halted = torch.zeros(batch, length, dtype=torch.bool, device=scores.device)
        self.halted_per_sample = []
        for b, eligible in enumerate(self.eligible):
            n_drop = round(self.ratio * len(eligible))
            if self.chosen is not None:
                chosen = self.chosen[b]
            elif self.rows is None:
                chosen = sorted(eligible, key=lambda t: (scores[b, t].item(), t))[:n_drop]
            else:
                chosen = self._per_row(eligible, self.rows[b], n_drop, scores[b])
            self.halted[b, chosen] = True
            self.halted_per_sample.append(sorted(chosen))

    def _per_row(self, eligible: list[int], rows: list[list[int]], n_drop: int, scores) -> list[int]:
        """Each row (and the eligible text tokens, as one more row) halts floor(ratio * n) of its n eligible tokens;
        the rest of n_drop goes to the rows with the largest fractional parts, the earlier row first."""
        in_rows = {t for row in rows for t in row}
        groups = [[t for t in row if t in eligible] for row in rows]
        groups.append([t for t in eligible if t not in in_rows])
        groups = sorted((group for group in groups if group), key=min)
        quotas = [math.floor(self.ratio * len(group)) for group in groups]
        fractions = [self.ratio * len(group) - quota for group, quota in zip(groups, quotas, strict=True)]
        for number in sorted(range(len(groups)), key=lambda g: (-fractions[g], g))[: n_drop - sum(quotas)]:
            quotas[number] += 1
        return [
            t
            for group, quota in zip(groups, quotas, strict=True)
            for t in sorted(group, key=lambda t: (scores[t].item(), t))[:quota]
        ]

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

    def _execution_hooks(self) -> list:
        handles = []
        for layer in self.layers[self.s + 1 :]:
            handles.append(layer.register_forward_pre_hook(self._mask_halted_keys, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._reset_halted_rows, with_kwargs=True))
        return handles

    @contextmanager
    def __call__(self):
        decision = self.layers[self.s]
        mixer = decision.self_attn if hasattr(decision, "self_attn") else decision.linear_attn
        handles = [
            self.base.register_forward_pre_hook(self._on_prefill_start, with_kwargs=True),
            mixer.register_forward_hook(self._on_decision, with_kwargs=True),
            decision.register_forward_hook(self._on_decision_layer_output, with_kwargs=True),
            *self._execution_hooks(),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class SubsequenceReference(MaskedReference):
    """DESIGN.md section 1 rule 16, for a hybrid decoder, one sample at a time: the eligibility and selection of
    :class:`MaskedReference`, but above the decision layer every layer runs on the explicit list of the sample's kept
    positions (no mask can stand for a recurrence): the hidden states, rotary embeddings and position ids at those
    positions, causal attention among them; the final norm sees the kept tokens' states at their positions and the
    halted tokens' decision-layer states. Later forwards run the model's own layers on the cache that leaves; the
    deeper attention layers' masks are written here over the cache's compact keys. Batches of one only."""

    def _on_prefill_start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] != 1:
            raise ValueError("SubsequenceReference runs one sample at a time")
        super()._on_prefill_start(module, args, kwargs)

    def _compact(self, layer, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        recurrent = not hasattr(layer, "self_attn")
        if not self.in_prefill:
            if not recurrent:
                cached = kwargs["past_key_values"].get_seq_length(layer.self_attn.layer_idx)  # this layer's own keys
                kwargs["attention_mask"] = causal_mask(hidden.shape[1], cached, kwargs.get("attention_mask"))
            return (hidden, *args[1:]), kwargs
        if layer is self.layers[self.s + 1]:
            self.kept = [t for t in range(hidden.shape[1]) if not self.halted[0, t]]
            hidden = hidden[:, self.kept]
        kwargs["position_embeddings"] = tuple(part[..., self.kept, :] for part in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., self.kept]
        kwargs["attention_mask"] = None if recurrent else causal_mask(len(self.kept), 0, kwargs.get("attention_mask"))
        return (hidden, *args[1:]), kwargs

    def _restore(self, module, args):
        if not self.in_prefill or not self.halted.any():
            return None
        full = self.layer_s_output.clone()
        full[:, self.kept] = args[0]
        return (full, *args[1:])

    def _execution_hooks(self) -> list:
        handles = [
            layer.register_forward_pre_hook(self._compact, with_kwargs=True) for layer in self.layers[self.s + 1 :]
        ]
        handles.append(self.decoder.norm.register_forward_pre_hook(self._restore))
        return handles


def causal_mask(queries: int, cached: int, like: torch.Tensor | None) -> torch.Tensor | None:
    """Causal attention of ``queries`` new tokens over ``cached`` earlier keys and themselves, in the form of the
    model's own mask ``like`` (bool for SDPA, additive for eager; ``None`` stays ``None`` for a prompt, where SDPA is
    causal by itself, and for one query, which sees every key)."""
    if like is None and (cached == 0 or queries == 1):
        return None
    keys = torch.arange(cached + queries)
    allowed = (keys[None, :] <= (cached + torch.arange(queries))[:, None])[None, None]
    if like is None or like.dtype == torch.bool:
        return allowed.to(None if like is None else like.device)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min
    )


def decoder_reference(model, compression_ratio: float, **options) -> MaskedReference:
    """The reference of a model's decoder: the masked one, or for a hybrid decoder (recurrent layers among its attention
    layers) the subsequence one."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    hybrid = "linear_attention" in kinds
    return (SubsequenceReference if hybrid else MaskedReference)(model, compression_ratio, **options)


class MaskedVisionReference:
    """DESIGN.md section 6, masked: every patch runs every vision block. Above the decision block each block's output
    is recomputed with attention written out here (queries and keys of one attention segment only, halted keys
    masked), and halted rows are reset to their decision-block output. Selection is a Python sort per image or frame
    group; segments come from ``grid_thw`` alone."""

    def __init__(self, model, compression_ratio: float, start_ratio: float = 0.3):
        self.tower = model.model.visual
        self.blocks = self.tower.blocks
        self.ratio = compression_ratio
        self.s = math.floor(start_ratio * len(self.blocks))
        self.halted_per_pass: list[torch.Tensor] = []

    def _on_tower(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.segments = [h * w for t, h, w in grid.tolist() for _ in range(t)]

    def _on_decision(self, module, args, output):
        scores = output.float().norm(dim=-1)
        self.halted = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        start = 0
        for length in self.segments:
            n_halt = min(round(self.ratio * length), length - 1)
            chosen = sorted(range(start, start + length), key=lambda p: (scores[p].item(), p))[:n_halt]
            self.halted[chosen] = True
            start += length
        self.halted_per_pass.append(self.halted.clone())

    def _on_decision_block(self, module, args, output):
        self.block_s_output = output.clone()

    def _masked_block(self, block, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs["cu_seqlens"].tolist()
        cos, sin = kwargs["position_embeddings"]
        attention = block.attn
        n = hidden.shape[0]
        q, k, v = attention.qkv(block.norm1(hidden)).reshape(n, 3, attention.num_heads, -1).unbind(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        segment = torch.zeros(n, dtype=torch.long, device=hidden.device)
        for boundary in cu_seqlens[1:-1]:
            segment[boundary:] += 1
        allowed = (segment[:, None] == segment[None, :]) & ~self.halted[None, :]
        logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * attention.scaling
        weights = logits.masked_fill(~allowed, -math.inf).softmax(-1).nan_to_num()  # a fully halted window: no row
        attended = torch.einsum("hqk,khd->qhd", weights, v.float()).to(hidden.dtype).reshape(n, -1)
        hidden = hidden + attention.proj(attended)
        hidden = hidden + block.mlp(block.norm2(hidden))
        return torch.where(self.halted[:, None], self.block_s_output, hidden)

    @contextmanager
    def __call__(self):
        handles = [
            self.tower.register_forward_pre_hook(self._on_tower, with_kwargs=True),
            self.blocks[self.s].attn.register_forward_hook(self._on_decision),
            self.blocks[self.s].register_forward_hook(self._on_decision_block),
        ]
        handles += [
            block.register_forward_hook(self._masked_block, with_kwargs=True) for block in self.blocks[self.s + 1 :]
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``[patches, heads, dim]`` by ``[patches, dim]`` angles, in float32."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)
