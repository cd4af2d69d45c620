"""Moving dash-shapes: the committed clips against the generator, the answers against what the frames show, the
training batches of clips (every family that takes video), and the bundled Qwen2-VL checkpoint's published video
accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.lmms.tasks import DashShapesVideoTask
from dash_vlm.models import adapter_for
from dash_vlm.models.qwen3_vl import TIMESTAMP_WORDS
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.shapes import evaluate, video
from dash_vlm.shapes.data import BACKGROUND, COLOURS, WORDS
from dash_vlm.shapes.evaluate import (
    MODELS,
    VIDEO_RESULTS,
    answer_all,
    generate_all,
    halted_by_content,
    is_global,
    model_folder,
    score,
    video_configurations,
    video_table,
)
from dash_vlm.shapes.train import (
    ChatFormat,
    answer_words,
    carry_embeddings,
    is_clip_batch,
    train,
    training_batch,
    visual_inputs,
)
from dash_vlm.shapes.train import main as train_main

QWEN = model_folder("qwen2-vl")
VIDEO_FAMILIES = ["qwen2_vl", "qwen3_vl"]  # the video families of the dash-shapes checkpoints


@pytest.fixture(scope="module")
def test_clips():
    return video.read_test_split()


def test_committed_clips_are_the_generator_decoded_exactly(test_clips):
    generated = video.split_clips("test")
    assert len(test_clips) == len(generated) == video.TEST_SIZE
    for read, made in zip(test_clips, generated, strict=True):
        assert (read.question, read.answer, read.kind) == (made.question, made.answer, made.kind)
        assert len(read.frames) == video.FRAMES
        assert np.array_equal(video.frames_array(read.frames), video.frames_array(made.frames))  # lossless
    size = sum(path.stat().st_size for path in video.TASK_FOLDER.rglob("*") if path.is_file())
    assert size <= 5 * 2**20
    assert {clip.kind for clip in test_clips} == set(video.KINDS)


def test_splits_are_disjoint_and_training_skips_them():
    keys = {split: {video.clip_key(c.frames, c.question) for c in video.split_clips(split)} for split in
            ("test", "validation")}  # fmt: skip
    assert not keys["test"] & keys["validation"]
    frames, turns = video.training_clip(7)
    held_out = {video.clip_key(frames, turns[0][0])}
    assert [qa for qa in video.training_clip(7, held_out)[1]] == turns[1:]


def colour_track(frames, colour: str) -> list[tuple[float, float] | None]:
    """Per frame, the centre of the pixels of exactly ``colour``, or None where it is absent."""
    track = []
    for frame in frames:
        pixels = np.asarray(frame)
        ys, xs = np.nonzero((pixels == COLOURS[colour]).all(-1))
        track.append((xs.mean(), ys.mean()) if len(xs) else None)
    return track


def test_answers_follow_what_the_frames_show():
    """The answers read off the rendered pixels, not off the generator's records (single-colour clips)."""
    checked = {kind: 0 for kind in video.KINDS}
    for index in range(600):
        clip = video.make_clip("validation", index)
        colours = [mover.colour for mover in clip.movers]
        if len(set(colours)) < len(colours):
            continue  # two shapes of one colour: their pixels cannot be told apart by colour
        tracks = {m.kind: colour_track(clip.frames, m.colour) for m in clip.movers}
        visible = {kind: [i for i, point in enumerate(track) if point] for kind, track in tracks.items()}
        if clip.kind == "direction":
            kind = clip.question.split()[3]
            (x0, y0), (x1, y1) = tracks[kind][visible[kind][0]], tracks[kind][visible[kind][-1]]
            seen = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
            assert seen == clip.answer, clip.question
        elif clip.kind == "order":
            pick = min if "first" in clip.question else max
            assert pick(visible, key=lambda kind: visible[kind][0]) == clip.answer
        elif clip.question == "how many shapes appear ?":
            assert sum(bool(frames) for frames in visible.values()) == int(clip.answer)
            # never all on screen at once when there are three: the count is across frames
            assert len(visible) < 3 or not set.intersection(*(set(frames) for frames in visible.values()))
        else:  # clips of distinct colours only: a count of 0 or 1, read as whether the colour is drawn
            colour = clip.question.split()[2]
            drawn = sum(point is not None for point in colour_track(clip.frames, colour))
            assert (drawn > 0) == (clip.answer != "0")
        checked[clip.kind] += 1
    assert min(checked.values()) > 100
    blank = np.asarray(video.render_clip([])[0])
    assert (blank == BACKGROUND).all()


