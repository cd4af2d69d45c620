"""The fast path (DESIGN.md section 8): the decoder prefill and greedy decode steps, replayed as CUDA graphs.

A prefill runs as ``generate`` would run it (the model's own input preparation, the vision tower, under the press when
one is given), except for the tower's grid work, made once per grid (``dash_vlm.tower``), and its decoder layers: for
that call the decoder's layer list holds one ``_DecoderStack``, which replays a ``_PrefillGraph`` of every layer, the
press's halting decision included, on the prompt and the kept slots padded to ``PREFILL_BUCKET``. The prefill's cache,
full-length or halted, is copied into static buffers: transformers' ``StaticLayer``s, one per decoder layer, each as
long as that layer's prompt part (``T`` below the decision layer, the kept slots ``K`` above it), rounded up to
``BUCKET``, plus one slot per new token. One decode step (embedding, every decoder layer, final norm, LM head, greedy
choice) runs on those buffers with no host sync: its masks, cache positions and rotary positions are computed on the
device from a step counter, so the step can be captured once as a CUDA graph and replayed for every token. Graphs are
kept per shape in small LRUs that share one memory pool. With ``capture=False`` the same work runs eagerly, which is how
the tests check it on a CPU.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dash_vlm.attention import FLASH_ATTENTION_4
from dash_vlm.cache import HaltedLayer, attach_halted_layers
from dash_vlm.compact import additive_mask
from dash_vlm.halting import selection_rule
from dash_vlm.models import DecoderAdditions, ModelAdapter, adapter_for
from dash_vlm.plan import HaltPlan, plan_halting
from dash_vlm.press import DeltaPress, Timer, executor_of
from dash_vlm.scorers import Reading, Scorer, read_decision_layer
from dash_vlm.tower import TowerTables

logger = logging.getLogger(__name__)

BUCKET = 256  # prompt parts of the static cache are rounded up to a multiple of this, so graphs serve many prompts
# A captured prefill pads the prompt and the kept slots to a multiple of this: the padding is computed (and wasted),
# so it is finer than the decode bucket, where a padded slot costs only a masked read.
PREFILL_BUCKET = 8
CHUNK = 8  # steps replayed between two checks whether every sample has ended (one host sync per check)
# Logits processors of a generation config that the fast path does not apply: it refuses them rather than answer
# differently from ``generate`` (the repetition penalty, which Qwen2-VL's instruct checkpoints set, it applies).
UNSUPPORTED_PROCESSORS = {
    "no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,),
}


def bucket(length: int, size: int = BUCKET) -> int:
    """``length`` rounded up to a multiple of ``size``."""
    return -(-length // size) * size


@dataclass(frozen=True)
class DecodeShape:
    """What a captured graph is specialised to: the batch, each layer's static cache length and group (0 for full
    layers, 1 for halted ones where there are both), the steps it writes, and whether it keeps every step's logits."""

    batch: int
    lengths: tuple[int, ...]
    groups: tuple[int, ...]
    steps: int
    keep_logits: bool
    repetition_penalty: float


@dataclass(frozen=True)
class PrefillShape:
    """What a captured prefill of the decoder layers is specialised to: the batch, the prompt length and the kept
    slots above the decision layer (0 when nothing halts), both padded to ``PREFILL_BUCKET``, whether the layers below
    need an explicit mask (padding in the batch, or eager attention), the scorer that decides, and the compression
    ratio of ``selection="per_row"`` or ``"per_frame"`` (``None``: the global selection); with decoder additions
    (Qwen3-VL's DeepStack), the layers that get them and the rows they add to, padded to ``PREFILL_BUCKET``."""

    batch: int
    length: int
    slots: int
    masked: bool
    scorer: Scorer | None
    group_ratio: float | None = None
    additions: tuple[int, int] = (0, 0)


