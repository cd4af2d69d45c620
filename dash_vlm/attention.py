"""Attention implementations dash-vlm adds to transformers' registry (DESIGN.md section 9).

- ``flash_attention_4``: FlashAttention 4 (``flash_attn.cute``, Hopper and Blackwell GPUs) in the decoder and the
  vision towers, with transformers' flash conventions: a 2-D padding mask (left padding is unpadded into one varlen
  call), causality bottom-right aligned, and ``cu_seqlens`` segments in the vision towers.
- ``VARLEN_SDPA``: the vision towers' segments (images, Qwen2.5-VL's windows) in one SDPA call per distinct segment
  length instead of transformers' Python loop of one call per segment; what Qwen vision towers run when FA4 is not
  used.

Both read the segment boundaries or the padding mask on the host once per tensor (a forward hands the same
``cu_seqlens`` or mask object to every layer), not once per layer.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from dash_vlm.models import adapter_for

FLASH_ATTENTION_4 = "flash_attention_4"
# "flash" in the name makes transformers' vision attention hand the segments over as cu_seqlens in one call
# (utils.generic.is_flash_attention_requested) instead of calling the function once per segment.
VARLEN_SDPA = "dash_vlm_varlen_sdpa_flash_api"
# What ``attn_implementation`` accepts everywhere (``use_attention`` says what each runs where).
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", FLASH_ATTENTION_4)
FLASH4_EXTRA = "pip install 'dash-vlm[flash4]' (flash-attn-4: NVIDIA Hopper or Blackwell GPUs)"


class PerTensor:
    """Values computed once per tensor object (and a small key), kept while the tensor lives unchanged (its version
    counter); a few at a time."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, OrderedDict()

    def get(self, tensor: torch.Tensor, key, compute: Callable):
        version = None if tensor.is_inference() else tensor._version  # inference tensors keep no version counter
        entry = self.entries.get((id(tensor), key))
        if entry is not None and entry[0]() is tensor and entry[1] == version:
            return entry[2]
        value = compute(tensor)
        self.entries[(id(tensor), key)] = (weakref.ref(tensor), version, value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


@dataclass(frozen=True)
class Unpadded:
    """The real rows of a padded ``[batch, length]`` layout: their flat indices, ``cu_seqlens`` and a bound on the
    longest row."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    longest: int


def unpadded(mask: torch.Tensor) -> Unpadded:
    """The real positions of a ``[batch, length]`` mask (true or 1 where real); one host read (the indices' count).
    The longest row is bounded by the mask's width: the kernels take it as a bound, so no second read."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return Unpadded(indices, cu_seqlens, mask.shape[-1])


def one_query_per_row(batch: int, device: torch.device) -> Unpadded:
    rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return Unpadded(rows[:-1].long(), rows, 1)


def longest_segment(cu_seqlens: torch.Tensor) -> int:
    return int(cu_seqlens.diff().max())


class FlashAttention4:
    """transformers' attention interface over FA4's ``flash_attn_func`` and ``flash_attn_varlen_func``."""

    def __init__(self):
        self.memo = PerTensor()

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if dropout:
            raise ValueError(f"{FLASH_ATTENTION_4} runs inference only (dropout 0), got dropout={dropout}")
        unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
        if unsupported:
            raise NotImplementedError(f"dash-vlm's {FLASH_ATTENTION_4} does not implement {unsupported}; use sdpa")
        dense, varlen = flash_attention_4_kernels()
        causal = module.is_causal if is_causal is None else is_causal
        batch, heads, length, dim = query.shape
        # FlashAttention takes [batch, tokens, heads, dim]
        query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
        options = dict(softmax_scale=scaling, causal=causal)
        if cu_seq_lens_q is not None:  # the vision towers' segments, packed in one sequence
            longest = self.memo.get(cu_seq_lens_q, "longest", longest_segment)
            flat = (tensor.reshape(-1, *tensor.shape[2:]) for tensor in (query, key, value))
            segments = dict(
                cu_seqlens_q=cu_seq_lens_q, cu_seqlens_k=cu_seq_lens_k, max_seqlen_q=longest, max_seqlen_k=longest
            )
            output = first(varlen(*flat, **segments, **options))
            return output.view(batch, length, heads, -1), None
        if attention_mask is None:
            return first(dense(query, key, value, **options)), None
        # a 2-D padding mask over the keys (a static cache holds more slots: the mask says how many are in use); the
        # queries are its last `length` positions, with left padding every row's last one at decode
        width = attention_mask.shape[-1]
        key, value = key[:, :width], value[:, :width]
        keys = self.memo.get(attention_mask, "keys", unpadded)
        if length == width:
            queries = keys
        elif length == 1:
            queries = self.memo.get(attention_mask, 1, lambda mask: one_query_per_row(batch, mask.device))
        else:
            queries = self.memo.get(attention_mask, length, lambda mask: unpadded(mask[:, -length:]))
        flat_keys, flat_values = (tensor.reshape(-1, *tensor.shape[2:])[keys.indices] for tensor in (key, value))
        flat_query = query.reshape(-1, heads, dim)[queries.indices]
        rows = dict(cu_seqlens_q=queries.cu_seqlens, cu_seqlens_k=keys.cu_seqlens)
        rows |= dict(max_seqlen_q=queries.longest, max_seqlen_k=keys.longest)
        output = first(varlen(flat_query, flat_keys, flat_values, **rows, **options))
        padded = output.new_zeros(batch * length, heads, output.shape[-1]).index_copy_(0, queries.indices, output)
        return padded.view(batch, length, heads, -1), None


def first(output):
    """FA4 returns ``(output, lse)``; a reference kernel may return the output alone."""
    return output[0] if isinstance(output, tuple) else output


def flash_attention_4_kernels() -> tuple[Callable, Callable]:
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except ImportError as error:
        message = f"attn_implementation={FLASH_ATTENTION_4!r} needs FlashAttention 4: {FLASH4_EXTRA}"
        raise ImportError(message) from error
    return flash_attn_func, flash_attn_varlen_func


def flash_attention_4_available() -> bool:
    try:
        flash_attention_4_kernels()
    except ImportError:
        return False
    return True


class SegmentGroups:
    """The segments of a ``cu_seqlens`` grouped by length: per length, the segments' flat positions (a slice when
    they are one contiguous run) and how many segments there are."""

    def __init__(self, cu_seqlens: torch.Tensor, device: torch.device):
        bounds = cu_seqlens.tolist()  # the one host read of these segments
        by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                by_length.setdefault(end - start, []).append(start)
        self.groups = []
        for length, starts in by_length.items():
            contiguous = starts == list(range(starts[0], starts[0] + length * len(starts), length))
            if contiguous:
                positions = slice(starts[0], starts[0] + length * len(starts))
            else:
                offsets = torch.tensor(starts, device=device)[:, None]
                positions = (offsets + torch.arange(length, device=device)).flatten()
            self.groups.append((length, len(starts), positions))


class VarlenSdpa:
    """Packed segments (``cu_seqlens``) in one SDPA call per distinct segment length; every other call (no segments)
    goes to transformers' SDPA function."""

    def __init__(self):
        self.memo = PerTensor()

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if cu_seq_lens_q is None:
            for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
                kwargs.pop(name, None)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        _, heads, tokens, dim = query.shape
        if key.shape[1] != heads or kwargs.get("is_causal"):
            raise NotImplementedError(f"{VARLEN_SDPA} runs vision towers: bidirectional, as many key as query heads")
        output = query.new_zeros(tokens, heads, dim)  # as flash kernels return it
        groups = self.memo.get(cu_seq_lens_q, query.device, lambda cu: SegmentGroups(cu, query.device)).groups
        for length, count, positions in groups:
            # [1, heads, tokens, dim] -> [segments, heads, length, dim]
            q, k, v = (
                t[0][:, positions].reshape(heads, count, length, -1).transpose(0, 1) for t in (query, key, value)
            )
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
            output[positions] = attended.transpose(1, 2).reshape(count * length, heads, dim)
        return output[None], None


def register() -> None:
    """Register both with transformers (again: harmless); FA4 is imported when it is first called."""
    AttentionInterface.register(FLASH_ATTENTION_4, FlashAttention4())
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLASH_ATTENTION_4, flash_attention_mask)
    AttentionInterface.register(VARLEN_SDPA, VarlenSdpa())


def load_implementation(attn_implementation: str | dict | None) -> str | dict | None:
    """What ``from_pretrained`` is asked for: ``flash_attention_4`` loads as ``sdpa`` and is set afterwards
    (:func:`use_attention`), since transformers' loader takes every name with "flash" for a hub kernel. A dict (one
    implementation per sub-config, as transformers takes it) passes through."""
    if isinstance(attn_implementation, dict):
        if FLASH_ATTENTION_4 in attn_implementation.values():
            raise ValueError(
                f"attn_implementation={FLASH_ATTENTION_4!r} is set on the whole model: give it as a string"
            )
        return attn_implementation
    if attn_implementation is not None and attn_implementation not in ATTENTION_CHOICES:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_CHOICES}, got {attn_implementation!r}")
    if attn_implementation == FLASH_ATTENTION_4:
        flash_attention_4_kernels()  # fail before loading anything
        return "sdpa"
    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if attn_implementation in available and not available[attn_implementation]():
        raise ImportError(
            f"attn_implementation={attn_implementation!r} needs the flash-attn package for it, which is not "
            "installed here (pip install 'dash-vlm[flash]'); 'sdpa' runs PyTorch's own flash kernel"
        )
    return attn_implementation