def test_clip_batches_are_spread_evenly():
    assert [is_clip_batch(b, 0.5) for b in range(4)] == [False, True, False, True]
    assert sum(is_clip_batch(b, 0.25) for b in range(100)) == 25
    assert not any(is_clip_batch(b, 0.0) for b in range(10))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_training_batch_of_clips(family):
    """Clips reach the model as video (``[frames / 2, 16, 16]`` grids), the new words are tokens of their own, and the
    loss falls on the answers only."""
    model, processor = tiny_checkpoint(family, [*WORDS, *video.WORDS], seed=0, vision_layers=1, vision_width=32,
                                       image_side=64)  # fmt: skip
    processor.tokenizer.padding_side = "left"
    assert processor.tokenizer.unk_token_id not in processor.tokenizer.convert_tokens_to_ids(video.WORDS)
    chat = ChatFormat(processor, family, answer_words(0.5))
    batch = training_batch(chat, range(4), set(), clips=True)
    assert "pixel_values" not in batch and batch["video_grid_thw"].tolist() == [[video.FRAMES // 2, 16, 16]] * 4
    for sample, ids, labels in zip(range(4), batch["input_ids"], batch["labels"], strict=True):
        _, turns = video.training_clip(sample)
        expected = [token for _, answer in turns for token in (answer, processor.tokenizer.eos_token)]
        assert processor.tokenizer.convert_ids_to_tokens(ids[labels != -100]) == expected
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_training_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="video_share must be > 0 to resume"):
        train(
            "qwen2_vl", tmp_path, steps=1, batch_size=2, learning_rate=1e-4, seed=0, device="cpu", workers=0,
            validate_every=1, max_minutes=1, resume=QWEN, video_share=0.0,
        )  # fmt: skip
    with pytest.raises(SystemExit):
        train_main(["--family", "llava", "--output", str(tmp_path), "--video-share", "0.5"])
    with pytest.raises(SystemExit):
        train_main(["--family", "qwen2-vl", "--output", str(tmp_path)])  # a model name, not a family
    with pytest.raises(SystemExit):
        train_main(["--family", "qwen2_vl", "--output", str(tmp_path), "--video-share", "1.5"])


def test_bundled_checkpoint_extends_the_image_vocabulary():
    """Training resumes the bundled checkpoint with the tokenizer ``train`` builds: the image words keep their ids and
    the video words follow them."""
    bundled = AutoProcessor.from_pretrained(QWEN).tokenizer
    _, processor = tiny_checkpoint("qwen2_vl", [*WORDS, *video.WORDS], seed=0, vision_layers=1, vision_width=32,
                                   image_side=64)  # fmt: skip
    assert bundled.get_vocab() == processor.tokenizer.get_vocab()


def test_video_accuracy_matches_the_published_results(test_clips):
    """Ratio 0, DASH at 0.667 and vision-tower halting on the whole video test split reproduce BENCHMARKS.md; the
    checkpoint answers at least 70% without halting."""
    published = [row for row in json.loads(VIDEO_RESULTS.read_text()) if row["model"] == "qwen2-vl"]
    vlm = DashVLM.from_pretrained(QWEN)
    checks = [
        dict(compression_ratio=0.0, scope="vision"),
        dict(compression_ratio=0.667, scope="vision", method="dash"),
        dict(compression_ratio=0.0, scope="vision", vision_compression_ratio=0.5),
        dict(compression_ratio=0.667, scope="vision", vision_compression_ratio=0.5),
    ]
    assert all(check in video_configurations(True) for check in checks)
    for parameters in checks:
        vlm.press = press = DeltaPress(**parameters)
        texts, _ = answer_all(vlm, test_clips, batch_size=100)
        measured = score(texts, test_clips)
        row = next(r for r in published if is_global(r) and (r["ratio"], r["method"], r["vision_ratio"]) == (
            press.compression_ratio, press.method, press.vision_compression_ratio))  # fmt: skip
        assert measured["accuracy"] == pytest.approx(row["accuracy"], abs=0.005), parameters
        assert measured["by_kind"] == pytest.approx(row["by_kind"], abs=0.02), parameters
    assert published[0]["ratio"] == 0 and published[0]["accuracy"] >= 0.7


def test_halted_by_content_splits_the_video_tokens(test_clips):
    """Shape and background shares bracket the share of all video tokens halted; nothing halts at ratio 0; the table
    shows a kind absent from a short split as '-'."""
    clips = test_clips[:6]
    vlm = DashVLM.from_pretrained(QWEN, compression_ratio=0.0)
    assert halted_by_content(generate_all(vlm, clips, 6), clips) == dict.fromkeys(
        ("shape_tokens_halted", "background_tokens_halted", "frame_pairs_halted_whole"), 0.0)  # fmt: skip
    vlm.press = DeltaPress(compression_ratio=0.667)
    results = generate_all(vlm, clips, 6)
    where = halted_by_content(results, clips)
    video_positions = [p for r in results for grid in r.grids for p in grid.positions.flatten().tolist()]
    halted = sum(p in set(r.stats.halted_positions) for r in results for grid in r.grids
                 for p in grid.positions.flatten().tolist())  # fmt: skip
    overall = halted / len(video_positions)
    assert len(video_positions) == len(clips) * video.FRAMES // 2 * 64 and 0.5 < overall < 0.8
    low, high = sorted((where["shape_tokens_halted"], where["background_tokens_halted"]))
    assert low <= overall <= high
    row = {"method": "dash", "ratio": 0.667, "vision_ratio": 0, "kept_fraction": 0.4, "accuracy": 0.5,
           "by_kind": {"order": 0.5}, **where}  # fmt: skip
    assert "| - | 50.0% | - |" in video_table([row])


def test_lmms_task_reads_the_clips_as_video(test_clips):
    task = DashShapesVideoTask(config={"task": "dash_shapes_video"})
    docs = task.dataset["test"]
    assert len(docs) == len(test_clips)
    assert task.doc_to_visual(docs[0]) == [str(test_clips[0].path)]
    assert task.process_results(docs[0], [f" {test_clips[0].answer} "])[f"{test_clips[0].kind}_accuracy"] == 1.0


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_training_sees_the_generation_clip(test_clips, family):
    """A training clip's first turn is what ``DashVLM.generate`` gives the same question on the clip's file: the same
    frames at the same size, and for Qwen3-VL the same timestamp texts (2 frames a second)."""
    _, processor = tiny_checkpoint(family, [*WORDS, *video.WORDS], seed=0, vision_layers=1, vision_width=32)
    clip = test_clips[0]
    chat = ChatFormat(processor, family, answer_words(0.5))
    text = chat.text(clip.frames, [(clip.question, clip.answer)])
    trained = processor(text=[text], **visual_inputs(chat.adapter, processor, [clip.frames]), return_tensors="pt")
    entry = {
        "role": "user",
        "content": [{"type": "video", "video": str(clip.path)}, {"type": "text", "text": clip.question}],
    }
    asked = adapter_for(family).processor_inputs(processor, [[entry]])
    prompt = asked["input_ids"].shape[1]
    assert trained["input_ids"].shape[1] == prompt + 2  # the answer word and the end of turn follow
    assert torch.equal(trained["input_ids"][:, :prompt], asked["input_ids"])
    assert asked["video_grid_thw"].tolist() == [[video.FRAMES // 2, 16, 16]]
    for key in ("pixel_values_videos", "video_grid_thw"):
        assert torch.equal(trained[key], asked[key]), key
    if family == "qwen3_vl":  # a timestamp before each frame pair: frames 2 and 3 at 2 frames a second
        prompt_text = " ".join(processor.tokenizer.decode(asked["input_ids"][0]).split())
        assert prompt_text.count("seconds") == video.FRAMES // 2 and "< 1 . 2 seconds >" in prompt_text


def test_resumed_tokens_keep_their_embeddings():
    """Resuming a Qwen3-VL checkpoint of the image words with the video words moves its timestamp words after them;
    their trained rows move with them, and the new words get fresh rows."""
    image_model, image_processor = tiny_checkpoint("qwen3_vl", WORDS, seed=0, vision_layers=1, vision_width=32)
    model, processor = tiny_checkpoint("qwen3_vl", [*WORDS, *video.WORDS], seed=1, vision_layers=1, vision_width=32)
    saved, vocab = image_processor.tokenizer.get_vocab(), processor.tokenizer.get_vocab()
    moved = {token for token in saved if vocab[token] != saved[token]}
    assert moved == set(TIMESTAMP_WORDS) - set(WORDS)
    carry_embeddings(image_model, saved, vocab)
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        before = getattr(tiny_checkpoint("qwen3_vl", WORDS, seed=0, vision_layers=1, vision_width=32)[0], layer)()
        after = getattr(image_model, layer)()
        assert after.weight.shape[0] == len(vocab)
        for token, index in saved.items():
            torch.testing.assert_close(after.weight[vocab[token]], before.weight[index], rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks tokens"):
        carry_embeddings(model, vocab, saved)


def test_training_and_evaluating_qwen3_on_clips(test_clips, tmp_path, monkeypatch, capsys):
    """Two steps of Qwen3-VL training at the dash-shapes size, one of images and one of clips (validation and held-out
    sets cut short), save a folder that generates; the video evaluation takes it as it takes Qwen2-VL."""
    from dash_vlm.shapes import data
    from dash_vlm.shapes import train as train_module

    monkeypatch.setattr(
        train_module, "split_samples", lambda split, size: [data.make_sample(split, i) for i in range(4)]
    )
    monkeypatch.setattr(train_module, "held_out_keys", set)
    monkeypatch.setattr(video, "split_clips", lambda split, size=0: [video.make_clip(split, i) for i in range(3)])
    folder = tmp_path / MODELS["qwen3-vl"]
    result = train(
        "qwen3_vl", folder, steps=2, batch_size=2, learning_rate=1e-3, seed=0, device="cpu", workers=0,
        validate_every=2, max_minutes=10, video_share=0.5,
    )  # fmt: skip
    assert result["steps"] == 2 and "validation_video_first_token" in result["history"][-1]
    vlm = DashVLM.from_pretrained(folder, compression_ratio=0.5, vision_compression_ratio=0.5)
    assert vlm.model.config.text_config.num_hidden_layers == 8 and vlm.model.config.model_type == "qwen3_vl"
    results = vlm.generate(video=str(test_clips[0].path), prompt=test_clips[0].question, max_new_tokens=2)
    assert results.generated_tokens >= 1 and results.stats.kept < results.stats.tokens
    monkeypatch.setattr(evaluate, "MODELS_FOLDER", tmp_path)
    monkeypatch.setattr(video, "read_test_split", lambda: test_clips[:3])
    evaluate.main(["--video", "--batch-size", "3", "--output", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["model"] for row in rows} == {"qwen3-vl"} and len(rows) == len(video_configurations(True))
    assert all(0 <= row["shape_tokens_halted"] <= 1 for row in rows)
    assert capsys.readouterr().out.startswith("**qwen3-vl**")