@dataclass
class FastGeneration:
    """The output of :meth:`StaticDecoder.generate`.

    ``tokens`` are the ``[batch, steps]`` new tokens (padding after a sample's end-of-sequence token, as
    ``generate`` pads); ``logits`` the ``steps`` ``[batch, vocab]`` scores (after the repetition penalty) when asked
    for; ``first_token`` times the call up to the first token, ``decode`` the later steps and ``answer`` the whole
    call (read with ``milliseconds()``); ``captured`` whether this call captured a new graph (then in its time).
    """

    tokens: torch.Tensor
    logits: list[torch.Tensor] | None
    first_token: Timer
    decode: Timer
    answer: Timer
    captured: bool


def grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA for one new token per sample over a grouped-query cache, without repeating the keys and values.

    With a mask, transformers' SDPA attention copies every key and value head once per query head it serves (its
    ``repeat_kv``): at batch 8 over 2,576 slots that copy is 6 of a Qwen2-VL-7B decode step's 14 ms of kernels. One
    query token leaves the query-length axis free, so a key-value head's query heads go there instead: the same dot
    products, the ``[batch, 1, 1, slots]`` mask broadcast over them. Anything else goes to transformers' function.
    """
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if length != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    grouped = query.reshape(batch, key.shape[1], groups, dim)  # head h reads key-value head h // groups, as repeat_kv
    output = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return output.reshape(batch, 1, heads, dim), None


GROUPED_DECODE = "dash_vlm_grouped_decode"
AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)


@contextmanager
def _attention_replaced(config, replacements: dict[str, str]) -> Iterator[None]:
    """Inside the block the layers of ``config`` run ``replacements[attention]`` instead of their attention."""
    attention = config._attn_implementation
    config._attn_implementation = replacements.get(attention, attention)
    try:
        yield
    finally:
        config._attn_implementation = attention


def _grouped_decode(config) -> AbstractContextManager:
    """Run SDPA layers of ``config`` with :func:`grouped_decode_attention` inside the block (eager ones as they are)."""
    return _attention_replaced(config, {"sdpa": GROUPED_DECODE})


def _decoder_on_sdpa(model: PreTrainedModel) -> AbstractContextManager:
    """The fast path's decoder layers run SDPA (captured with static masks; FA4 needs an unpadding sync), its vision
    tower whatever it has."""
    return _attention_replaced(adapter_for(model).decoder(model).config, {FLASH_ATTENTION_4: "sdpa"})


def _call_layer(
    layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, rotary: tuple, cache: Cache, positions
) -> torch.Tensor | tuple:
    """One decoder layer over a static cache, writing its keys and values at cache positions ``positions``."""
    return layer(
        hidden,
        attention_mask=mask,
        position_embeddings=rotary,
        position_ids=None,
        past_key_values=cache,
        use_cache=True,
        cache_position=positions,
    )


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer's hidden states, whether the family's layer returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output


class _DecodeGraph:
    """The static buffers of one :class:`DecodeShape` and the step that runs on them.

    The layers of a group (below or above the decision layer) share a prompt-slot mask and a start, the first slot a
    new token takes.
    """

    def __init__(self, model: PreTrainedModel, shape: DecodeShape, prefill: DynamicCache, positions: torch.Tensor):
        adapter = adapter_for(model)
        self.layers = adapter.decoder_layers(model)
        self.embed, self.rotary = model.get_input_embeddings(), adapter.decoder(model).rotary_emb
        self.norm, self.lm_head = adapter.final_norm(model), model.get_output_embeddings()
        self.additive = model.config._attn_implementation == "eager"
        self.decoder_config = adapter.decoder(model).config  # the layers' own: their attention function's name
        keys = prefill.layers[0].keys
        batch, device, self.dtype = shape.batch, keys.device, keys.dtype
        self.cache = Cache(layers=[StaticLayer(length) for length in shape.lengths])
        self.cache.early_initialization(batch, keys.shape[1], keys.shape[-1], keys.dtype, device)
        self.group_of_layer = shape.groups
        group_lengths = [shape.lengths[shape.groups.index(group)] for group in range(max(shape.groups) + 1)]
        self.prompt_slots = [torch.zeros(batch, length, dtype=torch.bool, device=device) for length in group_lengths]
        self.starts = torch.zeros(len(group_lengths), dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.base_positions = torch.zeros_like(positions)
        self.tokens = torch.zeros(batch, shape.steps, dtype=torch.long, device=device)
        vocab = self.lm_head.out_features
        self.logits = torch.zeros(shape.steps, batch, vocab, device=device) if shape.keep_logits else None
        self.penalty = shape.repetition_penalty
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if self.penalty != 1 else None
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(
        self,
        prefill: DynamicCache,
        allowed: list[torch.Tensor],
        positions: torch.Tensor,
        first: torch.Tensor,
        seen: torch.Tensor | None,
    ):
        """Copy a prefill into the buffers: its keys and values, the prompt slots each group may attend to (one
        ``[batch, slots]`` mask per group), the next rotary position of each sample, the first new token, and the
        tokens seen so far (``[batch, vocab]``, for the repetition penalty)."""
        for layer, static in zip(prefill.layers, self.cache.layers, strict=True):
            slots = layer.keys.shape[-2]
            static.keys[:, :, :slots].copy_(layer.keys)
            static.values[:, :, :slots].copy_(layer.values)
        for buffer, mask in zip(self.prompt_slots, allowed, strict=True):
            buffer.zero_()[:, : mask.shape[-1]].copy_(mask)
        for start, mask in zip(self.starts, allowed, strict=True):
            start.fill_(mask.shape[-1])  # from a Python int: no copy from pageable memory, no sync
        self.base_positions.copy_(positions)
        self.token.copy_(first[:, None])
        self.step.zero_()
        self.tokens.zero_()[:, 0] = first
        if self.seen is not None:
            self.seen.copy_(seen)

    def _group_inputs(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and cache position of a group's layers at the current step."""
        slots, start = self.prompt_slots[group], self.starts[group]
        columns = torch.arange(slots.shape[-1], device=slots.device)
        allowed = (slots | ((columns >= start) & (columns <= start + self.step)))[:, None, None, :]
        if self.additive:
            allowed = additive_mask(allowed, self.dtype)
        return allowed, (start + self.step)[None]

    def run_step(self) -> None:
        """One greedy decode step on the buffers; device work only, so it can be captured."""
        hidden = self.embed(self.token)
        rotary = self.rotary(hidden, (self.base_positions + self.step)[..., None])
        group_inputs = [self._group_inputs(group) for group in range(len(self.prompt_slots))]
        with _grouped_decode(self.decoder_config):
            for layer, group in zip(self.layers, self.group_of_layer, strict=True):
                mask, cache_position = group_inputs[group]
                hidden = _hidden(_call_layer(layer, hidden, mask, rotary, self.cache, cache_position))
        logits = self.lm_head(self.norm(hidden[:, -1])).float()  # generate scores in float32
        if self.seen is not None:
            logits = penalize_repetition(logits, self.seen, self.penalty)
        choice = logits.argmax(-1)
        if self.seen is not None:
            self.seen.scatter_(1, choice[:, None], True)
        written = (self.step + 1)[None]
        self.tokens.index_copy_(1, written, choice[:, None])
        if self.logits is not None:
            self.logits.index_copy_(0, written, logits[None])
        self.token.copy_(choice[:, None])
        self.step.add_(1)

    def capture(self, pool: tuple) -> None:
        """Capture :meth:`run_step` as a CUDA graph (after warm-up on a side stream, as CUDA graphs require)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.run_step()

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.run_step()


class _PrefillGraph:
    """The decoder layers of one :class:`PrefillShape`, on static buffers: the layers up to the decision layer on the
    padded prompt, the scorer and the plan (``plan.plan_halting``, with the bucket as the compact length), the layers
    above on the kept slots, and the halted tokens' states put back. Device work only, so it can be captured.

    The prompt is padded on the right: causal attention keeps the real tokens from the padding, which is not real, so
    it neither halts nor is kept, and each row may always attend to itself, so that no row is fully masked.
    """

    def __init__(
        self, layers: nn.ModuleList, shape: PrefillShape, hidden: torch.Tensor, rotary: tuple, family: ModelAdapter
    ):
        self.layers, self.shape, self.family = layers, shape, family
        self.decision = shape.scorer.layer(len(layers)) if shape.slots else len(layers) - 1
        batch, length, device = shape.batch, shape.length, hidden.device
        self.hidden = hidden.new_zeros(batch, length, hidden.shape[-1])
        added_layers, rows = shape.additions
        self.addition_rows = torch.zeros(rows, dtype=torch.long, device=device)  # flat [batch * length] positions
        self.additions = hidden.new_zeros(added_layers, rows, hidden.shape[-1])
        self.rotary = tuple(part.new_zeros(*part.shape[:-3], batch, length, part.shape[-1]) for part in rotary)
        self.real = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.eligible = torch.zeros_like(self.real)
        self.input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.groups = torch.full((batch, length), -1, dtype=torch.long, device=device)
        self.n_halt = torch.zeros(batch, dtype=torch.long, device=device)
        lengths = [length] * (self.decision + 1) + [shape.slots] * (len(layers) - self.decision - 1)
        self.cache = Cache(layers=[StaticLayer(n) for n in lengths])
        self.additive = layers[0].self_attn.config._attn_implementation == "eager"
        self.output: torch.Tensor | None = None
        self.plan: HaltPlan | None = None
        self.returns_tuple = False
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(
        self,
        hidden: torch.Tensor,
        rotary: tuple,
        real: torch.Tensor,
        eligible: torch.Tensor,
        additions: DecoderAdditions | None = None,
        **halting,
    ):
        """Copy one prefill's inputs into the buffers (the padding zeroed): hidden states and position embeddings as
        the decoder hands them to its layers, the real and eligible tokens, the decoder additions, and with halting
        ``n_halt`` (``[batch]``), ``input_ids`` where the scorer reads them and ``groups`` under
        ``selection="per_row"`` or ``"per_frame"``."""
        length = hidden.shape[1]
        if additions is not None:
            rows = additions.values[0].shape[0]  # the bucketed buffers' other rows add zeros to position 0
            padded = torch.zeros(self.real.shape, dtype=torch.bool, device=self.real.device)
            padded[:, :length] = additions.positions
            # the flat positions of the rows, in the order of their additions, found without a host sync
            self.addition_rows.zero_()[:rows].copy_(torch.argsort(~padded.flatten(), stable=True)[:rows])
            for buffer, values in zip(self.additions, additions.values, strict=True):
                buffer.zero_()[:rows].copy_(values)
        self.hidden.zero_()[:, :length].copy_(hidden)
        for buffer, part in zip(self.rotary, rotary, strict=True):
            buffer.zero_()[..., :length, :].copy_(part)
        self.real.zero_()[:, :length].copy_(real)
        self.eligible.zero_()[:, :length].copy_(eligible)
        if "n_halt" in halting:
            self.n_halt.copy_(halting["n_halt"])
        if halting.get("input_ids") is not None:
            self.input_ids.zero_()[:, :length].copy_(halting["input_ids"])
        if halting.get("groups") is not None:
            self.groups.fill_(-1)[:, :length].copy_(halting["groups"])

    def _mask(self) -> torch.Tensor:
        length = self.shape.length
        causal = torch.ones(length, length, dtype=torch.bool, device=self.real.device).tril()
        own = torch.eye(length, dtype=torch.bool, device=self.real.device)
        allowed = ((causal & self.real[:, None, :]) | own)[:, None]
        return additive_mask(allowed, self.hidden.dtype) if self.additive else allowed

    def _run_layers(self, first: int, last: int, hidden, mask, rotary, slots: int) -> torch.Tensor:
        """Layers ``first..last - 1``, each followed by its decoder addition where it has one."""
        positions = torch.arange(slots, device=hidden.device)
        for index in range(first, last):
            output = _call_layer(self.layers[index], hidden, mask, rotary, self.cache, positions)
            self.returns_tuple = isinstance(output, tuple)
            hidden = _hidden(output)
            if index < len(self.additions):  # below the decision layer (DeltaPress.check_model)
                flat = hidden.flatten(0, 1).index_add(0, self.addition_rows, self.additions[index])
                hidden = flat.view_as(hidden)
        return hidden

    def run(self) -> None:
        """The decoder layers on the buffers; fills :attr:`output` (``[batch, length, hidden]``, before the final
        norm), :attr:`plan` (with halting) and the static cache."""
        shape, decision = self.shape, self.decision
        mask = self._mask() if shape.masked else None
        if not shape.slots:
            self.output = self._run_layers(0, len(self.layers), self.hidden, mask, self.rotary, shape.length)
            return
        hidden = self._run_layers(0, decision, self.hidden, mask, self.rotary, shape.length)
        scorer, reading = shape.scorer, {"input_ids": self.input_ids}
        layer = self.layers[decision]
        handles = read_decision_layer(
            layer, self.family.token_mixer(layer), scorer.reads, reading.__setitem__, lambda: self.real, self.family
        )
        try:
            hidden = self._run_layers(decision, decision + 1, hidden, mask, self.rotary, shape.length)
        finally:
            for handle in handles:
                handle.remove()
        scores = scorer.score(Reading(self.real, **{name: reading[name] for name in scorer.reads}))
        select = selection_rule(None if shape.group_ratio is None else self.groups, shape.group_ratio)
        plan = plan_halting(
            scores, self.real, self.eligible, self.n_halt, [shape.slots], select, shape.slots, filler_last=True
        )
        compact = plan.compact_inputs({"attention_mask": mask, "position_embeddings": self.rotary}, flash=False)
        kept = self._run_layers(
            decision + 1,
            len(self.layers),
            plan.gather(hidden),
            compact["attention_mask"],
            compact["position_embeddings"],
            shape.slots,
        )
        self.output, self.plan = plan.restore(kept, hidden), plan

    def capture(self, pool: tuple) -> None:
        """Capture :meth:`run` as a CUDA graph (after warm-up on a side stream), then replay it once."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.run()
        self.graph.replay()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()

    def fill(self, cache: DynamicCache, length: int, layers: nn.ModuleList) -> None:
        """Copy the static keys and values into ``cache`` as a halted cache of a ``length``-token prompt: the layers
        up to the decision layer unpadded, the layers above with their slots (``HaltedLayer``)."""
        if self.plan is not None:
            record = self.plan.unpadded(length).cache_record(flash=False)
            attach_halted_layers(cache, layers, record, self.decision + 1)
        for index, static in enumerate(self.cache.layers):
            slots = length if index <= self.decision else self.shape.slots
            cache.update(static.keys[:, :, :slots], static.values[:, :, :slots], index)


