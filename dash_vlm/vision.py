"""The vision-tower halting site (DESIGN.md section 6): the hooks that halt patches inside the vision tower of
Qwen2-VL and Qwen2.5-VL.

In a ``with press(model)`` block with ``vision_compression_ratio > 0``, every pass of the tower (one per kind of
visual input: the images, then the videos of a prefill) is executed as follows:

1. the tower's pre-hook reads the segments (one per image or frame group) and the halt counts per segment (one host
   sync, on the grid the tower reads on the host itself); without a block above the decision block nothing else
   happens;
2. hooks on the decision block give the scorer what it reads there, each segment read as one sample (a row of a
   padded batch); its output hook makes the plan (``plan.plan_segment_halting``);
3. a pre-hook on every deeper block hands it the kept patches (gathered once), their rotary embeddings and the
   segment boundaries of the compact sequence (each computed once per pass);
4. a hook on the last block puts every halted patch back, with its decision-block output, so the merger and the
   tower's output see every patch; a pre-hook on each tap of a compact block (``ModelAdapter.vision_taps``: Qwen3-VL's
   DeepStack mergers) does the same for the tap's input.

The hooks of steps 2-4 are added in step 1 and removed when the pass ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dash_vlm.compact import computed_once
from dash_vlm.halting import segment_halt_counts, segment_halt_counts_on_device, segment_rows
from dash_vlm.models import ModelAdapter
from dash_vlm.plan import SegmentPlan, plan_segment_halting
from dash_vlm.scorers import Reading, Scorer, read_decision_layer


@dataclass
class VisionPass:
    """One pass of the tower under the press: the patches of each segment, how many of them were kept, and which of
    the pass's patches halted (``[patches]`` bool on the device; ``None`` when none did)."""

    segment_patches: list[int]
    segment_kept: list[int]
    halted: torch.Tensor | None = None


@dataclass
class _PassState:
    """What the hooks of one pass that halts share."""

    index: torch.Tensor  # [segments, longest]: the segments (halt counts are per segment) as padded rows
    inside: torch.Tensor
    n_halt: torch.Tensor
    patches: int
    kept: int
    reading: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: SegmentPlan | None = None
    decision_output: torch.Tensor | None = None
    compact: dict = field(default_factory=dict)  # the compact block inputs (``compact.computed_once``)


