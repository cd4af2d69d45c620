"""The bench's floor (``dash_vlm.bench.floor``) against counts written out by hand: every layer's products from its
weights and the attention pairs it scores, the bytes of a cache from its own layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from dash_vlm import DeltaPress
from dash_vlm.bench.floor import FORMULAS, DevicePeak, Work, cache_bytes, count_prefill, decode_weights
from dash_vlm.models import adapter_for
from dash_vlm.models.qwen2_vl import qwen_vl_sample, tiny_qwen_vl
from dash_vlm.models.qwen3_5 import tiny_qwen3_5
from dash_vlm.models.qwen3_vl import qwen3_vl_sample, tiny_qwen3_vl


def counted(call) -> int:
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        call()
    return counter.get_total_flops()


@pytest.mark.parametrize("heads, queries, keys, head_dim", [(2, 7, 7, 8), (3, 5, 9, 4)])
def test_attention_counts_the_pairs_it_scores(heads, queries, keys, head_dim):
    q = torch.randn(2, heads, queries, head_dim)
    k, v = torch.randn(2, heads, keys, head_dim), torch.randn(2, heads, keys, head_dim)
    per_pair = 2 * 2 * head_dim
    every_pair = 2 * heads * queries * keys
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v)) == every_pair * per_pair
    triangle = 2 * heads * sum(min(row + 1, keys) for row in range(queries))
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == triangle * per_pair
    allowed = torch.rand(2, 1, queries, keys) > 0.4
    allowed[..., 0] = True  # every query scores at least one key
    pairs = heads * int(allowed.sum())
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)) == pairs * per_pair
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)) == pairs * per_pair


def layer_flops(layer: nn.Module, tokens: int, heads: int, head_dim: int) -> int:
    """One decoder layer on ``tokens`` positions of one sample, by hand: each linear map's weights once per position,
    and the causal pairs of its attention."""
    linear = sum(module.weight.numel() for module in layer.modules() if isinstance(module, nn.Linear))
    pairs = heads * tokens * (tokens + 1) // 2
    return 2 * tokens * linear + pairs * 2 * 2 * head_dim


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_decoder_flops_are_each_layers_work_at_its_length(ratio):
    model = tiny_qwen_vl("qwen2_vl")
    sample = qwen_vl_sample([(1, 8, 8)], [5, 7])
    press = DeltaPress(compression_ratio=ratio)
    work = count_prefill(model, sample, press)
    stats = press.last_stats[0]
    config = model.config.get_text_config()
    layers = adapter_for(model).decoder(model).layers
    expected = sum(
        layer_flops(layer, stats.tokens if index <= stats.decision_layer else stats.kept, config.num_attention_heads,
                    config.head_dim)
        for index, layer in enumerate(layers)
    )  # fmt: skip
    assert work.decoder_flops == expected
    assert 0 < work.vision_flops < work.prefill_flops and work.decoder_flops < work.prefill_flops
    vanilla = count_prefill(model, sample, None)
    assert (work.decoder_flops < vanilla.decoder_flops) == (ratio > 0)
    assert work.vision_flops == vanilla.vision_flops and work.step_weight_bytes == vanilla.step_weight_bytes


def test_vision_halting_lowers_the_towers_flops_only():
    model = tiny_qwen_vl("qwen2_vl", vision_layers=6)
    sample = qwen_vl_sample([(1, 8, 8)], [5, 7])
    vanilla = count_prefill(model, sample, None)
    halting = count_prefill(model, sample, DeltaPress(compression_ratio=0.0, vision_compression_ratio=0.5))
    assert halting.vision_flops < vanilla.vision_flops
    assert halting.decoder_flops == vanilla.decoder_flops


def test_cache_bytes_are_every_layers_keys_and_values():
    model = tiny_qwen_vl("qwen2_vl")
    sample = qwen_vl_sample([(1, 8, 8)], [5, 7])
    with torch.inference_mode():
        cache = model(**sample, use_cache=True).past_key_values
    by_hand = sum(4 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)
    assert cache_bytes(cache) == by_hand
    press = DeltaPress(compression_ratio=0.5)
    halted = count_prefill(model, sample, press)
    assert halted.cache_bytes < by_hand  # the deeper layers keep K positions


def test_hybrid_cache_bytes_count_the_recurrent_states():
    model = tiny_qwen3_5("qwen3_5")
    sample = qwen3_vl_sample([(1, 8, 8)], [5, 7])
    with torch.inference_mode():
        cache = model(**sample, use_cache=True).past_key_values
    tensors = [*cache.key_cache, *cache.value_cache, *cache.conv_states, *cache.recurrent_states]
    by_hand = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    assert any(isinstance(t, torch.Tensor) for t in cache.recurrent_states)
    assert cache_bytes(cache) == by_hand


def test_a_decode_step_reads_top_k_experts_and_no_tower():
    model = tiny_qwen3_vl("qwen3_vl_moe")
    config = model.config.get_text_config()
    share = config.num_experts_per_tok / config.num_experts
    tower = {id(p) for p in adapter_for(model).vision_tower(model).parameters()}
    embedding = model.get_input_embeddings().weight
    by_hand = 0
    for name, parameter in model.named_parameters():
        if id(parameter) in tower or parameter is embedding:
            continue
        expert = ".experts." in name
        by_hand += int(4 * parameter.numel() * (share if expert else 1.0))
    size, count = decode_weights(model)
    assert size == by_hand
    assert count * 4 == pytest.approx(by_hand, abs=8)


def test_floor_is_the_slower_of_compute_and_memory():
    work = Work(vision_flops=0, decoder_flops=0, prefill_flops=10**12, weight_bytes=10**9, cache_bytes=10**8,
                step_weight_bytes=9 * 10**8, step_flops=10**9)  # fmt: skip
    peak = DevicePeak(matmul_flops_per_s=10**14, copy_bytes_per_s=10**12)
    floor = work.floor_ms(peak, new_tokens=5)
    assert floor["ttft_ms"] == pytest.approx(10.0)  # compute: 1e12 / 1e14 s
    assert floor["decode_step_ms"] == pytest.approx(1.0)  # memory: 1e9 bytes / 1e12 B/s
    assert floor["answer_ms"] == pytest.approx(14.0)
    figures = work.figures(peak, 5, {"ttft_ms": 20.0, "decode_step_ms": 2.0, "answer_ms": 28.0})
    assert figures["fraction"] == pytest.approx({"ttft_ms": 0.5, "decode_step_ms": 0.5, "answer_ms": 0.5})
    slow_copy = DevicePeak(matmul_flops_per_s=10**14, copy_bytes_per_s=10**10)
    assert work.floor_ms(slow_copy, 1)["ttft_ms"] == pytest.approx(100.0)  # every weight read once: 1e9 / 1e10 s