def use_attention(model: PreTrainedModel, attn_implementation: str | dict | None) -> None:
    """Set the decoder's and the vision tower's attention for ``attn_implementation`` once the model is loaded.

    ``flash_attention_4``: FA4 in both (``ValueError`` when the weights are not bf16 or fp16 on a Hopper or Blackwell
    GPU). A vision tower that packs segments (``ModelAdapter.vision_packs_segments``) and was loaded with SDPA runs
    FA4 when nothing was asked for (``None``) and FA4 can run its weights, else :data:`VARLEN_SDPA`. Anything else
    stays as transformers set it.
    """
    register()
    if attn_implementation == FLASH_ATTENTION_4:
        reason = flash_attention_4_unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        model.config._attn_implementation = FLASH_ATTENTION_4  # transformers' setter sets every sub-config too
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model) if adapter.vision_packs_segments else None
    if tower is not None and tower.config._attn_implementation == "sdpa":
        fastest = attn_implementation is None and flash_attention_4_available()
        fastest = fastest and flash_attention_4_unsupported(tower) is None
        tower.config._attn_implementation = FLASH_ATTENTION_4 if fastest else VARLEN_SDPA


def flash_attention_4_unsupported(module: nn.Module) -> str | None:
    """Why FA4 cannot run ``module``'s weights (their device or dtype), or ``None`` when it can."""
    weight = next(module.parameters())
    name = f"attn_implementation={FLASH_ATTENTION_4!r}"
    if weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device)[0] < 9:
        return f"{name} needs a Hopper or Blackwell GPU; the model is on {weight.device}"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return (
            f"{name} runs bfloat16 or float16 weights; the model is {weight.dtype} (load it with dtype=torch.bfloat16)"
        )
    return None


def attention_of(model: PreTrainedModel) -> dict[str, str]:
    """The attention implementation the decoder and the vision tower run (a text model's "vision" is its own)."""
    adapter = adapter_for(model)
    tower = adapter.vision_tower(model)
    return {
        "decoder": adapter.decoder(model).config._attn_implementation,
        "vision": (model.config if tower is None else tower.config)._attn_implementation,
    }