class VisionHalting:
    """The hooks of the vision-tower site for one ``with press(model)`` block; ``remove`` restores the model."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, compression_ratio: float, scorer: Scorer):
        self.adapter, self.ratio, self.scorer = adapter, compression_ratio, scorer
        tower = adapter.vision_tower(model)
        self.blocks: nn.ModuleList = adapter.vision_blocks(model)
        self.decision_block = scorer.layer(len(self.blocks))
        self.passes: list[VisionPass] = []  # the passes of the current prefill; the press hands a fresh list to each
        self.state: _PassState | None = None
        self.handles = [
            tower.register_forward_pre_hook(self._on_pass_start, with_kwargs=True),
            tower.register_forward_hook(self._on_pass_end, always_call=True),  # also when the tower fails
        ]
        self.pass_handles: list = []
        self.patch_order: torch.Tensor | None = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._remove_pass_hooks()

    def _remove_pass_hooks(self) -> None:
        for handle in self.pass_handles:
            handle.remove()
        self.pass_handles, self.state = [], None

    def _on_pass_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._remove_pass_hooks()  # left by a pass that failed
        self.patch_order = self.adapter.vision_patch_order(module, args, kwargs)
        lengths, lengths_on_device = self.adapter.vision_segments(args, kwargs)
        n_halt = segment_halt_counts(lengths, self.ratio)
        if not any(n_halt) or self.decision_block + 1 >= len(self.blocks):
            self.passes.append(VisionPass(lengths, lengths))  # nothing halts, or no block runs above the decision
            return
        kept = [length - halted for length, halted in zip(lengths, n_halt, strict=True)]
        self.passes.append(VisionPass(lengths, kept))
        index, inside = segment_rows(torch.nn.functional.pad(lengths_on_device.cumsum(0), (1, 0)), max(lengths))
        n_halt_on_device = segment_halt_counts_on_device(lengths_on_device, self.ratio)
        self.state = _PassState(index, inside, n_halt_on_device, sum(lengths), sum(kept))
        if "input_ids" in self.scorer.reads:  # patches have no token ids: a hash reads the position in the segment
            self.state.reading["input_ids"] = torch.zeros_like(index)
        decision = self.blocks[self.decision_block]
        # the reading hooks come first: the block's output is read before the decision hook scores
        handles = read_decision_layer(decision, self.adapter.vision_attention(decision), self.scorer.reads, self._read)
        handles.append(decision.register_forward_hook(self._on_decision_output))
        for block in self.blocks[self.decision_block + 1 :]:
            handles.append(block.register_forward_pre_hook(self._on_compact_block, with_kwargs=True))
        handles.append(self.blocks[-1].register_forward_hook(self._on_last_block))
        for index, tap in self.adapter.vision_taps(module).items():
            if self.decision_block < index < len(self.blocks) - 1:  # the taps of compact blocks (the last restores)
                handles.append(tap.register_forward_pre_hook(self._on_tap))
        self.pass_handles = handles

    def _read(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a reading of the flat patches as the segments' padded rows: each segment is scored as one sample."""
        padded = torch.cat([tensor, tensor.new_zeros(1, *tensor.shape[1:])])
        self.state.reading[name] = padded[self.state.index.to(tensor.device)]

    def _on_decision_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        state = self.state
        device = output.device  # a split model's blocks may sit on another device than the tower's inputs
        index, inside, n_halt = state.index.to(device), state.inside.to(device), state.n_halt.to(device)
        scores = self.scorer.score(Reading(inside, **state.reading))
        state.reading = {}
        state.plan = plan_segment_halting(scores, index, inside, n_halt, state.patches, state.kept)
        state.decision_output = output
        halted = state.plan.kept_before.diff() == 0  # in the tower's order of patches: put back in the processor's
        if self.patch_order is not None:
            halted = torch.zeros_like(halted).index_copy_(0, self.patch_order.to(halted.device), halted)
        self.passes[-1].halted = halted

    def _on_compact_block(self, module: nn.Module, args: tuple, kwargs: dict):
        if module is self.blocks[self.decision_block + 1]:  # the first block above the decision: gather once
            if args:
                args = (self.state.plan.gather(args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = self.state.plan.gather(kwargs["hidden_states"])
        plan, compact = self.state.plan, self.state.compact
        if kwargs.get("cu_seqlens") is not None:
            kwargs["cu_seqlens"] = computed_once(compact, kwargs["cu_seqlens"], plan.compact_segments)
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = computed_once(
                compact, kwargs["position_embeddings"], lambda parts: tuple(plan.gather(part) for part in parts)
            )
        return args, kwargs

    def _on_last_block(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.state.plan.restore(output, self.state.decision_output)

    def _on_tap(self, module: nn.Module, args: tuple) -> tuple:
        """A module reading a compact block's output (a DeepStack merger) gets every patch, as the merger does."""
        return (self.state.plan.restore(args[0], self.state.decision_output), *args[1:])

    def _on_pass_end(self, module: nn.Module, args: tuple, output) -> None:
        self._remove_pass_hooks()


def vision_counts(
    input_ids: torch.Tensor, token_ids: list[int], patches_per_token: int, passes: list[VisionPass]
) -> tuple[list[int], list[int], list[list[int]]]:
    """Each sample's patches, kept patches and halted patches (indices among the sample's patches: those of its
    images, then of its videos, each in the processor's order). The tower makes one pass per kind of placeholder
    present, in the order of ``token_ids``, over the samples' images (or videos) in order; a kind without a recorded
    pass kept every patch."""
    batch = input_ids.shape[0]
    patches, kept, halted = [0] * batch, [0] * batch, [[] for _ in range(batch)]
    per_kind = [(input_ids == token_id).sum(-1).tolist() for token_id in token_ids]
    present = [counts for counts in per_kind if any(counts)]
    for number, counts in enumerate(present):
        segments = passes[number] if number < len(passes) else None
        flat = None if segments is None or segments.halted is None else segments.halted.cpu()
        position, start = 0, 0  # the next segment, and the sample's first patch in the pass
        for b, count in enumerate(counts):
            sample_patches = count * patches_per_token
            if flat is not None:
                halted[b] += (flat[start : start + sample_patches].nonzero()[:, 0] + patches[b]).tolist()
            start += sample_patches
            patches[b] += sample_patches
            if segments is None:
                kept[b] += sample_patches
                continue
            covered = 0
            while covered < sample_patches:
                covered += segments.segment_patches[position]
                kept[b] += segments.segment_kept[position]
                position += 1
    return patches, kept, halted
