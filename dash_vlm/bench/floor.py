"""The physical floor beside every bench row (BENCHMARKS.md "The floor"): what a prefill and a decode step cannot go
below on the device, and how far each measured time is from it.

- **Work.** One eager prefill per variant under ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the
  matrix products that ran, from their shapes: the vision tower, the decoder layers and the whole model. Attention
  counts the query-key pairs it really scores (:func:`attention_flops`: the causal triangle, the mask's allowed
  entries), and transformers' grouped expert products count too (``_grouped_mm``). The same prefill's cache gives the
  bytes a decode step reads beside the weights (:func:`cache_bytes`).
- **Device.** The matmul rate and the copy bandwidth are measured at start-up (:func:`measure_peak`: a square matmul
  in the model's dtype and a large copy), not read from a table of specifications.
- **Floor.** TTFT: the prefill's FLOPs at the matmul rate, or every weight read once at the copy bandwidth, whichever
  is longer. Decode step: its weights (a mixture of experts' ``top_k`` experts of each layer, the least a step can
  read) and the cache at the bandwidth, or its FLOPs at the matmul rate. Answer: TTFT plus the later steps.
  ``fraction`` is floor over measured time: 1 is the floor.

Attention counts only where it runs PyTorch's SDPA (``sdpa``, and the towers' ``VARLEN_SDPA``); other kernels
(FlashAttention 2/3/4, fla's linear attention) are missing from the floor, which is then lower than the truth, and eager
attention's products count every pair, masked ones too. The bench records which parts were counted
(``attention_counted``).
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dash_vlm.attention import VARLEN_SDPA
from dash_vlm.models import adapter_for
from dash_vlm.press import DeltaPress, Timer

aten = torch.ops.aten
COUNTED_ATTENTION = ("sdpa", VARLEN_SDPA)  # attention implementations whose kernels FORMULAS count


def attention_flops(*args, out_val=None, schema=None, **kwargs) -> int:
    """FLOPs of one fused attention call: ``2 d`` for the query-key product and ``2 d_v`` for the weighted values,
    per query-key pair scored. The pairs are those a mask allows, the causal triangle (top-left aligned, as PyTorch's
    ``is_causal``), or every pair."""
    named = (
        dict(zip((argument.name for argument in schema.arguments), args, strict=False)) | kwargs
    )  # args may stop early
    query, key, value = named["query"], named["key"], named["value"]
    batch, heads, queries, head_dim = query.shape
    keys = key.shape[-2]
    mask = named.get("attn_mask", named.get("attn_bias"))
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        pairs = int(allowed.broadcast_to(batch, heads, queries, keys).sum())
    elif named.get("is_causal", False):  # query i scores keys 0..i
        triangle = min(queries, keys) * (min(queries, keys) + 1) // 2
        pairs = batch * heads * (triangle + max(queries - keys, 0) * keys)
    else:
        pairs = batch * heads * queries * keys
    return 2 * pairs * (head_dim + value.shape[-1])


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``torch._grouped_mm``: every output element is a dot product of the shared inner size."""
    return 2 * out_shape.numel() * a_shape[-1]


def _raw(formula, schema):
    def counted(*args, **kwargs):
        return formula(*args, schema=schema, **kwargs)

    counted._get_raw = True  # FlopCounterMode hands raw tensors (the mask's entries) instead of shapes
    return counted


FORMULAS = {
    packet: _raw(attention_flops, packet.default._schema)
    for packet in (
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_cudnn_attention,
    )
} | {aten._grouped_mm: grouped_mm_flops}


@dataclass(frozen=True)
class DevicePeak:
    """The measured matmul rate (FLOP/s, in the model's dtype) and copy bandwidth (bytes read and written per s)."""

    matmul_flops_per_s: float
    copy_bytes_per_s: float

    def as_dict(self) -> dict:
        return {"matmul_tflops": self.matmul_flops_per_s / 1e12, "copy_gb_per_s": self.copy_bytes_per_s / 1e9}


def measure_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> DevicePeak:
    """The device's matmul rate (a square product, 8,192 wide on a GPU) and copy bandwidth (512 MiB copied on a GPU:
    1 GiB read and written), each the median of five timings of ``repeats`` calls."""
    gpu = device.type == "cuda"
    side, elements = (8192, 2**29) if gpu else (512, 2**24)
    left, right = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(elements, device=device, dtype=torch.uint8 if gpu else torch.float32)
    target = torch.empty_like(source)

    def rate(call, amount: float) -> float:
        call()  # warm-up
        times = []
        for _ in range(5):
            timer = Timer(device)
            for _ in range(repeats):
                call()
            timer.stop()
            times.append(timer.milliseconds() / 1000 / repeats)
        return amount / statistics.median(times)

    with torch.cuda.device(device) if gpu else nullcontext():
        matmul = rate(lambda: torch.mm(left, right), 2 * side**3)
        copy = rate(lambda: target.copy_(source), 2 * source.numel() * source.element_size())
    return DevicePeak(matmul, copy)


