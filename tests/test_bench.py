"""The speed harness on the tiny preset (CPU): the JSON's fields and their consistency; no time is asserted."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from dash_vlm import DeltaPress
from dash_vlm.bench import BenchConfig, TokenTimer, batch_inputs, decoder_ideal_speedup, ideal_speedup
from dash_vlm.cli import main as cli_main
from dash_vlm.models import adapter_for
from dash_vlm.models.presets import PRESETS

FIGURES = (
    "vision_ms",
    "decoder_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_step_ms",
    "answer_ms",
    "decode_tokens_per_s",
    "peak_memory_bytes",
)


def test_bench_tiny_json(tmp_path, capsys):
    output, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    cli_main(
        ["bench", "--preset", "tiny", "--image-size", "48", "--image-size", "64", "--ratios", "0,0.5,0.8",
         "--repeats", "3", "--warmup", "1", "--new-tokens", "4", "--batch-size", "2", "--output", str(output),
         "--plot", str(plot)]
    )  # fmt: skip
    document = json.loads(output.read_text())
    assert plot.stat().st_size > 0 and "tiny on cpu" in capsys.readouterr().out
    assert document["preset"] == "tiny" and document["config"]["batch_size"] == 2
    rows = document["rows"]
    assert [(row["image_size"], row["ratio"]) for row in rows] == [(s, r) for s in (48, 64) for r in (0, 0.5, 0.8)]
    for row in rows:
        assert row["path"] == "eager" and row["noisy"] in (True, False)
        assert row["answer_speedup"] == pytest.approx(row["vanilla"]["answer_ms"] / row["dash"]["answer_ms"])
        assert row["dash"]["answer_ms"] > row["dash"]["ttft_ms"]
        for method in ("vanilla", "dash"):
            assert set(FIGURES) <= set(row[method])
            assert all(row[method][name] >= 0 for name in FIGURES)
            assert row[method]["ttft_ms"] > 0 and row[method]["decode_tokens_per_s"] > 0
        assert row["decoder_speedup"] == pytest.approx(row["vanilla"]["decoder_ms"] / row["dash"]["decoder_ms"])
        assert row["prefill_speedup"] == pytest.approx(row["vanilla"]["prefill_ms"] / row["dash"]["prefill_ms"])
        assert row["fraction_of_ideal"] == pytest.approx(row["decoder_speedup"] / row["ideal_decoder_speedup"])
        assert row["ideal_decoder_speedup"] >= 1
        runs = row["runs"]
        assert len(runs["vanilla"]) == len(runs["dash"]) == 3
        speed = row["dash"]["decode_tokens_per_s"] / row["vanilla"]["decode_tokens_per_s"]
        assert row["decode_speed_ratio"] == pytest.approx(speed)
        for method in ("vanilla", "dash"):
            assert row[method]["decode_tokens_per_s"] == pytest.approx(1000 / row[method]["decode_step_ms"])
        assert row["dash"]["decoder_ms"] == pytest.approx(sorted(run["decoder_ms"] for run in runs["dash"])[1])
        if row["ratio"] == 0:
            assert row["kept"] == row["tokens"] and row["ideal_decoder_speedup"] == pytest.approx(1)
        else:
            assert row["kept"] < row["tokens"]
        floor = row["floor"]  # the same tower, fewer decoder FLOPs and a smaller cache where tokens halt
        assert floor["dash"]["vision_tflop"] == floor["vanilla"]["vision_tflop"] > 0
        assert (floor["dash"]["decoder_tflop"] < floor["vanilla"]["decoder_tflop"]) == (row["ratio"] > 0)
        assert (floor["dash"]["step_gb"] < floor["vanilla"]["step_gb"]) == (row["ratio"] > 0)
        for method in ("vanilla", "dash"):
            for key, fraction in floor[method]["fraction"].items():
                assert fraction == pytest.approx(floor[method]["floor_ms"][key] / row[method][key])
    assert document["device_peak"]["matmul_tflops"] > 0 and document["device_peak"]["copy_gb_per_s"] > 0
    assert document["attention_counted"] == {"decoder": True, "vision": True}  # SDPA and the towers' VARLEN_SDPA
    for entry in document["latency"]:
        assert set(entry["floor"]["fraction"]) == {"ttft_ms", "decode_step_ms", "answer_ms"}
    by_size = {size: [row for row in rows if row["image_size"] == size] for size in (48, 64)}
    for size_rows in by_size.values():  # more halting, fewer kept tokens and a smaller cache
        assert [r["kept"] for r in size_rows] == sorted((r["kept"] for r in size_rows), reverse=True)
        assert [r["kv_cache_bytes"] for r in size_rows] == sorted(
            (r["kv_cache_bytes"] for r in size_rows), reverse=True
        )
    assert by_size[64][0]["tokens"] > by_size[48][0]["tokens"]


def test_bench_sweeps_vision_ratios(tmp_path, capsys):
    output = tmp_path / "bench.json"
    cli_main(
        ["bench", "--preset", "tiny", "--image-size", "64", "--ratios", "0,0.5", "--vision-compression-ratios", "0,0.5",
         "--repeats", "2", "--warmup", "1", "--new-tokens", "3", "--output", str(output)]
    )  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert [(row["ratio"], row["vision_ratio"]) for row in rows] == [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)]
    patches = 16 * 16  # a 64 px image in 4 px patches
    for row in rows:
        assert row["vision_patches"] == patches
        assert row["vision_speedup"] == pytest.approx(row["vanilla"]["vision_ms"] / row["dash"]["vision_ms"])
        assert row["fraction_of_ideal_vision"] == pytest.approx(row["vision_speedup"] / row["ideal_vision_speedup"])
        if row["vision_ratio"] == 0:
            assert row["vision_kept"] == patches and row["ideal_vision_speedup"] == 1 and "vision_block_ms" not in row
        else:
            assert row["vision_kept"] == patches // 2 and row["ideal_vision_speedup"] >= 1
            timing = row["vision_block_ms"]
            assert timing["block"] == 1 and timing["every_patch"] > 0 and timing["kept"] > 0
        assert row["tokens"] == rows[0]["tokens"]  # the merger sees every patch: as many image tokens
    assert "vision" in capsys.readouterr().out


def test_bench_measures_videos_of_each_frame_count(tmp_path, capsys):
    """``--video-frames``: a video of each count at the one frame side, with the prompt's video tokens and the tower's
    patches growing with the frames, and halting in the decoder and the tower on the video's tokens."""
    output, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    cli_main(
        ["bench", "--preset", "tiny", "--image-size", "32", "--video-frames", "4,8", "--ratios", "0.5",
         "--vision-compression-ratios", "0,0.5", "--repeats", "1", "--warmup", "1", "--new-tokens", "2",
         "--output", str(output), "--plot", str(plot)]
    )  # fmt: skip
    document = json.loads(output.read_text())
    groups = {4: 2, 8: 4}  # two frames per temporal patch
    for row in document["rows"]:
        frames = row["video_frames"]
        assert row["image_size"] == 32 and row["vision_patches"] == groups[frames] * 8 * 8  # 32 px in 4 px patches
        assert row["tokens"] == PRESETS["tiny"].inputs(32, frames=frames)["input_ids"].shape[1]
        assert row["tokens"] - groups[frames] * 4 * 4 == PRESETS["tiny"].inputs(32)["input_ids"].shape[1] - 4 * 4
        assert row["kept"] < row["tokens"] and row["vision_kept"] == row["vision_patches"] // (
            2 if row["vision_ratio"] else 1
        )
    assert {entry["video_frames"] for entry in document["latency"]} == {4, 8}
    assert "   8f eager" in capsys.readouterr().out and plot.stat().st_size > 0
    with pytest.raises(NotImplementedError, match="takes no video"):
        PRESETS["llava-1.5-7b"].inputs(336, frames=4)
    for flags, message in ((["--video-frames", "8,x"], "--video-frames must be comma-separated whole numbers"),
                           (["--video-frames", "7"], "video_frames must be distinct even counts")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli_main(["bench", "--preset", "tiny", "--image-size", "32", *flags, "--output", str(output)])
        assert message in capsys.readouterr().err


def test_bench_measures_every_decode_path(tmp_path):
    output = tmp_path / "bench.json"
    cli_main(
        ["bench", "--preset", "tiny", "--image-size", "48", "--ratios", "0,0.5", "--paths", "eager,static,graphs",
         "--repeats", "2", "--warmup", "1", "--new-tokens", "4", "--output", str(output)]
    )  # fmt: skip
    document = json.loads(output.read_text())
    assert [(row["path"], row["ratio"]) for row in document["rows"]] == [
        (path, ratio) for path in ("eager", "graphs") for ratio in (0, 0.5)
    ]  # transformers' static cache runs vanilla only
    latency = {(entry["path"], tuple(entry["variant"] or ())): entry for entry in document["latency"]}
    assert set(latency) == {
        ("eager", ()), ("eager", (0, 0, "dash")), ("eager", (0.5, 0, "dash")), ("static", ()),
        ("graphs", ()), ("graphs", (0, 0, "dash")), ("graphs", (0.5, 0, "dash")), ("unpadded", ()),
    }  # fmt: skip
    for entry in latency.values():
        assert entry["answer_ms"] > entry["ttft_ms"] > 0 and entry["decode_step_ms"] > 0
        assert entry["answer_speedup_vs_eager"] == pytest.approx(
            latency[("eager", ())]["answer_ms"] / entry["answer_ms"]
        )
        control = latency.get((entry["path"], (0, 0, "dash")))
        vanilla = latency[(entry["path"], ())]
        noisy = control is not None and any(abs(control[k] / vanilla[k] - 1) > 0.03 for k in ("prefill_ms", "ttft_ms"))
        assert entry["noisy"] == noisy
    assert latency[("eager", ())]["answer_speedup_vs_eager"] == 1
    assert document["graph_captures"] == {"graphs": 0, "unpadded": 0}  # on a CPU the graphs run uncaptured
    for row in document["rows"]:  # the graphs path's gains against vanilla graphs without bucket padding
        if row["path"] == "graphs":
            unpadded = latency[("unpadded", ())]
            assert row["vs_unpadded"]["ttft_ms"] == pytest.approx(unpadded["ttft_ms"] / row["dash"]["ttft_ms"])


def test_bench_sweeps_methods_with_one_noise_control(tmp_path):
    output = tmp_path / "bench.json"
    cli_main(
        ["bench", "--preset", "tiny", "--image-size", "48", "--ratios", "0,0.5", "--methods", "dash,random,layer_delta",
         "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--output", str(output)]
    )  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert [(row["method"], row["ratio"]) for row in rows] == [
        ("dash", 0), ("dash", 0.5), ("random", 0.5), ("layer_delta", 0.5)
    ]  # fmt: skip
    assert rows[1]["kept"] == rows[2]["kept"] == rows[3]["kept"] < rows[0]["kept"]  # as many halt, whatever the method


def test_ideal_speedup_formula():
    assert ideal_speedup(28, 11, 10.0, 10.0) == pytest.approx(1.0)
    assert ideal_speedup(28, 11, 10.0, 0.0) == pytest.approx(28 / 12)
    assert ideal_speedup(10, 3, 2.0, 1.0) == pytest.approx(20 / (8 + 6))
    assert ideal_speedup(10, 3, 2.0, 2.1) == pytest.approx(1.0)  # noise never makes the ideal a loss


def test_decoder_ideal_speedup_counts_each_layer_at_its_kinds_time():
    one_kind = ["attention"] * 10
    assert decoder_ideal_speedup(one_kind, 3, {"attention": 2.0}, {"attention": 1.0}) == ideal_speedup(10, 3, 2.0, 1.0)
    kinds = ["recurrent", "recurrent", "recurrent", "attention"] * 2  # Qwen3.5's layout, 8 layers
    full, kept = {"recurrent": 1.0, "attention": 3.0}, {"recurrent": 0.5, "attention": 1.0}
    # layers 0..3 at T: 3 + 3; layers 4..6 recurrent at K: 1.5; layer 7 attention at K: 1
    assert decoder_ideal_speedup(kinds, 3, full, kept) == pytest.approx(12 / (6 + 1.5 + 1))
    assert decoder_ideal_speedup(kinds, 3, full, {"recurrent": 1.2, "attention": 1.0}) == pytest.approx(12 / 10)


def test_bench_times_each_kind_of_layer_of_a_hybrid_decoder(tmp_path):
    """The tiny Qwen3.5 (recurrent layers 0, 2, 4; attention 1, 3): one layer of each kind timed at T and K, and the
    ideal from them."""
    output = tmp_path / "bench.json"
    cli_main(
        ["bench", "--preset", "tiny-qwen3.5", "--image-size", "64", "--ratios", "0,0.667", "--repeats", "2",
         "--warmup", "0", "--new-tokens", "3", "--batch-size", "2", "--output", str(output)]
    )  # fmt: skip
    document = json.loads(output.read_text())
    assert document["linear_attention_kernels"] == "torch"  # fla's kernels need a GPU
    rows = document["rows"]
    assert [row["ratio"] for row in rows] == [0, 0.667]
    for row in rows:
        layer_ms = row["layer_ms"]
        assert {kind: (figures["layers"], figures["deeper"]) for kind, figures in layer_ms.items()} == {
            "recurrent": (3, 1),  # the decision layer is 2 of 5
            "attention": (2, 1),
        }
        kinds = ["recurrent", "attention", "recurrent", "attention", "recurrent"]
        full = {kind: figures["T"] for kind, figures in layer_ms.items()}
        kept = {kind: figures["K"] for kind, figures in layer_ms.items()}
        assert row["ideal_decoder_speedup"] == pytest.approx(decoder_ideal_speedup(kinds, 2, full, kept))
    assert rows[1]["kept"] < rows[1]["tokens"] and rows[0]["ideal_decoder_speedup"] == pytest.approx(1)
    for paths in (["eager", "static"], ["graphs"]):
        with pytest.raises(ValueError, match="hybrid decoder, which runs on the 'eager' path only"):
            BenchConfig("tiny-qwen3.5", [64], [0.5], paths=paths)


@pytest.mark.parametrize(
    "preset, size, tokens",
    [
        ("qwen2-vl-7b", 448, 322),
        ("qwen2-vl-7b", 2016, 5250),
        ("qwen2.5-vl-7b", 1344, 2370),
        ("llava-1.5-7b", 448, 640),
        ("qwen3-vl-2b", 896, 850),
        ("qwen3-vl-8b", 1344, 1830),
        ("qwen3-vl-8b", 2016, 4035),
        ("qwen3-vl-30b-a3b", 1344, 1830),
        ("qwen3.5-9b", 1344, 1830),  # Qwen3-VL's processor and geometry
        ("qwen3.5-35b-a3b", 2016, 4035),
    ],
)
def test_presets_have_the_real_shapes(preset, size, tokens):
    """Token counts of DESIGN.md section 5; built on the meta device, so no weights are allocated."""
    model = PRESETS[preset].build("meta", torch.bfloat16)
    assert PRESETS[preset].inputs(size)["input_ids"].shape[1] == tokens
    assert adapter_for(model).vision_tower(model) is not None


@pytest.mark.parametrize(
    "preset, parameters, layers, deepstack, experts",
    [  # the parameters of the published checkpoints' safetensors (8B, 30B-A3B); the 2B's not cross-checked
        ("qwen3-vl-2b", None, 28, [5, 11, 17], 0),
        ("qwen3-vl-8b", 8_767_123_696, 36, [8, 16, 24], 0),
        ("qwen3-vl-30b-a3b", 31_070_754_032, 48, [8, 16, 24], 128),
    ],
)
def test_qwen3_vl_presets_are_the_published_models(preset, parameters, layers, deepstack, experts):
    """The whole parameter count, so every width is right; the press's defaults decide above DeepStack's layers and
    a 32-frame video lays its frame groups out as the processor does (a timestamp before each)."""
    model = PRESETS[preset].build("meta", torch.bfloat16)
    if parameters is not None:
        assert sum(p.numel() for p in model.parameters()) == parameters
    config = model.config
    assert config.text_config.num_hidden_layers == layers
    assert config.vision_config.deepstack_visual_indexes == deepstack
    assert getattr(config.text_config, "num_experts", 0) == experts
    DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5).check_model(config)
    video = PRESETS[preset].inputs(448, frames=32)
    groups = int((video["input_ids"] == config.vision_start_token_id).sum())
    assert groups == 16 and video["video_grid_thw"].tolist() == [[16, 28, 28]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="gpt-9"), "preset must be one of"),
        (dict(image_sizes=[]), "image_sizes"),
        (dict(ratios=[1.2]), "compression_ratio"),
        (dict(halting={"scope": "pixels"}), "scope"),
        (dict(new_tokens=1), "new_tokens"),
        (dict(repeats=0), "repeats"),
        (dict(device_map="balanced"), "device_map must be one of"),
        (dict(device="cpu", device_map="auto"), "device_map='auto' splits the model over several GPUs"),
        (dict(halting={"compression_ratio": 0.5}), "ratios sweeps it"),
        (dict(methods=["norm"]), "method must be one of"),
        (dict(halting={"method": "random"}), "methods sweeps it"),
        (dict(halting={"vision_compression_ratio": 0.5}), "vision_ratios sweeps it"),
        (dict(vision_ratios=[]), "vision_ratios must hold at least one value"),
        (dict(vision_ratios=[1.5]), "vision_compression_ratio must be a number in"),
        (dict(preset="llava-1.5-7b", vision_ratios=[0.5]), "preset 'llava-1.5-7b' is 'llava'"),
        (dict(paths=["eager", "compiled"]), "paths must be distinct entries of"),
        (dict(paths=[]), "paths must be distinct entries of"),
        (dict(preset="llava-1.5-7b", video_frames=[8]), "video_frames needs a model that takes video"),
        (dict(image_sizes=[32, 64], video_frames=[8]), "video_frames takes one frame side"),
        (dict(video_frames=[8, 5]), "video_frames must be distinct even counts >= 2"),
        (dict(video_frames=[8, 8]), "video_frames must be distinct even counts >= 2"),
    ],
)
def test_bad_bench_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**(dict(preset="tiny", image_sizes=[32], ratios=[0.5]) | kwargs))