class _DecoderStack(nn.Module):
    """Stands in for the decoder's list of layers during a fast-path prefill: the decoder's forward (masks, position
    embeddings, final norm) runs as usual and calls this once instead of each layer."""

    attention_type = "full_attention"  # the mask the decoder hands over is ignored: the graph builds its own

    def __init__(self, run: Callable):
        super().__init__()
        self.run = run

    def forward(self, hidden_states: torch.Tensor, *, position_embeddings: tuple, past_key_values: Cache, **kwargs):
        return self.run(hidden_states, position_embeddings, past_key_values)


class StaticDecoder:
    """Greedy generation whose decoder prefill and decode steps run on static buffers, as replayed CUDA graphs
    (``capture=True``, on one GPU) or eagerly (``capture=False``: the same buffers and work, for checking on any
    device).

    Parameters
    ----------
    model : PreTrainedModel
        A supported model on one device.
    capture : bool
        Capture each decode shape as a CUDA graph; needs the model on a CUDA GPU.
    max_graphs : int
        How many decode shapes, and how many prefill shapes, keep their graph and buffers (least recently used
        dropped first).
    prefill_bucket : int
        The prefill pads the prompt and the kept slots to a multiple of this (1: no padding, a graph per length).
    """

    def __init__(
        self, model: PreTrainedModel, capture: bool = True, max_graphs: int = 4, prefill_bucket: int = PREFILL_BUCKET
    ):
        devices = {parameter.device for parameter in model.parameters()}
        if len(devices) > 1:
            raise ValueError(f"cuda_graphs needs the model on one device; it is split over {sorted(map(str, devices))}")
        device = devices.pop()
        if capture and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA GPU; it is on {device}")
        attention = adapter_for(model).decoder(model).config._attn_implementation
        if attention not in ("sdpa", "eager", FLASH_ATTENTION_4):
            raise ValueError(
                f"cuda_graphs supports attn_implementation 'sdpa', 'eager' and {FLASH_ATTENTION_4!r}, got {attention!r}"
            )
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if not isinstance(prefill_bucket, int) or prefill_bucket < 1:
            raise ValueError(f"prefill_bucket must be an int >= 1, got {prefill_bucket!r}")
        layer_types = getattr(adapter_for(model).decoder(model).config, "layer_types", None) or ()
        if any(kind != "full_attention" for kind in layer_types):
            raise NotImplementedError("cuda_graphs supports decoders whose layers all use full attention")
        unsupported = [
            name
            for name, defaults in UNSUPPORTED_PROCESSORS.items()
            if getattr(model.generation_config, name, None) not in defaults
        ]
        if unsupported:
            raise NotImplementedError(
                f"cuda_graphs does not apply the generation config's {unsupported}; reset them in "
                "model.generation_config or decode on the eager path"
            )
        self.model, self.capture, self.max_graphs = model, capture, max_graphs
        self.adapter = adapter_for(model)
        self.graphs: OrderedDict[DecodeShape, _DecodeGraph] = OrderedDict()
        self.prefill_graphs: OrderedDict[PrefillShape, _PrefillGraph] = OrderedDict()
        self.prefill_bucket = prefill_bucket
        self.tower_tables = TowerTables(model, size=max_graphs)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0
        self.graph_memory_bytes = 0  # GPU memory the graphs' buffers and captures took, as reserved by the allocator
        self._prompt: tuple[torch.Tensor, bool] | None = None  # real tokens and whether to mask, during a prefill
        self._additions: DecoderAdditions | None = None  # the decoder's additions between layers, during a prefill
        parameters = inspect.signature(model.forward).parameters
        self._takes_logits_to_keep, self._takes_position_ids = (
            "logits_to_keep" in parameters,
            "position_ids" in parameters,
        )

    @torch.inference_mode()
    def prefill(self, inputs: dict, press: DeltaPress | None) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The prefill as ``generate`` runs it: the cache, the last position's logits and each sample's rotary position
        of its last prompt token (read where the decoder computes its rotary embeddings), which new tokens continue."""
        with _decoder_on_sdpa(self.model):
            return self._prefill(inputs, press)

    def _prefill(self, inputs: dict, press: DeltaPress | None) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        model = self.model
        length = inputs["input_ids"].shape[1]
        cache = DynamicCache(config=model.config)
        cache_position = torch.arange(length, device=inputs["input_ids"].device)
        inputs = dict(inputs)
        if inputs.get("position_ids") is None and self._takes_position_ids:  # as generate prepares them
            inputs["position_ids"] = model._prepare_position_ids_for_generation(inputs["input_ids"], inputs)
        prepared = model.prepare_inputs_for_generation(
            **inputs, past_key_values=cache, cache_position=cache_position, use_cache=True, is_first_iteration=True
        )
        if self._takes_logits_to_keep:
            prepared["logits_to_keep"] = 1
        seen = {}

        def read_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault("positions", kwargs.get("position_ids", args[1] if len(args) > 1 else None))

        decoder = self.adapter.decoder(model)
        layers = decoder.layers
        mask = inputs.get("attention_mask")
        real = torch.ones(inputs["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()
        eager = model.config._attn_implementation == "eager"
        # whether the batch has padding: a host sync, before any layer runs
        self._prompt = real.to(inputs["input_ids"].device), eager or not bool(real.all())

        def take_additions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._additions = self.adapter.take_decoder_additions(kwargs)  # the graph adds them between its layers
            return args, kwargs

        handles = [
            decoder.rotary_emb.register_forward_pre_hook(read_positions, with_kwargs=True),
            decoder.register_forward_pre_hook(take_additions, with_kwargs=True),
        ]
        try:
            # the press hooks the real layers and blocks; the tower runs on its tables (dash_vlm.tower)
            with press(model) if press is not None else nullcontext(), self.tower_tables.installed(prepared):
                decoder.layers = nn.ModuleList([_DecoderStack(lambda *args: self._run_stack(layers, *args))])
                output = model(**prepared)
        finally:
            decoder.layers = layers
            for handle in handles:
                handle.remove()
            self._prompt = self._additions = None
        return cache, output.logits[:, -1], seen["positions"][..., -1]

    def _run_stack(self, layers: nn.ModuleList, hidden: torch.Tensor, rotary: tuple, cache: DynamicCache):
        """The decoder layers of a prefill, as a :class:`_PrefillGraph` (captured the first time its shape comes, then
        replayed), under the press's halting when a press is on and anything halts."""
        executor = executor_of(self.model)
        prefill = None if executor is None else executor.hand_over()
        halting = prefill is not None and prefill.halting
        real, masked = self._prompt
        batch, length = hidden.shape[:2]
        padded = bucket(length, self.prefill_bucket)
        slots = min(bucket(max(prefill.kept_counts), self.prefill_bucket), padded) if halting else 0
        in_groups = halting and prefill.groups is not None
        ratio = executor.config.compression_ratio if in_groups else None
        additions = self._additions
        rows = 0 if additions is None else bucket(additions.values[0].shape[0], self.prefill_bucket)
        added = (0, 0) if additions is None else (len(additions.values), rows)
        shape = PrefillShape(batch, padded, slots, masked, executor.scorer if halting else None, ratio, added)
        graph = self.prefill_graphs.get(shape)
        new = graph is None
        if new:
            while len(self.prefill_graphs) >= self.max_graphs:
                self.prefill_graphs.popitem(last=False)
        with self._counting_memory(hidden.device) if new and self.capture else nullcontext():
            if new:  # kept only once it has run (and been captured): a failed capture leaves no half-made graph
                graph = _PrefillGraph(layers, shape, hidden, rotary, self.adapter)
            if halting:
                halting_inputs = {
                    "n_halt": prefill.halt_counts_tensor,
                    "input_ids": prefill.input_ids,
                    "groups": prefill.groups,
                }
                graph.load(hidden, rotary, real, prefill.eligible, additions, **halting_inputs)
            else:
                graph.load(hidden, rotary, real, real, additions)
            if new and self.capture:
                graph.capture(self.pool)
                self.captures += 1
                logger.info("captured a prefill graph for %s", shape)
            else:
                graph.replay()
        self.prefill_graphs[shape] = graph
        self.prefill_graphs.move_to_end(shape)
        graph.fill(cache, length, layers)
        if halting:
            prefill.plan = graph.plan.unpadded(length)
        output = graph.output[:, :length]
        return (output,) if graph.returns_tuple else output

    @contextmanager
    def _counting_memory(self, device: torch.device):
        """Add the GPU memory the block leaves reserved to :attr:`graph_memory_bytes`: the allocator's unused cache is
        emptied before and after (only when a graph is made, never on a replay), so what stays is the graphs' buffers
        and memory pool."""
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        yield
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.graph_memory_bytes += torch.cuda.memory_reserved(device) - before

    def generate(
        self,
        inputs: dict,
        press: DeltaPress | None,
        max_new_tokens: int,
        keep_logits: bool = False,
        stop_at_end: bool = True,
    ) -> FastGeneration:
        """Greedy generation of up to ``max_new_tokens`` tokens for model inputs (``input_ids``, ``attention_mask``,
        pixel inputs) under ``press`` (or none), with the repetition penalty of the model's generation config.

        With ``stop_at_end`` it stops once every sample has produced an end-of-sequence token, checked every
        ``CHUNK`` steps; without, it always makes ``max_new_tokens`` (as ``min_new_tokens`` would).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        config = self.model.generation_config
        penalty = float(config.repetition_penalty or 1.0)
        device = inputs["input_ids"].device
        captures = self.captures
        with (
            torch.inference_mode(),
            torch.cuda.device(device) if device.type == "cuda" else nullcontext(),
            _decoder_on_sdpa(self.model),
        ):
            first_token, answer = Timer(device), Timer(device)
            cache, logits, positions = self.prefill(inputs, press)
            logits, seen = penalized_first_step(logits, inputs["input_ids"], penalty)
            first = logits.argmax(-1)
            first_token.stop()
            if seen is not None:
                seen.scatter_(1, first[:, None], True)
            allowed = self._prompt_slots(cache, inputs.get("attention_mask"))
            lengths = tuple(bucket(layer.keys.shape[-2]) + max_new_tokens for layer in cache.layers)
            groups = tuple(int(isinstance(layer, HaltedLayer)) for layer in cache.layers)  # halted layers are above
            shape = DecodeShape(first.shape[0], lengths, groups, max_new_tokens, keep_logits, penalty)
            graph = self._graph(shape, cache, positions)
            graph.load(cache, allowed, positions + 1, first, seen)
            decode = Timer(device)
            done = 1
            while done < max_new_tokens and not (stop_at_end and self._all_ended(graph.tokens[:, :done])):
                steps = min(CHUNK, max_new_tokens - done)
                graph.decode(steps)
                done += steps
            decode.stop()
            tokens = self._pad_after_end(graph.tokens.clone())
            kept_logits = None
            if keep_logits:
                kept_logits = [logits.float(), *graph.logits[1:done].clone().unbind(0)]
            answer.stop()
        captured = self.captures > captures  # a prefill graph, a decode graph or both
        return FastGeneration(tokens[:, :done], kept_logits, first_token, decode, answer, captured)

    def _all_ended(self, tokens: torch.Tensor) -> bool:
        """Whether every sample has produced an end-of-sequence token (a host sync)."""
        return bool(end_tokens(tokens, self.model.generation_config.eos_token_id).any(-1).all())

    def _graph(self, shape: DecodeShape, cache: DynamicCache, positions: torch.Tensor) -> _DecodeGraph:
        if shape in self.graphs:
            self.graphs.move_to_end(shape)
            return self.graphs[shape]
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        with self._counting_memory(positions.device) if self.capture else nullcontext():
            graph = _DecodeGraph(self.model, shape, cache, positions)
            if self.capture:
                first = positions.new_zeros(shape.batch)
                seen = None if graph.seen is None else torch.zeros_like(graph.seen)
                graph.load(cache, self._prompt_slots(cache, None), positions + 1, first, seen)
                graph.capture(self.pool)
                self.captures += 1
                logger.info("captured a decode graph for %s", shape)
        self.graphs[shape] = graph
        return graph

    @staticmethod
    def _prompt_slots(cache: DynamicCache, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Per group (full layers, then halted ones), the ``[batch, slots]`` prompt slots a new token may attend to:
        the real prompt tokens below the decision layer, the valid compact slots above it."""
        allowed = {}
        for layer in cache.layers:
            halted = isinstance(layer, HaltedLayer)
            if halted in allowed:
                continue
            if halted:
                allowed[halted] = layer.record.valid.to(layer.keys.device)
            elif attention_mask is not None:
                allowed[halted] = attention_mask.bool()
            else:
                keys = layer.keys
                allowed[halted] = torch.ones(keys.shape[0], keys.shape[-2], dtype=torch.bool, device=keys.device)
        return list(allowed.values())

    def _pad_after_end(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after a sample's first end-of-sequence token become padding, as ``generate`` pads them."""
        config = self.model.generation_config
        if config.eos_token_id is None:
            return tokens
        padding = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        padding = padding[0] if isinstance(padding, list) else padding
        return tokens.masked_fill(after_first_end(tokens, config.eos_token_id), padding)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logit of every token seen so far divided by ``penalty`` when positive,
    multiplied when negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def penalized_first_step(
    logits: torch.Tensor, prompt: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prefill's last logits under the repetition penalty, and the ``[batch, vocab]`` mask of the tokens seen (the
    prompt's) that later steps extend; without a penalty, the logits as they are and no mask."""
    if penalty == 1:
        return logits, None
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, prompt, True)
    return penalize_repetition(logits.float(), seen, penalty), seen


def end_tokens(tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """``[batch, steps]`` bool, True on end-of-sequence tokens (none without ``eos_token_id``)."""
    if eos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(eos_token_id, device=tokens.device).flatten())


def after_first_end(tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """``[batch, steps]`` bool, True strictly after each sample's first end-of-sequence token."""
    ends = end_tokens(tokens, eos_token_id).long()
    return (ends.cumsum(-1) - ends) > 0
