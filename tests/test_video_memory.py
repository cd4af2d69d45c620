"""The long-video memory probe (``tests/video_memory.py``, run on the H200) on the tiny preset on CPU: the rows it
records, the KV cache it reports against the cache HF would hold, merging runs for one plot, and its account of a
failed allocation."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import video_memory

from dash_vlm.models.presets import PRESETS


def run_script(monkeypatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", ["video_memory.py", *arguments])
    video_memory.main()


TINY_ON_CPU = ("--preset", "tiny", "--side", "56", "--device", "cpu")


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video_memory")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        run_script(patch, *TINY_ON_CPU, "--frames", "8,4", "--new-tokens", "2", "--output", str(folder / "sweep.json"))
        patch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        run_script(
            patch,
            *TINY_ON_CPU,
            "--frames",
            "12",
            "--variants",
            "dash",
            "--prefill-only",
            "--output",
            str(folder / "limit.json"),
        )
    return folder, [json.loads((folder / name).read_text()) for name in ("sweep.json", "limit.json")]


def test_rows_and_caches(documents):
    _, (sweep, limit) = documents
    assert sweep["allocator"] == "expandable_segments:True" and limit["allocator"] == "default"
    assert [(row["frames"], row["variant"]) for row in sweep["rows"]] == [
        (frames, name) for frames in (4, 8) for name in video_memory.VARIANTS
    ]
    per_token = video_memory.cache_bytes_per_token(PRESETS["tiny"].build("cpu", torch.float32).config, torch.float32)
    for frames in (4, 8):
        rows = {row["variant"]: row for row in sweep["rows"] if row["frames"] == frames}
        vanilla, dash = rows["vanilla"], rows["dash"]
        assert vanilla["kept"] == vanilla["tokens"] and vanilla["kv_cache_bytes"] == vanilla["tokens"] * per_token
        assert dash["kept"] < dash["tokens"] and dash["kv_cache_bytes"] < vanilla["kv_cache_bytes"]
        assert rows["dash+vision"]["kept"] == dash["kept"]  # one rule over the same tokens
        assert "answer_ms" in vanilla
    assert [row["variant"] for row in limit["rows"]] == ["dash"] and "answer_ms" not in limit["rows"][0]
    assert sweep["fits"]["vanilla"]["largest_measured"] == 8 and limit["fits"]["dash"]["largest_measured"] == 12


def test_merge_tags_each_row_with_its_allocator_and_plots(documents, monkeypatch):
    folder, (sweep, limit) = documents
    merged = video_memory.merge([sweep, limit])
    assert [row["frames"] for row in merged["rows"]] == sorted(row["frames"] for row in sweep["rows"] + limit["rows"])
    assert {row["allocator"] for row in merged["rows"] if row["frames"] == 12} == {"default"}
    assert merged["fits"]["dash"]["largest_measured"] == 12
    with pytest.raises(ValueError, match="one preset and frame side"):
        video_memory.merge([sweep, limit | {"side": 448}])
    run_script(
        monkeypatch,
        "--merge",
        str(folder / "sweep.json"),
        str(folder / "limit.json"),
        "--plot",
        str(folder / "limits.png"),
    )
    assert (folder / "limits.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "--merge", str(folder / "sweep.json"))


def test_describe_oom_keeps_the_allocators_account():
    message = (
        "CUDA out of memory. Tried to allocate 19.08 GiB. GPU 0 has a total capacity of 139.80 GiB of which 18.08 GiB "
        "is free. Of the allocated memory 88.61 GiB is allocated by PyTorch, and 32.43 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF"
    )
    try:
        raise torch.OutOfMemoryError(message)
    except torch.OutOfMemoryError as error:
        described = video_memory.describe_oom(error, None)
    assert described["error"].endswith("but unallocated.") and "32.43 GiB is reserved" in described["error"]
    assert described["failed_in"] == [] and described["peak_before_failure_bytes"] == 0