def test_attention_timings_mark_settings_whose_control_is_off(tmp_path):
    output = tmp_path / "times.json"
    cli_main(["bench", "--measure", "attention", "--preset", "tiny", "--image-size", "48", "--device", "cpu",
              "--attention-settings", "sdpa,varlen_sdpa", "--repeats", "2", "--warmup", "1",
              "--output", str(output)])  # fmt: skip
    document = json.loads(output.read_text())
    rows = document["rows"]
    assert {(row["setting"], row["variant"]) for row in rows} == {
        (setting, variant)
        for setting in ("sdpa", "varlen_sdpa")
        for variant in ("vanilla", "control", "dash", "dash+vision")
    }
    for row in rows:
        assert row["noisy"] in (True, False) and len(row["runs"]) == 2
        assert row["prefill_ms"] == pytest.approx(statistics.median(run["prefill_ms"] for run in row["runs"]))
    assert document["variants"]["dash+vision"] == {"compression_ratio": 0.667, "vision_compression_ratio": 0.5}
    assert document["command"].startswith("dash-vlm bench --measure attention --preset tiny")


def test_attention_check_against_sdpa_at_the_swept_ratios(tmp_path):
    """The settings' check on CPU in float32: the packed tower computes what SDPA does, so every variant agrees; the
    ratios come from the sweep flags (their nonzero values)."""
    output = tmp_path / "check.json"
    cli_main(["bench", "--measure", "attention-check", "--preset", "tiny", "--image-size", "48", "--image-size", "56",
              "--attention-settings", "sdpa,varlen_sdpa", "--ratios", "0,0.5", "--vision-compression-ratios", "0.4",
              "--new-tokens", "3", "--device", "cpu", "--output", str(output)])  # fmt: skip
    document = json.loads(output.read_text())
    assert document["steps"] == 3
    assert [(row["variant"], row["setting"]) for row in document["rows"]] == [
        (variant, "varlen_sdpa") for variant in ("vanilla", "control", "dash", "dash+vision")
    ]
    for row in document["rows"]:
        assert row["max_relative_error"] < 1e-5 and row["greedy_agreement"] == 1.0
        assert ("halted_tokens_overlap" in row) == (row["variant"] != "vanilla")
        if row["variant"] != "vanilla":  # two samples, halting the same tokens and patches as under SDPA
            assert row["halted_tokens_overlap"] == row["halted_patches_overlap"] == [1.0, 1.0]


