"""dash-vlm's attention implementations against transformers' SDPA: FA4's wrapper (its masks, padding, segments and
causality, with an exact reference kernel in place of FA4's on the CPU) and the vision towers' one-call-per-length
SDPA, under DASH, in a padded batch, on the halted cache and on the fast path's uncaptured steps."""

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from test_press_vlm import FAMILIES, batch_and_singles, cache_keys, generate, samples

from dash_vlm import DashVLM, DeltaPress, attention
from dash_vlm.attention import FLASH_ATTENTION_4, VARLEN_SDPA, attention_of, load_implementation, use_attention
from dash_vlm.bench import BenchConfig, run_bench
from dash_vlm.checks import relative_error
from dash_vlm.graphs import StaticDecoder
from dash_vlm.models import adapter_for
from dash_vlm.models.qwen2_vl import qwen_vl_sample, tiny_qwen_vl
from dash_vlm.models.tiny import left_pad_batch
from dash_vlm.resources import bundled
from dash_vlm.shapes.data import split_samples

CALLS = {"dense": 0, "varlen": 0, "query_bounds": set()}


def reference_dense(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False):
    """Attention of ``[batch, queries, heads, dim]`` over ``[batch, keys, kv_heads, dim]``, FlashAttention's
    conventions: grouped-query heads, causality aligned to the bottom right (the last query sees every key); FA4's
    ``flash_attn_func`` signature up to ``causal``."""
    assert qv is None and gather_kv_indices is None
    queries, heads, dim = q.shape[1:]
    keys = k.shape[1]
    k, v = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (softmax_scale or 1 / math.sqrt(dim))
    if causal:
        allowed = torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + keys - queries
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), None


def reference_varlen(
    q,
    k,
    v,
    qv=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    min_seqlen_k=None,
    seqused_q=None,
    seqused_k=None,
    gather_kv_indices=None,
    page_table=None,
    softmax_scale=None,
    causal=False,
):
    """Packed sequences, each attended alone by :func:`reference_dense`; the max lengths must bound the real ones.
    FA4's ``flash_attn_varlen_func`` signature up to ``causal``."""
    assert qv is None and cu_seqlens_q is not None and cu_seqlens_k is not None
    CALLS["varlen"] += 1
    CALLS["query_bounds"].add(max_seqlen_q)
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert bounds_q[-1] == q.shape[0] and bounds_k[-1] == k.shape[0]
    assert max(b - a for a, b in zip(bounds_q, bounds_q[1:], strict=False)) <= max_seqlen_q
    assert max(b - a for a, b in zip(bounds_k, bounds_k[1:], strict=False)) <= max_seqlen_k
    parts = [
        reference_dense(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale=softmax_scale, causal=causal)[0][0]
        for a, b, c, d in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:], strict=False)
    ]
    return torch.cat(parts), None


def counted_dense(*args, **kwargs):
    CALLS["dense"] += 1
    return reference_dense(*args, **kwargs)


@pytest.fixture
def reference_kernels(monkeypatch):
    """FA4's two kernels replaced by the references, counting their calls; the references run the CPU's float32."""
    monkeypatch.setattr(attention, "flash_attention_4_kernels", lambda: (counted_dense, reference_varlen))
    monkeypatch.setattr(attention, "flash_attention_4_unsupported", lambda module: None)
    CALLS.update(dense=0, varlen=0, query_bounds=set())
    return CALLS


def with_flash_attention_4(model):
    flash = copy.deepcopy(model)
    use_attention(flash, FLASH_ATTENTION_4)
    assert set(attention_of(flash).values()) == {FLASH_ATTENTION_4}
    return flash


def assert_close_generations(actual, expected, tolerance=1e-4):
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert relative_error(a, b) <= tolerance, f"step {step}"


