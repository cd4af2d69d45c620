"""``dash-vlm check``: each check on the tiny preset and on a bundled checkpoint (CPU, uncaptured), a verdict that can
fail, and command-line mistakes as usage errors before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import QWEN, usage_error

from dash_vlm.checks import graphs
from dash_vlm.cli import main as cli_main
from dash_vlm.graphs import StaticDecoder
from dash_vlm.resources import bundled
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
        (["--model", QWEN], "check --model needs --image"),
        (["--model", QWEN, "--image", SHAPES_IMAGE, "--image-size", "448"], "--image-size goes with --preset"),
        (["--preset", "tiny", "--image", SHAPES_IMAGE], "--image goes with --model"),
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


def test_relative_error_is_the_packages():
    """tests/reference.py takes the package's ``relative_error``: the checks and the tests measure alike."""
    from reference import relative_error

    from dash_vlm.checks import relative_error as package_relative_error

    assert relative_error is package_relative_error
    assert relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


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