def test_host_syncs_count_every_variant(tmp_path, capsys):
    """On CPU the profiler records no CUDA call: every variant runs, nothing is counted; the variants are named after
    the swept ratios."""
    output = tmp_path / "syncs.json"
    cli_main(["bench", "--measure", "syncs", "--preset", "tiny", "--image-size", "48", "--device", "cpu",
              "--ratios", "0.5", "--output", str(output)])  # fmt: skip
    document = json.loads(output.read_text())
    assert (document["preset"], document["image_size"]) == ("tiny", 48)
    assert (document["vision_blocks"], document["decoder_layers"]) == (2, 5)
    assert list(document["counts"]) == ["vanilla", "decoder 0.5", "vision 0.5", "decoder 0.5 + vision 0.5"]
    for counts in document["counts"].values():
        assert counts == {"prefill": {}, "vision_tower": {}, "vision_tower_on_tables": {}}
    assert "command" not in document and "decoder 0.5 + vision 0.5" in capsys.readouterr().out


def test_token_timer_marks_every_generated_token():
    preset = PRESETS["tiny"]
    model = preset.build("cpu", torch.float32)
    inputs = batch_inputs(preset.inputs(48), 2, "cpu", torch.float32)
    timer = TokenTimer(torch.device("cpu"))
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, stopping_criteria=[timer])
    assert timer.timer.milliseconds() > 0
    assert len(timer.steps) == 4 and all(step.milliseconds() > 0 for step in timer.steps)


