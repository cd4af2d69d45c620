"""``dash-vlm check``: each check on the tiny preset and on a bundled checkpoint (CPU, uncaptured), a verdict that can
fail, and command-line mistakes as usage errors before any model loads."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from test_cli_errors import QWEN, usage_error

from dash_vlm import DeltaPress
from dash_vlm.checks import bf16, graphs, leaks, split
from dash_vlm.cli import main as cli_main
from dash_vlm.graphs import StaticDecoder
from dash_vlm.resources import bundled
from dash_vlm.scorers import DashScorer
from dash_vlm.vlm import DashVLM

SHAPES_IMAGE = str(bundled("assets") / "demo" / "shapes.png")
TINY = ["check", "graphs", "--preset", "tiny", "--image-size", "48", "--steps", "3", "--repeats", "2", "--device",
        "cpu"]  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    """Loading a checkpoint or building a preset fails the test: a usage error must come first."""
    monkeypatch.setattr(DashVLM, "from_pretrained", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    monkeypatch.setattr("dash_vlm.checks.preset_subject", lambda *args: pytest.fail("a preset was built"))


def test_graphs_check_passes_on_the_tiny_preset(tmp_path, capsys):
    output = tmp_path / "graphs.json"
    cli_main([*TINY, "--batch-sizes", "1,2", "--output", str(output)])
    document = json.loads(output.read_text())
    assert document["passed"] and document["subject"] == "tiny, 48 px"
    names = [f"{case}, batch {size}" for size in (1, 2) for case in ("vanilla", graphs.CONTROL, "press")]
    assert list(document["cases"]) == names
    for case in document["cases"].values():
        assert case["verdict"] == "PASS" and len(case["runs"]["graphs"]) == 2
        assert case["teacher_forced"]["max_logits_relative_error"] <= graphs.FULL_TOLERANCE
    assert set(document["noisy"]) == {"1", "2"}
    assert "graphs on tiny, 48 px: PASS" in capsys.readouterr().out


def test_graphs_check_fails_a_broken_fast_path(tmp_path, monkeypatch, capsys):
    """A prefill whose logits are off: every case fails, and the command exits with status 1."""
    prefill = StaticDecoder.prefill

    def off_by_one(self, inputs, press):
        cache, logits, positions = prefill(self, inputs, press)
        return cache, logits + 1.0, positions

    monkeypatch.setattr(StaticDecoder, "prefill", off_by_one)
    output = tmp_path / "graphs.json"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*TINY, "--output", str(output)])
    assert exit_info.value.code == 1
    document = json.loads(output.read_text())
    assert not document["passed"] and {case["verdict"] for case in document["cases"].values()} == {"FAIL"}
    assert "FAIL" in capsys.readouterr().out


def test_graphs_check_on_a_checkpoint_with_the_users_image(tmp_path):
    output = tmp_path / "graphs.json"
    argv = ["check", "graphs", "--model", QWEN, "--image", SHAPES_IMAGE, "--prompt", "what colour is the circle?",
            "--steps", "3", "--repeats", "1", "--device", "cpu", "--output", str(output)]  # fmt: skip
    cli_main(argv)
    document = json.loads(output.read_text())
    assert document["passed"] and document["subject"].endswith("shapes.png")
    press = document["cases"]["press, batch 1"]
    assert press["teacher_forced"]["greedy_agreement"] == 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", QWEN], "a check of a model needs one of image and video"),
        (["--model", QWEN, "--image", SHAPES_IMAGE, "--video", SHAPES_IMAGE], "needs one of image and video"),
        (["--model", QWEN, "--image", SHAPES_IMAGE, "--image-size", "448"], "image_size goes with a preset"),
        (["--model", QWEN, "--image", SHAPES_IMAGE, "--layers", "2"], "layers goes with a preset"),
        (["--preset", "tiny", "--image", SHAPES_IMAGE], "image and video go with a model"),
        (["--preset", "tiny", "--calls", "5"], "calls does not apply to check graphs"),
        (["--preset", "tiny", "--cuda-graphs"], "cuda_graphs does not apply to check graphs"),
        (["--preset", "tiny", "--batch-sizes", "1,0"], "--batch-sizes must be comma-separated whole numbers >= 1"),
        (["--preset", "tiny", "--batch-sizes", "one"], "--batch-sizes must be"),
        (["--model", QWEN, "--image", "missing.png"], "--image"),
        (["--model", QWEN, "--image", SHAPES_IMAGE, "--prompt", " "], "--prompt is empty"),
        (["--preset", "tiny", "--steps", "1"], "--steps"),
        (["--preset", "tiny", "--device", "tpu"], "--device must be one of"),
        (["--preset", "tiny", "--compression-ratio", "1.5"], "compression_ratio"),
        (["--preset", "tiny", "--model", QWEN], "not allowed with argument"),
        ([], "one of the arguments --preset --model is required"),
        (["--preset", "tiny-qwen3.5"], "a hybrid decoder, which the fast path does not run"),
    ],
)
def test_check_mistakes_are_usage_errors_before_any_model_loads(
    tmp_path, no_model, monkeypatch, capsys, extra, message
):
    line = usage_error(["check", "graphs", *extra, "--output", str(tmp_path / "out.json")], capsys)
    assert message in line


def test_check_output_is_checked_before_any_model_loads(tmp_path, no_model, capsys):
    line = usage_error(
        ["check", "graphs", "--preset", "tiny", "--output", str(tmp_path / "missing" / "o.json")], capsys
    )
    assert "--output" in line


def test_graphs_check_applies_the_checkpoints_repetition_penalty_on_both_sides():
    """Qwen2-VL's instruct checkpoints set a repetition penalty: the fast path applies it, so the eager reference's
    logits are compared after it too, and the check passes."""
    from dash_vlm.checks import Subject
    from dash_vlm.models import adapter_for

    adapter = adapter_for("qwen2_vl")
    model = adapter.tiny_model("qwen2_vl")
    model.generation_config.repetition_penalty = 1.3
    sample = adapter.tiny_inputs("qwen2_vl")["image"]
    subject = Subject("tiny qwen2_vl, penalty 1.3", model, lambda batch: sample)
    document = graphs.run(subject, graphs.DeltaPress(compression_ratio=0.5), [1], steps=4, repeats=1)
    assert document["passed"], {name: case["teacher_forced"] for name, case in document["cases"].items()}
    # the reference's penalty: positive logits divided by it, for the prompt's tokens and those generated before
    prompt, generated = torch.tensor([[0]]), torch.tensor([[1, 2]])
    steps = graphs.penalized(model, prompt, generated, (torch.ones(1, 4), torch.ones(1, 4)))
    assert torch.allclose(steps[0], torch.tensor([[1 / 1.3, 1, 1, 1]]))
    assert torch.allclose(steps[1], torch.tensor([[1 / 1.3, 1 / 1.3, 1, 1]]))


BF16 = ["check", "bf16", "--preset", "tiny", "--image-size", "48", "--steps", "4", "--device", "cpu"]


def test_bf16_check_passes_on_the_tiny_preset(tmp_path, capsys):
    output = tmp_path / "bf16.json"
    cli_main([*BF16, "--batch-sizes", "1,2", "--vision-compression-ratio", "0.5", "--output", str(output)])
    document = json.loads(output.read_text())
    assert document["passed"] and document["dtype"] == "float32"
    names = [f"{case}, batch {size}" for size in (1, 2) for case in (bf16.CONTROL, bf16.PRESS)]
    assert list(document["cases"]) == names
    press = document["cases"][f"{bf16.PRESS}, batch 2"]
    assert press["same_halted_tokens"] and press["same_halted_patch_count"]
    assert all(kept < tokens for kept, tokens in zip(press["kept"], press["tokens"], strict=True))
    assert press["max_logits_relative_error_while_agreeing"] <= graphs.FULL_TOLERANCE
    assert "bf16 on tiny, 48 px: PASS" in capsys.readouterr().out


def test_bf16_check_fails_a_press_that_halts_the_wrong_tokens(tmp_path, monkeypatch, capsys):
    """A DASH score turned upside down (the highest-scoring tokens halt): the press leaves the reference."""
    score = DashScorer.score
    monkeypatch.setattr(DashScorer, "score", lambda self, reading: -score(self, reading))
    output = tmp_path / "bf16.json"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*BF16, "--output", str(output)])
    assert exit_info.value.code == 1
    cases = json.loads(output.read_text())["cases"]
    assert cases[f"{bf16.CONTROL}, batch 1"]["verdict"] == "PASS"
    assert cases[f"{bf16.PRESS}, batch 1"]["verdict"] == "FAIL"
    assert not cases[f"{bf16.PRESS}, batch 1"]["same_halted_tokens"]


def test_split_check_on_a_cpu_judges_every_case(tmp_path, monkeypatch):
    """On a CPU (device_map="auto" keeps the model whole): every comparison passes and the placement fails; a split
    load whose statistics are off fails its cases."""
    folder = split.save_preset("tiny", tmp_path, "cpu")
    requests = split.preset_requests(48, dynamic_resolution=True)
    press = DeltaPress(compression_ratio=0.5)
    document = split.run(folder, "tiny", press, requests, 3, one_device="cpu")
    cases = document["cases"]
    assert set(cases) == {split.PLACEMENT, *(f"{v}, {r}" for v in ("ratio 0", "press") for r in requests)}
    assert cases[split.PLACEMENT] | {"verdict": "FAIL", "devices_split": ["cpu"]} == cases[split.PLACEMENT]
    assert all(case["verdict"] == "PASS" for name, case in cases.items() if name != split.PLACEMENT)
    assert cases["press, padded batch 3"]["kept"] < cases["ratio 0, padded batch 3"]["kept"]

    answer = split.load_and_answer

    def off_when_split(source, device_map, *args):
        outcome, devices, dtype = answer(source, device_map, *args)
        if device_map == "auto":
            for case in outcome.values():
                case["stats"][0]["kept"] += 1
        return outcome, devices, dtype

    monkeypatch.setattr(split, "load_and_answer", off_when_split)
    cases = split.run(folder, "tiny", press, requests, 3, one_device="cpu")["cases"]
    assert all("statistics differ" in case["failures"] for name, case in cases.items() if name != split.PLACEMENT)


def test_split_check_needs_two_gpus(tmp_path, no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = usage_error(["check", "split", "--preset", "tiny", "--output", str(tmp_path / "o.json")], capsys)
    assert "check split needs two GPUs" in line


LEAKS = ["check", "leaks", "--preset", "tiny", "--image-size", "48", "--steps", "3", "--calls", "4", "--device", "cpu"]


def test_leaks_check_passes_on_the_tiny_preset(tmp_path, capsys):
    output = tmp_path / "leaks.json"
    cli_main([*LEAKS, "--vision-compression-ratio", "0.5", "--output", str(output)])
    document = json.loads(output.read_text())
    assert document["passed"] and set(document["cases"]) == {"hooks", "halted caches", "tensors", "python memory"}
    assert document["cases"]["halted caches"]["value"] == 0
    assert "leaks on tiny, 48 px: PASS" in capsys.readouterr().out


def test_leaks_check_fails_a_press_that_leaves_a_hook(tmp_path, monkeypatch):
    """A press whose prefill leaves one forward hook on the model per call, each holding a tensor."""
    prefill = DeltaPress.__call__

    @contextmanager
    def leaving_a_hook(self, model):
        kept = torch.zeros(4)

        def hook(*args) -> None:
            kept.add_(1)

        model.register_forward_hook(hook)
        with prefill(self, model) as result:
            yield result

    monkeypatch.setattr(DeltaPress, "__call__", leaving_a_hook)
    output = tmp_path / "leaks.json"
    with pytest.raises(SystemExit):
        cli_main([*LEAKS, "--output", str(output)])
    cases = json.loads(output.read_text())["cases"]
    assert cases["hooks"]["verdict"] == "FAIL" and cases["tensors"]["verdict"] == "FAIL"
    assert cases["hooks"]["value"] - cases["hooks"]["bound"] == 4 + leaks.WARMUP  # one per generate call


def test_masked_reference_shares_no_code_with_the_press():
    """The reference the checks and the tests hold the press to imports nothing of dash_vlm: no plan, no selection,
    no gather of its own."""
    import ast
    import inspect

    from dash_vlm.checks import reference

    tree = ast.parse(inspect.getsource(reference))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "math", "contextlib", "torch"}
    foreign = [
        name
        for name, value in vars(reference).items()
        if getattr(value, "__module__", "").startswith("dash_vlm") and value.__module__ != reference.__name__
    ]
    assert foreign == []


def test_shortened_preset_is_checked_before_any_model_loads(tmp_path, no_model, capsys):
    """--layers shortens the model the press is checked against: a one-layer decoder leaves no decision layer."""
    line = usage_error([*BF16, "--layers", "1", "--output", str(tmp_path / "o.json")], capsys)
    assert "start_ratio" in line