@dataclass(frozen=True)
class Work:
    """What one prefill of a variant does: FLOPs of the vision tower, the decoder layers and the whole model; the bytes
    of its cache and of the weights a decode step reads; a decode step's FLOPs."""

    vision_flops: int
    decoder_flops: int
    prefill_flops: int
    weight_bytes: int
    cache_bytes: int
    step_weight_bytes: int
    step_flops: int

    def floor_ms(self, peak: DevicePeak, new_tokens: int) -> dict[str, float]:
        prefill = max(self.prefill_flops / peak.matmul_flops_per_s, self.weight_bytes / peak.copy_bytes_per_s)
        step = max(
            (self.step_weight_bytes + self.cache_bytes) / peak.copy_bytes_per_s,
            self.step_flops / peak.matmul_flops_per_s,
        )
        return {
            "ttft_ms": 1000 * prefill,
            "decode_step_ms": 1000 * step,
            "answer_ms": 1000 * (prefill + (new_tokens - 1) * step),
        }

    def figures(self, peak: DevicePeak, new_tokens: int, measured: dict[str, float]) -> dict:
        """The work, the floor and ``fraction`` (floor over the ``measured`` medians) of a row's variant."""
        floor = self.floor_ms(peak, new_tokens)
        return {
            "vision_tflop": self.vision_flops / 1e12,
            "decoder_tflop": self.decoder_flops / 1e12,
            "prefill_tflop": self.prefill_flops / 1e12,
            "step_gb": (self.step_weight_bytes + self.cache_bytes) / 1e9,
            "floor_ms": floor,
            "fraction": {key: floor[key] / measured[key] for key in floor},
        }


def _module_names(model: nn.Module) -> dict[int, str]:
    """The names FlopCounterMode gives the model's modules (its root class name, then the attribute path)."""
    root = type(model).__name__
    return {id(module): f"{root}.{name}" if name else root for name, module in model.named_modules()}


def count_prefill(model: nn.Module, inputs: dict, press: DeltaPress | None) -> Work:
    """The :class:`Work` of one eager prefill of ``inputs`` under ``press`` (``None``: vanilla), the logits of the
    last position only, as ``generate`` computes them."""
    adapter = adapter_for(model)
    names = _module_names(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with (
        torch.inference_mode(),
        press(model) if press is not None else nullcontext(),
        FlopCounterMode(display=False, depth=None, custom_mapping=FORMULAS) as counter,
    ):
        output = model(**inputs, use_cache=True, **last_only)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    tower = adapter.vision_tower(model)
    layers = adapter.decoder(model).layers
    batch = inputs["input_ids"].shape[0]
    weight_bytes, weight_count = decode_weights(model)
    return Work(
        vision_flops=0 if tower is None else counts.get(names[id(tower)], 0),
        decoder_flops=sum(counts.get(names[id(layer)], 0) for layer in layers),
        prefill_flops=counts.get("Global", 0),
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        cache_bytes=cache_bytes(output.past_key_values),
        step_weight_bytes=weight_bytes,
        step_flops=2 * batch * weight_count,
    )


def decode_weights(model: nn.Module) -> tuple[int, int]:
    """The weights one decode step must read, in bytes and in parameters: every parameter outside the vision tower,
    but of the input embedding only its rows (nothing, untied), and of each mixture-of-experts block only ``top_k`` of
    its ``num_experts`` experts (the least a step can read: every token of the batch routed alike)."""
    adapter = adapter_for(model)
    skipped = set()
    tower = adapter.vision_tower(model)
    if tower is not None:
        skipped |= {id(p) for p in tower.parameters()}
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not output:
        skipped.add(id(embedding))
    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", None)
    share = {}
    for module in model.modules():
        experts = getattr(module, "num_experts", None)
        for parameter in module.parameters(recurse=False):
            if top_k and experts and parameter.ndim == 3 and parameter.shape[0] == experts:
                share[id(parameter)] = min(1.0, top_k / experts)
    size, count = 0, 0
    for parameter in model.parameters():
        if id(parameter) not in skipped:
            read = share.get(id(parameter), 1.0)
            size += int(parameter.numel() * parameter.element_size() * read)
            count += int(parameter.numel() * read)
    return size, count


def cache_bytes(cache: object) -> int:
    """The bytes of every tensor a cache holds (keys and values, a hybrid cache's recurrent and convolution states),
    each counted once."""
    seen: set[int] = set()
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in _tensors(cache, depth=4)
        if id(tensor) not in seen and not seen.add(id(tensor))
    )


def _tensors(value: object, depth: int) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth == 0:
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth - 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth - 1)
    elif type(value).__module__.startswith(("transformers.", "dash_vlm.")) and hasattr(value, "__dict__"):
        for item in vars(value).values():  # a cache, its layers; weak references and modules are not followed
            if not isinstance(item, nn.Module):
                yield from _tensors(item, depth - 1)
