"""The plan of a halting prefill against brute-force Python: who halts, the compact layout, the compact inputs."""

import pytest
import torch

from dash_vlm.halting import eligible_tokens, halt_counts, select_halted
from dash_vlm.plan import HaltPlan, plan_halting


def left_padded(lengths: list[int], total: int) -> torch.Tensor:
    return torch.tensor([[t >= total - n for t in range(total)] for n in lengths])


def random_plan(seed: int, lengths: list[int] = (9, 14, 5), total: int = 14, ratio: float = 0.5) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    real = left_padded(list(lengths), total)
    candidates = torch.rand(len(lengths), total, generator=generator) < 0.7
    eligible = eligible_tokens(real, candidates, protect_first=1, protect_last=1)
    scores = torch.randint(0, 5, (len(lengths), total), generator=generator).float()  # many ties
    counts = halt_counts(eligible.sum(-1).tolist(), ratio)
    kept_counts = [n - halted for n, halted in zip(lengths, counts, strict=True)]
    plan = plan_halting(scores, real, eligible, torch.tensor(counts), kept_counts)
    return plan, scores, real, eligible, counts


def brute_force_halted(scores, eligible, counts) -> list[list[int]]:
    return [
        sorted(
            sorted((t for t in range(scores.shape[1]) if eligible[b, t]), key=lambda t: (scores[b, t].item(), t))[:n]
        )
        for b, n in enumerate(counts)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_plan_halts_the_lowest_scores_and_lays_out_the_kept_tokens(seed):
    plan, scores, real, eligible, counts = random_plan(seed)
    expected = brute_force_halted(scores, eligible, counts)
    assert [plan.halted[b].nonzero().flatten().tolist() for b in range(3)] == expected
    assert torch.equal(plan.kept, real & ~plan.halted)
    slots = max(int(plan.kept[b].sum()) for b in range(3))
    assert plan.index.shape == plan.valid.shape == (3, slots)
    for b in range(3):
        kept_positions = plan.kept[b].nonzero().flatten().tolist()
        fillers = slots - len(kept_positions)
        assert plan.index[b, fillers:].tolist() == kept_positions  # ascending, in the last slots
        assert plan.valid[b].tolist() == [False] * fillers + [True] * len(kept_positions)
        assert not plan.kept[b, plan.index[b, :fillers]].any()  # filler slots point at non-kept positions
        assert [plan.slot_of_position[b, t].item() for t in kept_positions] == list(range(fillers, slots))
    assert plan.has_filler == (min(int(plan.kept[b].sum()) for b in range(3)) < slots)


def test_selection_is_pluggable():
    def last_eligible_first(scores, eligible, n_halt):  # ignores the scores
        positions = torch.arange(scores.shape[-1]).expand_as(scores)
        return select_halted(-positions.float(), eligible, n_halt)

    real = torch.ones(1, 6, dtype=torch.bool)
    eligible = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    plan = plan_halting(torch.zeros(1, 6), real, eligible, torch.tensor([2]), [4], select=last_eligible_first)
    assert plan.halted[0].nonzero().flatten().tolist() == [3, 4]
    assert plan.index[0].tolist() == [0, 1, 2, 5] and not plan.has_filler


def model_mask(real: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoder's mask of a left-padded batch: causal and padding, as SDPA (bool) or eager (additive) take it."""
    length = real.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]
    if kind == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_compact_mask_keeps_causality_among_kept_tokens(kind):
    plan, _, real, _, _ = random_plan(0)
    mask = model_mask(real, kind)
    cos = torch.randn(3, real.shape[1], 8)
    compact = plan.compact_inputs({"attention_mask": mask, "position_embeddings": (cos, -cos)}, flash=False)
    allowed = compact["attention_mask"]
    if kind == "eager":
        assert allowed.dtype == mask.dtype
        allowed = allowed == 0
    slots = plan.index.shape[1]
    for b in range(3):
        for i in range(slots):
            for j in range(slots):
                query, key = plan.index[b, i].item(), plan.index[b, j].item()
                expected = plan.valid[b, j].item() and key <= query
                if not plan.valid[b, i]:  # a filler row attends to its own slot too, so that no row is empty
                    expected = expected or i == j
                assert allowed[b, 0, i, j].item() == expected, (b, i, j)
    assert compact["position_ids"] is None


def test_compact_positions_and_flash_mask():
    plan, _, real, _, _ = random_plan(1)
    cos, sin = torch.randn(3, 3, real.shape[1], 8), torch.randn(3, 3, real.shape[1], 8)  # M-RoPE: 3 axes
    position_ids = torch.arange(real.shape[1]).expand(3, -1)
    compact = plan.compact_inputs(
        {"attention_mask": real.long(), "position_embeddings": (cos, sin), "position_ids": position_ids}, flash=True
    )
    for b in range(3):
        index = plan.index[b]
        assert torch.equal(compact["position_embeddings"][0][:, b], cos[:, b, index])
        assert torch.equal(compact["position_embeddings"][1][:, b], sin[:, b, index])
        assert torch.equal(compact["position_ids"][b], index)
        assert compact["attention_mask"][b].tolist() == plan.valid[b].tolist()  # 2-D: FlashAttention masks keys


def test_compact_mask_stays_missing_without_padding_or_filler():
    real = torch.ones(2, 6, dtype=torch.bool)
    eligible = real.clone()
    plan = plan_halting(torch.arange(12.0).view(2, 6), real, eligible, torch.tensor([2, 2]), [4, 4])
    cos = torch.randn(1, 6, 4)  # a batch dimension of 1 broadcasts
    compact = plan.compact_inputs({"attention_mask": None, "position_embeddings": (cos, cos)}, flash=False)
    assert compact["attention_mask"] is None and not plan.has_filler  # SDPA's causal fast path
    assert compact["position_embeddings"][0].shape == (2, 4, 4)


def test_gather_and_restore_round_trip():
    plan, _, real, _, _ = random_plan(2)
    hidden = torch.randn(3, real.shape[1], 5)
    decision_output = torch.randn(3, real.shape[1], 5)
    compact = plan.gather(hidden) * 2  # what the deeper layers made of the kept tokens
    restored = plan.restore(compact, decision_output)
    for b in range(3):
        for t in range(real.shape[1]):
            expected = hidden[b, t] * 2 if plan.kept[b, t] else decision_output[b, t]
            assert torch.equal(restored[b, t], expected)


def test_cache_record_carries_the_layout():
    plan, _, real, _, _ = random_plan(3)
    record = plan.cache_record(flash=False)
    assert isinstance(plan, HaltPlan)
    assert record.index is plan.index and record.valid is plan.valid
    assert (record.prompt_length, record.slots, record.has_filler) == (
        real.shape[1],
        plan.index.shape[1],
        plan.has_filler,
    )