def presses(family: str) -> list[DeltaPress | None]:
    halting = [None, DeltaPress(compression_ratio=0.667), DeltaPress(compression_ratio=0.5, scope="all")]
    if adapter_for(family).halts_in_vision_tower:
        halting.append(DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5))
    return halting


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_4_equals_sdpa_in_a_padded_batch(family, reference_kernels):
    model = adapter_for(family).tiny_model(family, "sdpa")
    flash = with_flash_attention_4(model)
    batch, _ = batch_and_singles(family)
    assert batch["attention_mask"].min() == 0
    for press in presses(family):
        expected = generate(model, batch, press, max_new_tokens=5)
        stats = None if press is None else press.last_stats
        CALLS.update(dense=0, varlen=0)
        actual = generate(flash, batch, press, max_new_tokens=5)
        assert_close_generations(actual, expected)
        if press is not None:  # the same tokens halted
            assert [s.halted_positions for s in press.last_stats] == [s.halted_positions for s in stats]
        # padded prefill and decode steps go through the unpadding varlen call, every attention layer
        adapter = adapter_for(family)
        layers = len(adapter.decoder_layers(model)) - len(adapter.recurrent_layers(model.config))
        assert CALLS["varlen"] >= 5 * layers


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_4_next_turn_on_the_halted_cache(family, reference_kernels):
    model = adapter_for(family).tiny_model(family, "sdpa")
    flash = with_flash_attention_4(model)
    inputs = samples(family)["image"]
    turn = torch.tensor([[5, 17, 29, 41, 53, 65]])

    def converse(chat_model):
        press, logits = DeltaPress(compression_ratio=0.667), []
        with torch.no_grad():
            with press(chat_model):
                prefill = chat_model(**inputs, use_cache=True)  # the family's own cache
                logits.append(prefill.logits)
                cache = prefill.past_key_values
            logits.append(chat_model(input_ids=turn, past_key_values=cache).logits)
            token = logits[-1][:, -1:].argmax(-1)
            for _ in range(3):
                logits.append(chat_model(input_ids=token, past_key_values=cache).logits)
                token = logits[-1][:, -1:].argmax(-1)
        return logits, cache, press.last_stats[0]

    expected, expected_cache, stats = converse(model)
    actual, cache, flash_stats = converse(flash)
    assert flash_stats.halted_positions == stats.halted_positions and stats.kept < stats.tokens
    for step, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert relative_error(a[:, -1], b[:, -1]) <= 1e-4, f"forward {step}"
    last_keys = [keys for keys in cache_keys(cache) if keys is not None][-1]
    assert last_keys.shape == [keys for keys in cache_keys(expected_cache) if keys is not None][-1].shape
    assert last_keys.shape[-2] == stats.kept + turn.shape[1] + 3
    assert CALLS["dense"] > 0  # one sample, no padding: the dense kernel, causal bottom-right for the next turn


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_4_next_turn_of_a_padded_batch(family, reference_kernels):
    """Several new tokens per row on a halted cache, left padding: queries and keys unpadded apart."""
    model = adapter_for(family).tiny_model(family, "sdpa")
    flash = with_flash_attention_4(model)
    batch, _ = batch_and_singles(family)
    rows = batch["input_ids"].shape[0]
    turn = torch.tensor([[5, 17, 29, 41]] * rows)
    mask = torch.cat([batch["attention_mask"], torch.ones(rows, turn.shape[1], dtype=torch.long)], dim=1)
    # the same positions for both models (what they are does not matter to the comparison); Qwen's are 3-D
    length = batch["input_ids"].shape[1]
    positions = torch.arange(length, length + turn.shape[1]).expand(rows, -1)
    if family.startswith("qwen"):
        positions = positions.expand(3, -1, -1)

    def converse(chat_model):
        press = DeltaPress(compression_ratio=0.667)
        with torch.no_grad():
            with press(chat_model):
                prefill = chat_model(**batch, use_cache=True)
            first, cache = prefill.logits[:, -1], prefill.past_key_values
            later = chat_model(input_ids=turn, attention_mask=mask, position_ids=positions, past_key_values=cache)
            return first, later.logits

    (first, turn_logits), (expected_first, expected_turn) = converse(flash), converse(model)
    assert relative_error(first, expected_first) <= 1e-4
    for row in range(rows):
        assert relative_error(turn_logits[row], expected_turn[row]) <= 1e-4, f"row {row}"
    assert turn.shape[1] in CALLS["query_bounds"]  # the turn's queries went through their own unpadding


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fast_path_runs_its_decoder_on_sdpa_under_flash_attention_4(family, reference_kernels):
    model = adapter_for(family).tiny_model(family, "sdpa")
    flash = with_flash_attention_4(model)
    batch, _ = batch_and_singles(family)
    press = DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5)
    expected = StaticDecoder(model, capture=False).generate(batch, press, 5, keep_logits=True, stop_at_end=False)
    CALLS.update(dense=0, varlen=0)
    actual = StaticDecoder(flash, capture=False).generate(batch, press, 5, keep_logits=True, stop_at_end=False)
    assert torch.equal(actual.tokens, expected.tokens)
    for a, b in zip(actual.logits, expected.logits, strict=True):
        assert relative_error(a, b) <= 1e-4
    tower = adapter_for(flash).vision_tower(flash)
    assert CALLS["dense"] == 0  # the decoder ran SDPA; the tower FA4, one call per block and pass
    assert CALLS["varlen"] == len(tower.blocks)
    assert attention_of(flash) == {"decoder": FLASH_ATTENTION_4, "vision": FLASH_ATTENTION_4}  # restored


