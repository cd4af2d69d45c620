"""The prefill's per-token work in chunks (``DeltaPress.prefill_chunk``, ``dash_vlm.chunking``): equal to the
unchunked prefill at 1e-5 in float32 on every family and kind of input, the chunk boundary inside a segment, at a
halted token and at padding; the chunks really are that small; the tower's attention keeps every segment whole; the
swapped forwards are gone after the block."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_press_vlm import FAMILY_KINDS, assert_same_generation, batch_and_singles, generate, model_for

from dash_vlm import DeltaPress
from dash_vlm.chunking import (
    ALLOCATOR_SETTINGS,
    MIN_AUTO_TOKENS,
    auto_chunk_tokens,
    prefer_expandable_segments,
    segments_in_chunks,
)
from dash_vlm.models import adapter_for, model_types_with

CHUNK = 7  # prime: boundaries fall inside segments, rows and frame groups


def largest_inputs(modules) -> tuple[list, list[int]]:
    """Forward hooks that record the rows each of ``modules``' linear layers is called on."""
    rows, handles = [], []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                handles.append(
                    layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
                )
    return handles, rows


def vision_ratio(family: str) -> float:
    return 0.5 if family in model_types_with("halts_in_vision_tower") else 0.0


@pytest.mark.parametrize(("family", "kind"), FAMILY_KINDS)
def test_chunked_prefill_equals_the_unchunked_one(family, kind):
    model = model_for(family)
    inputs = adapter_for(family).tiny_inputs(family)[kind]
    settings = dict(compression_ratio=0.5, vision_compression_ratio=vision_ratio(family))
    expected = generate(model, inputs, DeltaPress(**settings, prefill_chunk=0))
    adapter = adapter_for(model)
    handles, rows = largest_inputs(adapter.per_token_modules(model))
    try:
        press = DeltaPress(**settings, prefill_chunk=CHUNK)
        assert_same_generation(generate(model, inputs, press), expected, 1e-5)
    finally:
        for handle in handles:
            handle.remove()
    assert max(rows) <= CHUNK < inputs["input_ids"].shape[1]
    assert press.last_stats[0].kept < press.last_stats[0].tokens  # a halting prefill: compact layers chunked too
    for module in adapter.per_token_modules(model) + adapter.segment_attention_modules(model):
        assert "forward" not in vars(module)


def test_chunked_prefill_at_ratio_0_equals_the_unmodified_model():
    model = model_for("qwen2_vl")
    inputs = adapter_for("qwen2_vl").tiny_inputs("qwen2_vl")["video"]
    assert_same_generation(generate(model, inputs, DeltaPress(compression_ratio=0.0, prefill_chunk=5)),
                           generate(model, inputs), 1e-5)  # fmt: skip


@pytest.mark.parametrize("family", model_types_with("is_vision_language"))
def test_chunked_padded_batch_equals_the_unchunked_batch(family):
    """Left padding and samples of different lengths: chunks run across samples and padding rows."""
    model = model_for(family)
    batch, _ = batch_and_singles(family)
    settings = dict(compression_ratio=0.5, vision_compression_ratio=vision_ratio(family))
    assert_same_generation(
        generate(model, batch, DeltaPress(**settings, prefill_chunk=CHUNK)),
        generate(model, batch, DeltaPress(**settings, prefill_chunk=0)),
        1e-5,
    )


def test_tower_attention_runs_whole_segments_per_chunk():
    """Segments of 4, 6, 3, 12 and 2 patches in chunks of at most 10: [4, 6], [3], [12] (longer than a chunk: alone),
    [2]; each call gets its own segments' bounds, rows and rotary rows."""
    lengths = [4, 6, 3, 12, 2]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    hidden = torch.arange(sum(lengths), dtype=torch.float32)[:, None].repeat(1, 3)
    cos = sin = hidden[:, :2] * 10
    calls = []

    def attention(states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None):
        calls.append((cu_seqlens.tolist(), states[:, 0].tolist(), position_embeddings[0][:, 0].tolist()))
        return states * 2

    output = segments_in_chunks(attention, 10, hidden, bounds, position_embeddings=(cos, sin))
    assert torch.equal(output, hidden * 2)
    assert [cu for cu, _, _ in calls] == [[0, 4, 10], [0, 3], [0, 12], [0, 2]]
    starts = [0, 10, 13, 25]
    assert [rows[0] for _, rows, _ in calls] == starts and [rotary[0] for _, _, rotary in calls] == [
        s * 10 for s in starts
    ]


def test_auto_chunk_follows_free_memory_and_never_chunks_on_a_cpu():
    model = model_for("qwen2_vl")
    modules = adapter_for(model).per_token_modules(model)
    assert auto_chunk_tokens(modules, torch.device("cpu")) == 0
    widest = max(m.weight.shape[0] * m.weight.element_size() for module in modules for m in module.modules()
                 if isinstance(m, torch.nn.Linear))  # fmt: skip
    plenty = 10**9 * 3 * widest
    assert auto_chunk_tokens(modules, torch.device("cuda"), free_bytes=plenty) == int(plenty / 8 / (3 * widest))
    assert auto_chunk_tokens(modules, torch.device("cuda"), free_bytes=1) == MIN_AUTO_TOKENS


def test_prefill_chunk_is_checked_and_read_from_text():
    assert DeltaPress(prefill_chunk="4096").prefill_chunk == 4096
    assert DeltaPress.from_options(prefill_chunk="0").prefill_chunk == 0
    for bad in (-1, "lots", 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be 'auto', 0"):
            DeltaPress(prefill_chunk=bad)


@pytest.fixture
def gpu_not_started(monkeypatch):
    """A machine with a GPU on which CUDA has not started, and no allocator setting in the environment."""
    for name in ALLOCATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


def test_expandable_segments_are_set_when_the_user_set_nothing(gpu_not_started, caplog):
    with caplog.at_level(logging.INFO, logger="dash_vlm.chunking"):
        assert prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "expandable_segments:True" in caplog.text


@pytest.mark.parametrize("name", ALLOCATOR_SETTINGS)
def test_a_users_allocator_setting_is_never_changed(gpu_not_started, monkeypatch, name):
    monkeypatch.setenv(name, "expandable_segments:False")
    assert not prefer_expandable_segments()
    assert os.environ[name] == "expandable_segments:False"
    assert [key for key in ALLOCATOR_SETTINGS if key in os.environ] == [name]


def test_expandable_segments_are_left_alone_once_cuda_started(gpu_not_started, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not prefer_expandable_segments() and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_the_command_and_dashvlm_prefer_expandable_segments(gpu_not_started, monkeypatch, capsys):
    """``dash-vlm`` says so on its output; ``DashVLM.from_pretrained`` sets it before the weights load."""
    from dash_vlm.cli import main as cli_main

    cli_main(["tasks"])
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by dash-vlm" in capsys.readouterr().out
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    from dash_vlm import DashVLM
    from dash_vlm.shapes.evaluate import model_folder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the load itself runs on the CPU
    DashVLM.from_pretrained(model_folder("qwen2-vl"), device_map="cpu")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # no GPU: nothing to set
    seen = []
    monkeypatch.setattr("dash_vlm.vlm.prefer_expandable_segments", lambda: seen.append(True))
    DashVLM.from_pretrained(model_folder("qwen2-vl"), device_map="cpu")
    assert seen == [True]
