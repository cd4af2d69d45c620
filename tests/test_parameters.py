"""One source for the halting parameters: every DeltaPress field reaches every entry point by its own name."""

from __future__ import annotations

import dataclasses

import pytest

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.cli import main as cli_main
from dash_vlm.shapes.evaluate import model_folder

# A value other than the default for every field; the first test fails when a field is added without one.
NON_DEFAULT = {
    "compression_ratio": 0.5,
    "start_ratio": 0.6,
    "scope": "all",
    "selection": "per_row",
    "protect_last": 2,
    "protect_first": 1,
    "method": "random",
    "seed": 7,
    "fastv_layer": 3,
    "vision_compression_ratio": 0.5,
    "vision_start_ratio": 0.4,
    "prefill_chunk": 4096,
}
QWEN = model_folder("qwen2-vl")


def halting_of(press: DeltaPress) -> dict:
    return {name: getattr(press, name) for name in DeltaPress.parameter_names()}


def flags(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in ("--" + name.replace("_", "-"), str(value))]


class Captured(Exception):
    """Stops an entry point once it has built what the test inspects."""


def test_every_field_has_a_non_default_test_value():
    names = DeltaPress.parameter_names()
    assert set(NON_DEFAULT) == set(names)
    defaults = DeltaPress()
    assert all(getattr(defaults, name) != value for name, value in NON_DEFAULT.items())
    assert names == tuple(field.name for field in dataclasses.fields(DeltaPress) if field.init)


def test_press_from_options_converts_text_and_names_bad_input():
    assert halting_of(DeltaPress.from_options(**{k: str(v) for k, v in NON_DEFAULT.items()})) == NON_DEFAULT
    assert halting_of(DeltaPress.from_options(**NON_DEFAULT)) == NON_DEFAULT
    with pytest.raises(ValueError, match="unknown halting parameters \\['ratio'\\]"):
        DeltaPress.from_options(ratio=0.5)
    with pytest.raises(ValueError, match="seed must be given as int, got 'seven'"):
        DeltaPress.from_options(seed="seven")
    with pytest.raises(ValueError, match="protect_last must be an integer >= 1"):
        DeltaPress.from_options(protect_last="0")


def test_dashvlm_from_pretrained_takes_every_field():
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", **NON_DEFAULT)
    assert halting_of(vlm.press) == NON_DEFAULT
    press = DeltaPress(**NON_DEFAULT)
    assert DashVLM.from_pretrained(QWEN, device_map="cpu", press=press).press is press
    with pytest.raises(ValueError, match="either press or halting parameters"):
        DashVLM.from_pretrained(QWEN, press=press, seed=3)


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_command_line_takes_every_field(monkeypatch, command):
    seen = {}

    def capture(*args, press=None, **kwargs):
        seen["press"] = press if press is not None else args[0]
        raise Captured

    if command == "generate":
        monkeypatch.setattr(DashVLM, "from_pretrained", capture)
        argv = ["generate", "--model", str(QWEN), "--prompt", "what colour", *flags(NON_DEFAULT)]
    else:
        monkeypatch.setattr("dash_vlm.cli.run_demo", capture)
        argv = ["demo", *flags(NON_DEFAULT)]
    with pytest.raises(Captured):
        cli_main(argv)
    assert halting_of(seen["press"]) == NON_DEFAULT


def test_command_line_short_forms_and_errors(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("dash_vlm.cli.run_demo", lambda press, halting_map: seen.setdefault("press", press))
    cli_main(["demo", "--ratio", "0.25"])
    assert seen["press"].compression_ratio == 0.25
    with pytest.raises(SystemExit):
        cli_main(["demo", "--method", "norm"])
    assert "method must be one of" in capsys.readouterr().err


def test_bench_takes_every_field(monkeypatch):
    seen = {}
    monkeypatch.setattr("dash_vlm.bench.main", lambda config, output, plot: seen.setdefault("config", config))
    swept = ("compression_ratio", "vision_compression_ratio", "method")
    others = {name: value for name, value in NON_DEFAULT.items() if name not in swept}
    argv = ["bench", "--preset", "tiny", "--image-size", "48", "--output", "unused.json", *flags(others)]
    cli_main([*argv, "--compression-ratios", "0,0.5", "--vision-compression-ratios", "0,0.5", "--methods", "random"])
    config = seen.pop("config")
    assert config.ratios == config.vision_ratios == [0.0, 0.5] and config.halting == others
    assert config.methods == ["random"]
    assert halting_of(config.press((0.5, 0.5, "random"))) == NON_DEFAULT
    cli_main([*argv, "--ratios", "0.3"])  # the short form
    assert seen["config"].ratios == [0.3]


def test_lmms_eval_model_args_take_every_field():
    from dash_vlm.lmms.models import DashQwen2VL

    # lmms-eval hands model args over as text or as the values its parser made of them
    for values in ({name: str(value) for name, value in NON_DEFAULT.items()}, NON_DEFAULT):
        lmm = DashQwen2VL(pretrained=str(QWEN), device_map="cpu", **values)
        assert halting_of(lmm.vlm.press) == NON_DEFAULT
    assert lmm.device == lmm.accelerator.device  # where lmms-eval gathers request counts with several processes
    with pytest.raises(ValueError, match="unknown model args \\['ratio'\\]"):
        DashQwen2VL(pretrained=str(QWEN), device_map="cpu", ratio=0.5)