def several_images() -> dict:
    """Images of three sizes: Qwen2.5-VL's 16-pixel windows (4x4 patches) then come in several lengths."""
    singles = [
        qwen_vl_sample([(1, 12, 8), (1, 4, 6)], [3, 4, 5], seed=1),
        qwen_vl_sample([(1, 12, 8), (1, 10, 14)], [2, 3, 4], seed=2),
    ]
    return left_pad_batch(singles)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_varlen_sdpa_equals_the_per_segment_loop(family, monkeypatch):
    model = tiny_qwen_vl(family, "sdpa")
    varlen = copy.deepcopy(model)
    use_attention(varlen, "sdpa")
    assert attention_of(varlen) == {"decoder": "sdpa", "vision": VARLEN_SDPA}
    inputs = several_images()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    tower, varlen_tower = model.model.visual, varlen.model.visual
    with torch.no_grad():
        expected = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        loop_calls, calls[:] = len(calls), []
        actual = varlen_tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    blocks = len(tower.blocks)
    assert loop_calls >= 3 * blocks  # at least one call per image per block
    assert len(calls) < loop_calls  # one call per distinct segment length
    if family == "qwen2_vl":  # one segment per image: 96, 24, 96 and 140 patches
        assert (loop_calls, len(calls)) == (4 * blocks, 3 * blocks)
    if family == "qwen2_5_vl":
        assert {shape[2] for shape in calls} >= {16, 8}  # windows of several lengths, several windows per call
        assert any(shape[0] > 1 for shape in calls)
    for press in (DeltaPress(compression_ratio=0.667), DeltaPress(vision_compression_ratio=0.5)):
        assert_close_generations(generate(varlen, inputs, press), generate(model, inputs, press))


def test_from_pretrained_chooses_the_vision_attention():
    checkpoint = bundled("assets") / "models" / "dash-shapes-qwen2-vl"
    vlm = DashVLM.from_pretrained(checkpoint, device_map="cpu")  # no FA4 on a CPU: one SDPA call per length
    assert attention_of(vlm.model) == {"decoder": "sdpa", "vision": VARLEN_SDPA}
    eager = DashVLM.from_pretrained(checkpoint, device_map="cpu", attn_implementation="eager")
    assert attention_of(eager.model) == {"decoder": "eager", "vision": "eager"}
    llava = DashVLM.from_pretrained(bundled("assets") / "models" / "dash-shapes-llava", device_map="cpu")
    assert attention_of(llava.model) == {"decoder": "sdpa", "vision": "sdpa"}  # CLIP has no segments


def test_flash_attention_4_loads_as_sdpa_then_switches(reference_kernels):
    checkpoint = bundled("assets") / "models" / "dash-shapes-qwen2-vl"
    flash = DashVLM.from_pretrained(checkpoint, device_map="cpu", attn_implementation=FLASH_ATTENTION_4)
    assert attention_of(flash.model) == {"decoder": FLASH_ATTENTION_4, "vision": FLASH_ATTENTION_4}
    assert flash.model.config._attn_implementation == FLASH_ATTENTION_4
    plain = DashVLM.from_pretrained(checkpoint, device_map="cpu", attn_implementation="sdpa")
    samples = split_samples("test", 8)
    images, questions = [[s.image] for s in samples], [s.question for s in samples]
    answers = [[r.text for r in vlm.generate(images, questions, max_new_tokens=2)] for vlm in (flash, plain)]
    assert answers[0] == answers[1]
    assert CALLS["varlen"] > 0


