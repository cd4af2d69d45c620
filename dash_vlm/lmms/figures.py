"""Per-request speed figures, handed from the lmms-eval model to the task's ``process_results``.

lmms-eval gives ``process_results`` only the document and the answer text, so the model records what it measured
here, keyed by task name and document id, and the ``dash_*`` tasks read it back (``dash_vlm.lmms.tasks``). Each
process keeps its own registry: with several processes, a document's request and its scoring happen on the same
rank. A cached answer (``--use_cache``) has no entry, so it simply contributes no figures.
"""

from __future__ import annotations

SPEED_METRICS = (
    "dash_prefill_ms",
    "dash_ttft_ms",
    "dash_tokens",
    "dash_kept_tokens",
    "dash_kv_cache_mb",
    "dash_cuda_graphs",  # 1 when the request ran on the fast path (decode steps replayed as CUDA graphs), else 0
)

_REGISTRY: dict[tuple[str, int], dict[str, float]] = {}


def record(task: str, doc_id: int, figures: dict[str, float]) -> None:
    if set(figures) != set(SPEED_METRICS):
        raise ValueError(f"figures must have exactly the keys {SPEED_METRICS}, got {sorted(figures)}")
    _REGISTRY[(task, int(doc_id))] = figures


def lookup(task: str, doc_id: int | None) -> dict[str, float]:
    """The figures of a request, or an empty dict when there are none (a cached answer)."""
    return {} if doc_id is None else _REGISTRY.get((task, int(doc_id)), {})


def clear() -> None:
    _REGISTRY.clear()
