"""The rule's pure functions against brute-force Python, and config validation."""

import math

import pytest
import torch

from dash_vlm import DeltaPress
from dash_vlm.halting import (
    compact_layout,
    eligible_tokens,
    halt_counts,
    halt_counts_on_device,
    select_halted,
    token_scores,
)
from dash_vlm.models.text import tiny_text_model

BAD_VALUES = [
    ("compression_ratio", -0.1),
    ("compression_ratio", 1.0),
    ("compression_ratio", "0.5"),
    ("compression_ratio", math.nan),
    ("start_ratio", 1.0),
    ("start_ratio", -0.5),
    ("scope", "image"),
    ("scope", None),
    ("protect_last", 0),
    ("protect_last", 1.5),
    ("protect_first", -1),
    ("protect_first", True),
    ("method", "norm"),
    ("method", None),
    ("seed", -1),
    ("seed", 1.0),
    ("seed", 2**31),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_config_raises_when_built_and_when_applied(name, value):
    with pytest.raises(ValueError, match=name):
        DeltaPress(**{name: value})
    press = DeltaPress()
    setattr(press, name, value)  # users reassign fields after construction
    model = tiny_text_model()
    with pytest.raises(ValueError, match=name):
        with press(model):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_good_config_and_decision_layer():
    config = DeltaPress(compression_ratio=0.0, start_ratio=0.0, scope="all", protect_last=3, protect_first=2)
    assert config.decision_layer(28) == 0
    assert DeltaPress(start_ratio=0.4).decision_layer(28) == 11  # floor(11.2)
    assert DeltaPress(start_ratio=0.5).decision_layer(5) == 2


def test_halt_counts_use_python_round():
    assert halt_counts([5, 3, 0, 7], 0.5) == [round(2.5), round(1.5), 0, round(3.5)] == [2, 2, 0, 4]
    assert halt_counts([3], 0.667) == [2]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.667, 0.7, 0.8, 0.9, 0.999])
def test_halt_counts_on_device_equal_the_host_rule(ratio):
    counts = list(range(20001))
    assert halt_counts_on_device(torch.tensor(counts), ratio).tolist() == halt_counts(counts, ratio)


def test_scores_are_float32_norms():
    output = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    scores = token_scores(output)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, output.float().pow(2).sum(-1).sqrt())


def test_eligible_tokens_respect_padding_scope_and_protection():
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    candidates = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    protect = torch.zeros_like(real)
    protect[1, 3] = True
    eligible = eligible_tokens(real, candidates, protect_first=1, protect_last=2, protect=protect)
    expected = torch.tensor([[0, 0, 0, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(eligible, expected)


def brute_force_halted(scores, eligible, counts):
    halted = torch.zeros_like(eligible)
    for b in range(scores.shape[0]):
        positions = [t for t in range(scores.shape[1]) if eligible[b, t]]
        for t in sorted(positions, key=lambda t: (scores[b, t].item(), t))[: counts[b]]:
            halted[b, t] = True
    return halted


@pytest.mark.parametrize("seed", range(5))
def test_select_halted_matches_brute_force_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (3, 40), generator=generator).float()  # many exact ties
    eligible = torch.rand(3, 40, generator=generator) < 0.6
    counts = [round(0.5 * int(n)) for n in eligible.sum(-1)]
    halted = select_halted(scores, eligible, torch.tensor(counts))
    assert torch.equal(halted, brute_force_halted(scores, eligible, counts))
    assert halted.sum(-1).tolist() == counts


def test_compact_layout_puts_kept_positions_last_in_order():
    kept = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    index, valid = compact_layout(kept, num_slots=4)
    assert index[0].tolist() == [0, 2, 3, 5] and valid[0].all()
    assert index[1, 2:].tolist() == [2, 4] and valid[1].tolist() == [False, False, True, True]
    assert not kept[1, index[1, :2]].any()  # filler slots point at non-kept positions
    index, valid = compact_layout(kept, num_slots=4, filler_last=True)
    assert index[0].tolist() == [0, 2, 3, 5] and valid[0].all()
    assert index[1, :2].tolist() == [2, 4] and valid[1].tolist() == [True, True, False, False]
    assert not kept[1, index[1, 2:]].any()