def test_clear_errors_for_attention_names(monkeypatch):
    checkpoint = bundled("assets") / "models" / "dash-shapes-qwen2-vl"
    with pytest.raises(ValueError, match="attn_implementation must be one of .*flash_attention_4"):
        load_implementation("flash")
    with pytest.raises(ValueError, match="give it as a string"):
        load_implementation({"text_config": FLASH_ATTENTION_4})
    assert load_implementation({"text_config": "sdpa"}) == {"text_config": "sdpa"}
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # as when flash-attn-4 is not installed
    with pytest.raises(ImportError, match=r"dash-vlm\[flash4\]"):
        DashVLM.from_pretrained(checkpoint, attn_implementation="flash_attention_4")


def test_flash_attention_4_refuses_weights_it_cannot_run(monkeypatch):
    monkeypatch.setattr(attention, "flash_attention_4_kernels", lambda: (counted_dense, reference_varlen))
    checkpoint = bundled("assets") / "models" / "dash-shapes-qwen2-vl"
    with pytest.raises(ValueError, match="needs a Hopper or Blackwell GPU; the model is on cpu"):
        DashVLM.from_pretrained(checkpoint, device_map="cpu", attn_implementation=FLASH_ATTENTION_4)

    class OnGPU(torch.nn.Module):  # what the check reads of a model: its first weight's device and dtype
        def __init__(self, dtype):
            super().__init__()
            self.dtype_ = dtype

        def parameters(self):
            yield SimpleNamespace(device=torch.device("cuda", 0), dtype=self.dtype_)

    for capability, dtype, reason in [
        ((9, 0), torch.bfloat16, None),
        ((10, 0), torch.float16, None),
        ((9, 0), torch.float32, "runs bfloat16 or float16 weights; the model is torch.float32"),
        ((8, 0), torch.bfloat16, "needs a Hopper or Blackwell GPU; the model is on cuda:0"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, answer=capability: answer)
        found = attention.flash_attention_4_unsupported(OnGPU(dtype))
        assert found == reason if reason is None else reason in found


def test_fa4_in_the_tower_only_when_it_can_run_it(monkeypatch):
    """Left at None, the tower gets FA4 where FA4 is installed and runs the weights, one-call SDPA elsewhere."""
    monkeypatch.setattr(attention, "flash_attention_4_available", lambda: True)
    model = tiny_qwen_vl("qwen2_vl", "sdpa")
    use_attention(model, None)  # float32 on a CPU: FA4 cannot run it
    assert attention_of(model) == {"decoder": "sdpa", "vision": VARLEN_SDPA}
    monkeypatch.setattr(attention, "flash_attention_4_unsupported", lambda module: None)
    model = tiny_qwen_vl("qwen2_vl", "sdpa")
    use_attention(model, None)
    assert attention_of(model) == {"decoder": "sdpa", "vision": FLASH_ATTENTION_4}
    model = tiny_qwen_vl("qwen2_vl", "sdpa")
    use_attention(model, "sdpa")  # asked for SDPA: SDPA in both, the tower's in one call per length
    assert attention_of(model) == {"decoder": "sdpa", "vision": VARLEN_SDPA}


def test_bench_measures_under_flash_attention_4(reference_kernels):
    config = BenchConfig(preset="tiny", image_sizes=[64], ratios=[0.0, 0.667], attn=FLASH_ATTENTION_4, device="cpu")
    config.repeats, config.warmup, config.new_tokens = 1, 0, 2
    document = run_bench(config)
    assert {row["ratio"] for row in document["rows"]} == {0.0, 0.667}
    assert CALLS["dense"] + CALLS["varlen"] > 0
    with pytest.raises(ValueError, match="attn must be one of"):
        BenchConfig(preset="tiny", image_sizes=[64], ratios=[0.5], attn="flash", device="cpu")
