"""dash-shapes: the committed test split against its generator, the bundled checkpoints' accuracy, and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.cli import main as cli_main
from dash_vlm.models import adapter_for, model_types_with
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.resources import bundled
from dash_vlm.shapes import evaluate, video
from dash_vlm.shapes.data import (
    KINDS,
    TEST_FILE,
    WORDS,
    held_out_keys,
    read_test_split,
    sample_key,
    split_samples,
    training_scene,
)
from dash_vlm.shapes.evaluate import (
    MODELS,
    answer_all,
    bundled_models,
    configurations,
    markdown_tables,
    method_configurations,
    model_adapter,
    model_folder,
    score,
    video_configurations,
)
from dash_vlm.shapes.train import ARCHITECTURE, ChatFormat, ShapesStream, conversation, training_batch, visual_inputs

RESULTS = bundled("assets") / "dash_shapes_accuracy.json"
FAMILIES = ["qwen2_vl", "llava", "qwen3_vl"]  # the families of MODELS (bundled or to be trained)


@pytest.fixture(scope="module")
def test_split():
    return read_test_split()


def test_committed_split_equals_generator(test_split):
    assert TEST_FILE.stat().st_size <= 5 * 2**20 and len(test_split) <= 1000
    for index, (stored, generated) in enumerate(zip(test_split, split_samples("test"), strict=True)):
        assert (stored.question, stored.answer, stored.kind) == (generated.question, generated.answer, generated.kind)
        assert np.array_equal(np.asarray(stored.image), np.asarray(generated.image)), index
    assert {sample.kind for sample in test_split} == set(KINDS)


def test_splits_are_disjoint():
    test = {sample_key(s.image, s.question) for s in split_samples("test", 1000)}
    validation = {sample_key(s.image, s.question) for s in split_samples("validation", 1000)}
    assert len(test) > 990 and len(validation) > 990 and not test & validation
    held_out = held_out_keys()
    assert held_out == test | validation
    raw, kept = set(), set()
    for index in range(3000):
        image, turns = training_scene(index)
        raw |= {sample_key(image, question) for question, _ in turns}
        image, turns = training_scene(index, held_out)
        kept |= {sample_key(image, question) for question, _ in turns}
    assert raw & held_out  # small scenes repeat: the filter is needed ...
    assert not kept & held_out  # ... and it works


def test_bundled_models_are_the_checkpoints_there():
    """The evaluation's default models are the folders of ``MODELS`` that hold a checkpoint: Qwen2-VL and LLaVA at
    least, any other (Qwen3-VL, before it is trained) only once it is there."""
    assert bundled_models()[:2] == ["qwen2-vl", "llava"]
    assert bundled_models() == [name for name in MODELS if (model_folder(name) / "model.safetensors").is_file()]


def test_images_give_at_least_64_tokens(test_split):
    for name in bundled_models():
        vlm = DashVLM.from_pretrained(model_folder(name))
        stats = vlm.generate(image=test_split[0].image, prompt=test_split[0].question, max_new_tokens=1).stats
        assert stats.eligible >= 64


def test_checkpoint_files_and_cards():
    for name in bundled_models():
        folder = model_folder(name)
        assert all(path.stat().st_size <= 15 * 2**20 for path in folder.iterdir())
        assert (folder / "README.md").read_text().count("Test accuracy") == 1


@pytest.mark.parametrize("name", bundled_models())
def test_accuracy_matches_the_published_results(test_split, name):
    """Ratio 0 and DASH at 0.667 on the whole test split reproduce BENCHMARKS.md (any regression in loading,
    prompting, positions or halting moves them)."""
    published = json.loads(RESULTS.read_text())
    vlm = DashVLM.from_pretrained(model_folder(name))
    checks = [
        dict(compression_ratio=0.0, scope="vision"),
        dict(compression_ratio=0.667, scope="vision"),
        dict(compression_ratio=0.667, scope="all", method="random"),
    ]
    checks.append(dict(compression_ratio=0.667, scope="vision", selection="per_row"))
    if model_adapter(name).halts_in_vision_tower:  # halting inside the vision tower too
        checks.append(dict(compression_ratio=0.667, scope="vision", vision_compression_ratio=0.5))
    for parameters in checks:
        vlm.press = press = DeltaPress(**parameters)
        texts, _ = answer_all(vlm, test_split, batch_size=250)
        measured = score(texts, test_split)
        key = (name, press.compression_ratio, press.method, press.vision_compression_ratio, press.selection)
        row = next(
            r
            for r in published
            if (r["model"], r["ratio"], r["method"], r["vision_ratio"], r["selection"]) == key
            and (press.compression_ratio == 0 or r["scope"] == press.scope)
        )
        assert measured["accuracy"] == pytest.approx(row["accuracy"], abs=0.005), parameters
        for kind, value in measured["by_kind"].items():
            assert value == pytest.approx(row["by_kind"][kind], abs=0.02), (parameters, kind)
    assert next(r for r in published if r["model"] == name and r["ratio"] == 0)["accuracy"] > 0.7


@pytest.mark.parametrize("name", bundled_models())
def test_methods_comparison_matches_the_published_results(test_split, name):
    """FastV and layer_delta at 0.667 on the whole test split reproduce the methods comparison of BENCHMARKS.md."""
    published = json.loads((bundled("assets") / "bench" / "methods" / "dash-shapes-methods.json").read_text())
    vlm = DashVLM.from_pretrained(model_folder(name))
    for method in ("fastv", "layer_delta"):
        vlm.press = DeltaPress(compression_ratio=0.667, scope="vision", method=method)
        texts, _ = answer_all(vlm, test_split, batch_size=250)
        row = next(r for r in published if (r["model"], r["ratio"], r["method"]) == (name, 0.667, method))
        assert score(texts, test_split)["accuracy"] == pytest.approx(row["accuracy"], abs=0.005), method


def test_vision_rows_only_where_the_tower_halts():
    assert not any("vision_compression_ratio" in c for c in configurations(vision_tower_halts=False))
    vision = [c for c in configurations(vision_tower_halts=True) if "vision_compression_ratio" in c]
    assert sorted((c["method"], c["compression_ratio"], c["vision_compression_ratio"]) for c in vision) == [
        (method, ratio, vision_ratio)
        for method in ("dash", "random")
        for ratio in (0, 0.667)
        for vision_ratio in (0.3, 0.5)
    ]
    rows = json.loads(RESULTS.read_text())
    models = list(dict.fromkeys(row["model"] for row in rows))
    tables = markdown_tables(rows)
    assert {"qwen2-vl", "llava"} <= set(models)
    halting = [name for name in models if model_adapter(name).halts_in_vision_tower]  # Qwen2-VL (and Qwen3-VL)
    assert "qwen2-vl" in halting and "llava" not in halting
    assert tables.count("halting inside the vision tower") == len(halting)
    assert "| dash | 0.667 | **all** | 84.4% | 83.2% | 80.8% |" in tables
    assert tables.count('`selection="per_row"`') == len(models)  # every checkpoint, position questions split by axis
    assert tables.count("| per_row | dash | above/below |") == len(models)


def test_demo(capsys, tmp_path):
    cli_main(["demo", "--ratio", "0.5", "--halting-map", str(tmp_path / "map.png")])
    output = capsys.readouterr().out
    demo = json.loads((bundled("assets") / "demo" / "shapes.json").read_text())
    for item in demo["questions"]:
        assert item["question"] in output
    assert "vanilla" in output and "DASH 0.5" in output and "prefill ms" in output
    assert f"halting map of the first question (halted tokens shaded): {tmp_path / 'map.png'}" in output
    with Image.open(tmp_path / "map.png") as picture:  # the 64 px scene, scaled by whole pixels to 256 rows
        assert picture.size == (256, 256)


@pytest.mark.parametrize("family", FAMILIES)
def test_host_training_inputs_leave_the_training_loss_unchanged(family):
    model, processor = tiny_checkpoint(family, WORDS, seed=0, vision_layers=1, vision_width=32, image_side=64)
    processor.tokenizer.padding_side = "left"
    stream = ShapesStream(processor, model.config, batch_size=3, exclude=set())
    batch, host_keys = next(iter(stream))
    reference = training_batch(ChatFormat(processor, family), range(3), set())
    assert batch["attention_mask"].min() == 0  # scenes of different lengths: the positions must skip the padding
    with torch.no_grad():
        output, expected = model(**batch), model(**reference)
    torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss, expected.loss, rtol=0, atol=1e-6)
    if family != "llava":  # M-RoPE: positions computed on the host
        assert host_keys == ("image_grid_thw",)
        assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
        shifted = batch["position_ids"].roll(1, dims=-1)  # the check above sees wrong positions
        with torch.no_grad():
            assert (model(**{**batch, "position_ids": shifted}).logits - output.logits).abs().max() > 1e-3
    else:
        assert host_keys == () and batch.keys() == reference.keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_sees_the_generation_inputs(test_split, family):
    """A training sequence's first turn is the prompt, pixels and grid that ``DashVLM.generate`` gives the same
    question; the answer word and the end of turn follow."""
    model, processor = tiny_checkpoint(family, WORDS, seed=0, vision_layers=1, vision_width=32, image_side=64)
    sample = test_split[0]
    chat = ChatFormat(processor, family)
    text = chat.text(sample.image, [(sample.question, sample.answer)])
    trained = processor(text=[text], **visual_inputs(chat.adapter, processor, [sample.image]), return_tensors="pt")
    asked = adapter_for(family).processor_inputs(processor, [conversation(sample.image, sample.question)])
    prompt = asked["input_ids"].shape[1]
    assert trained["input_ids"].shape[1] == prompt + 2
    assert torch.equal(trained["input_ids"][:, :prompt], asked["input_ids"])
    answer = processor.tokenizer.convert_ids_to_tokens(trained["input_ids"][0, prompt:].tolist())
    assert answer == [sample.answer, processor.tokenizer.eos_token]
    assert trained.keys() == asked.keys()
    for key in trained.keys() - {"input_ids", "attention_mask"}:
        assert torch.equal(trained[key], asked[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_dash_shapes_architecture_takes_every_evaluated_press(family):
    """The dash-shapes checkpoint of every family accepts every configuration the evaluation runs: Qwen3-VL's one
    DeepStack tap is added after decoder layer 0, below every method's decision layer (DASH's 3 of 8)."""
    model, _ = tiny_checkpoint(family, WORDS, seed=0, **ARCHITECTURE)
    adapter = adapter_for(family)
    halts = adapter.halts_in_vision_tower
    plans = configurations(halts) + method_configurations(halts)
    plans += video_configurations(halts) if family in model_types_with("video") else []
    for parameters in plans:
        DeltaPress(**parameters).check_model(model.config)
    assert DeltaPress().decision_layer(adapter.decoder_depth(model.config)) == 3
    assert adapter.first_decision_layer(model.config) == (1 if family == "qwen3_vl" else 0)


@pytest.fixture
def tiny_qwen3_bundle(tmp_path, monkeypatch):
    """A models folder holding only an untrained tiny ``dash-shapes-qwen3-vl`` (image and video words)."""
    model, processor = tiny_checkpoint("qwen3_vl", [*WORDS, *video.WORDS], seed=0)
    model.save_pretrained(tmp_path / MODELS["qwen3-vl"])
    processor.save_pretrained(tmp_path / MODELS["qwen3-vl"])
    monkeypatch.setattr(evaluate, "MODELS_FOLDER", tmp_path)
    return tmp_path


def test_evaluation_takes_a_qwen3_checkpoint(tiny_qwen3_bundle, tmp_path, capsys):
    """Once its folder holds a checkpoint, Qwen3-VL is evaluated like the others, vision-tower rows included; a
    named checkpoint that is not there is a usage error."""
    assert bundled_models() == ["qwen3-vl"]
    with pytest.raises(SystemExit):
        evaluate.main(["--models", "llava", "--output", str(tmp_path / "rows.json")])
    assert "no checkpoint in" in capsys.readouterr().err
    stage = {"arguments": {"family": "qwen3_vl", "output": "OUT"}, "device": "cpu", "seconds": 1, "steps": 0}
    (model_folder("qwen3-vl") / "training.json").write_text(json.dumps({"stages": [stage | {"history": []}]}))
    # the first 20 questions hold every kind and both position axes, as the tables need
    argv = ["--limit", "20", "--batch-size", "20", "--model-cards", "--output", str(tmp_path / "rows.json")]
    evaluate.main(argv)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["model"] for row in rows} == {"qwen3-vl"} and len(rows) == len(configurations(True))
    tables = capsys.readouterr().out
    assert "**qwen3-vl** (ratio 0:" in tables and tables.count("halting inside the vision tower") == 1
    card = (model_folder("qwen3-vl") / "README.md").read_text()
    assert card.startswith("# dash-shapes-qwen3-vl") and card.count("Test accuracy") == 1
    assert "Qwen3VLForConditionalGeneration" in card and '"deepstack_visual_indexes": [1]' in card
