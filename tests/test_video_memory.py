"""The long-video memory probe (``dash-vlm bench --measure video-memory``, run on the H200) on the tiny preset on CPU:
the rows it records, the KV cache it reports against the cache HF would hold, merging runs for one plot, and its
account of a failed allocation."""

from __future__ import annotations

import json

import pytest
import torch

from dash_vlm.bench import video_memory
from dash_vlm.cli import main as cli_main
from dash_vlm.models.presets import PRESETS


def video_memory_cli(*arguments: str) -> None:
    cli_main(["bench", "--measure", "video-memory", *arguments])


TINY_ON_CPU = ("--preset", "tiny", "--image-size", "56", "--device", "cpu")


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video_memory")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        sweep = ("--video-frames", "8,4", "--new-tokens", "2", "--output", str(folder / "sweep.json"))
        video_memory_cli(*TINY_ON_CPU, *sweep)
        patch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        limit = ("--video-frames", "12", "--variants", "dash", "--prefill-only", "--output", str(folder / "limit.json"))
        video_memory_cli(*TINY_ON_CPU, *limit)
    return folder, [json.loads((folder / name).read_text()) for name in ("sweep.json", "limit.json")]


def test_rows_and_caches(documents):
    _, (sweep, limit) = documents
    assert sweep["allocator"] == "expandable_segments:True" and limit["allocator"] == "default"
    assert [(row["frames"], row["variant"]) for row in sweep["rows"]] == [
        (frames, name) for frames in (4, 8) for name in video_memory.DEFAULT_VARIANTS
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
    assert (sweep["side"], sweep["new_tokens"]) == (56, 2) and limit["new_tokens"] == 8  # the script's default
    assert sweep["command"].startswith("dash-vlm bench --measure video-memory --preset tiny --image-size 56")


def test_merge_tags_each_row_with_its_allocator_and_plots(documents, capsys):
    folder, (sweep, limit) = documents
    merged = video_memory.merge([sweep, limit])
    assert [row["frames"] for row in merged["rows"]] == sorted(row["frames"] for row in sweep["rows"] + limit["rows"])
    assert {row["allocator"] for row in merged["rows"] if row["frames"] == 12} == {"default"}
    assert merged["fits"]["dash, allocator default"]["largest_measured"] == 12  # a line per allocator
    assert merged["fits"]["dash, allocator expandable_segments:True"]["largest_measured"] == 8
    with pytest.raises(ValueError, match="one preset and frame side"):
        video_memory.merge([sweep, limit | {"side": 448}])
    files = (str(folder / "sweep.json"), str(folder / "limit.json"))
    video_memory_cli("--merge", *files, "--plot", str(folder / "limits.png"), "--output", str(folder / "merged.json"))
    assert (folder / "limits.png").stat().st_size > 0
    assert json.loads((folder / "merged.json").read_text()) == json.loads(json.dumps(merged))
    (folder / "other.json").write_text(json.dumps(limit | {"side": 448}))
    plot = str(folder / "refused.png")
    for arguments, message in [
        (["--merge", files[0]], "--merge needs --plot"),
        (["--merge", files[0], str(folder / "other.json"), "--plot", plot], "one preset and frame side"),
        (["--merge", files[0], str(folder / "none.json"), "--plot", plot], "none.json: cannot read it as JSON"),
        (["--merge", files[0], "--plot", plot, "--preset", "tiny"], "--preset does not apply with it"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            video_memory_cli(*arguments)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (folder / "refused.png").exists()


def test_chunked_runs_and_a_shorter_decoder(documents, tmp_path, monkeypatch):
    """``--prefill-chunk`` reaches every press (the ratio-0 control chunks without halting); ``--decoder-layers``
    shortens the decoder; merged with an unchunked run, each line is named by its chunk setting."""
    _, (sweep, _) = documents
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", sweep["allocator"])  # one allocator: the lines differ by chunks
    output = tmp_path / "chunked.json"
    video_memory_cli(*TINY_ON_CPU, "--video-frames", "4,8", "--variants", "vanilla,control,dash", "--prefill-chunk",
                     "5", "--decoder-layers", "3", "--new-tokens", "2", "--output", str(output))  # fmt: skip
    chunked = json.loads(output.read_text())
    assert (chunked["prefill_chunk"], chunked["decoder_layers"], sweep["prefill_chunk"]) == (5, 3, "auto")
    assert sweep["decoder_layers"] == PRESETS["tiny"].build("meta", torch.float32).config.text_config.num_hidden_layers
    control = [row for row in chunked["rows"] if row["variant"] == "control"]
    assert all(row["kept"] == row["tokens"] for row in control)
    merged = video_memory.merge([sweep, chunked])
    assert {"dash, prefill_chunk auto", "dash, prefill_chunk 5", "control, prefill_chunk 5"} <= set(merged["fits"])
    assert merged["fits"]["dash, prefill_chunk 5"]["largest_measured"] == 8


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