def test_split_check_verdict_on_the_published_two_gpu_runs():
    """``dash-vlm check split``'s verdict: the published H200 runs (of the script it replaced, same cases) pass; a
    statistic or a DASH decode step out of line fails."""
    from dash_vlm.checks.split import judge
    from dash_vlm.resources import bundled

    for name in ("two_gpu.json", "two_gpu-run3.json", "two_gpu-run2.json"):
        document = json.loads((bundled("assets") / "bench" / "two-gpu" / name).read_text())
        for result in document["results"]:
            assert all(failures == [] for failures in judge(result["cases"]).values())
    cases = document["results"][0]["cases"]
    cases["ratio 0.667, batch 1"]["split_against_one_gpu"]["same_statistics"] = False
    cases["ratio 0.667, padded batch 3"]["split_against_one_gpu"]["max_logits_relative_error_while_agreeing"] = 1
    failures = {name: found for name, found in judge(cases).items() if found}
    assert failures == {
        "ratio 0.667, batch 1": ["statistics differ"],
        "ratio 0.667, padded batch 3": ["decode logits differ beyond the noise floor (2.07%)"],
    }


@pytest.mark.parametrize(
    "preset, layers, hidden, experts", [("qwen3.5-9b", 32, 4096, 0), ("qwen3.5-35b-a3b", 40, 2048, 256)]
)
def test_qwen3_5_presets_are_hybrid_as_published(preset, layers, hidden, experts):
    """Every fourth layer attention, the rest Gated DeltaNet; the press's default decision layer (12 of 32, 16 of 40)
    lies above the first attention layer (3) and is itself a recurrent layer in both."""
    model = PRESETS[preset].build("meta", torch.bfloat16)
    config = model.config.text_config
    assert (config.num_hidden_layers, config.hidden_size, getattr(config, "num_experts", 0)) == (
        layers,
        hidden,
        experts,
    )
    recurrent = adapter_for(model).recurrent_layers(model.config)
    assert sorted(set(range(layers)) - recurrent) == list(range(3, layers, 4))
    decision = DeltaPress().decision_layer(layers)
    assert decision in recurrent and decision > 3
    DeltaPress().check_model(model.config)
