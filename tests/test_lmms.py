"""The lmms-eval plugin: entry points, task adapters, the model interface, and lmms-eval's command line, offline."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.models import get_model
from lmms_eval.models.simple import qwen3_vl as lmms_qwen3_vl
from lmms_eval.models.simple.qwen3_5 import Qwen3_5
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL
from lmms_eval.utils import load_yaml_config
from qwen_vl_utils import process_vision_info
from test_vlm import random_image, write_video
from transformers import AutoProcessor, Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig, Qwen3VLMoeConfig

from dash_vlm import DashVLM
from dash_vlm.lmms import figures
from dash_vlm.lmms.models import DashLlava, DashQwen2VL, DashQwen3_5, DashQwen3VL
from dash_vlm.lmms.tasks import LMMS_TASKS, MVBENCH_SUBTASKS, REFERENCES, DashShapesTask, DashTask
from dash_vlm.models import adapter_for
from dash_vlm.models.tiny import tiny_checkpoint
from dash_vlm.resources import tasks_folder
from dash_vlm.shapes import video
from dash_vlm.shapes.data import read_test_split
from dash_vlm.shapes.evaluate import is_correct, model_folder

QWEN, LLAVA = model_folder("qwen2-vl"), model_folder("llava")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FIGURES = {
    "dash_prefill_ms": 1.5,
    "dash_ttft_ms": 2.5,
    "dash_tokens": 90,
    "dash_kept_tokens": 40,
    "dash_kv_cache_mb": 0.3,
    "dash_cuda_graphs": 0.0,
}


def test_entry_points_resolve():
    assert get_model("dash_qwen2vl") is DashQwen2VL
    assert get_model("dash_llava") is DashLlava
    assert get_model("dash_qwen2_5_vl").__name__ == "DashQwen2_5_VL"
    assert get_model("dash_qwen3_vl") is DashQwen3VL
    assert get_model("dash_qwen3_5") is DashQwen3_5


# A document with the fields each referenced task's prompt and scoring read (values arbitrary, types right).
BASE_DOC = {
    "question": "Is there a cat?",
    "answer": "yes",
    "question_id": 7,
    "questionId": 7,
    "category": "existence",
    "type": "human_test",
    "index": 3,
    "hint": "nan",
    "A": "yes",
    "B": "no",
    "C": "nan",
    "D": "nan",
    "source": "x",
    "split": "dev",
    "L2-category": "y",
    "choices": ["yes", "no"],
    "lecture": "",
    "solution": "",
    "ocr_tokens": [],
}
DOCS = {
    "textvqa_val": {"answers": ["yes"] * 10},
    "docvqa_val": {"answers": ["yes"]},
    "vqav2_val_lite": {"answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
    "scienceqa_img": {"answer": 0},
    "videomme": {
        "question_id": "001-1",
        "videoID": "v1",
        "duration": "short",
        "domain": "d",
        "sub_category": "s",
        "task_type": "t",
        "options": ["A. yes", "B. no"],
        "answer": "A",
    },
    "longvideobench_val_v": {
        "id": "q1",
        "duration_group": 15,
        "question_category": "c",
        "correct_choice": 0,
        **{f"option{i}": "N/A" if i > 1 else ["yes", "no"][i] for i in range(5)},
    },
    **{f"mvbench_{name}": {"candidates": ["yes", "no"], "answer": "yes"} for name in MVBENCH_SUBTASKS},
}


@pytest.mark.parametrize("reference", sorted(REFERENCES))
def test_adapter_resolves_and_adds_speed_metrics(reference, monkeypatch):
    (path,) = tasks_folder().rglob(f"dash_{reference}.yaml")
    config = load_yaml_config(str(path), mode="full")
    assert config["class"] is DashTask and config["dash_reference"] == reference
    doc = BASE_DOC | DOCS.get(reference, {})
    response = "A" if reference == "longvideobench_val_v" else "yes"  # its parser guesses at random on free text
    split = next(config_split for config_split in ("test_split", "validation_split") if config_split in _ref(reference))

    def offline_download(self, dataset_kwargs=None):
        self.dataset = DatasetDict({_ref(reference)[split]: Dataset.from_list([doc])})
        self.dataset_no_image = self.dataset

    monkeypatch.setattr(ConfigurableTask, "download", offline_download)
    task = config["class"](config=config)
    assert task.config.task == f"dash_{reference}"
    numbered = task.eval_docs[0]
    assert numbered.doc_id == 0
    builtin = ConfigurableTask.process_results(task, dict(numbered), [response])
    assert builtin and not set(builtin) & set(FIGURES)
    figures.clear()
    assert task.process_results(numbered, [response]) == builtin  # no figures recorded: a cached answer
    figures.record(f"dash_{reference}", 0, FIGURES)
    assert task.process_results(numbered, [response]) == builtin | FIGURES
    assert all(task.aggregation()[name]([1.0, 3.0]) == 2.0 for name in FIGURES)


def _ref(reference: str) -> dict:
    return DashTask.reference_config(reference)


def test_bad_reference_and_figures():
    with pytest.raises(ValueError, match="dash_reference must be one of"):
        DashTask(config={"task": "dash_x", "dash_reference": "nope"})
    with pytest.raises(ValueError, match="figures must have exactly the keys"):
        figures.record("t", 0, {"dash_prefill_ms": 1.0})


def shapes_requests(task, count: int) -> list[Instance]:
    docs = task.eval_docs
    return [
        Instance(
            "generate_until",
            (docs[i]["question"], {"max_new_tokens": 4, "until": ["\n"]}, task.doc_to_visual, i, "dash_shapes", "test"),
            idx=0,
            metadata={"task": "dash_shapes", "doc_id": i, "repeats": 1},
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def shapes_task():
    return DashShapesTask(config={"task": "dash_shapes"})


# The words of the tiny checkpoints' tokenizers: the dash-shapes questions' and the comparison requests'.
TINY_WORDS = "what colour is the square shape how many blue shapes are there red triangle where yellow relative circle"
# A pixel budget for the tiny checkpoints (4 px patches): lmms-eval qwen3_vl's would scale 64 px images 7-fold.
TINY_PIXELS = {"min_pixels": 1024, "max_pixels": 16384}


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """Saved tiny checkpoints by model type (``qwen3_vl``, ``qwen3_vl_moe``, ``qwen3_5``, ``qwen3_5_moe``), each made
    on first use."""
    folders = {}

    def folder(model_type: str) -> Path:
        if model_type not in folders:
            folders[model_type] = tmp_path_factory.mktemp(model_type)
            model, processor = tiny_checkpoint(model_type, TINY_WORDS.split(), seed=3)
            model.save_pretrained(folders[model_type])
            processor.save_pretrained(folders[model_type])
        return folders[model_type]

    return folder


@pytest.mark.parametrize(
    "model_class, checkpoint, args",
    [
        (DashQwen2VL, "qwen2-vl", {}),
        (DashLlava, "llava", {}),
        (DashQwen3VL, "qwen3_vl", TINY_PIXELS),
        (DashQwen3VL, "qwen3_vl_moe", TINY_PIXELS),
        (DashQwen3_5, "qwen3_5", TINY_PIXELS),
        (DashQwen3_5, "qwen3_5_moe", TINY_PIXELS | {"enable_thinking": False}),
    ],
)
def test_generate_until_batches_and_records_figures(shapes_task, tiny_qwen3, model_class, checkpoint, args):
    folder = tiny_qwen3(checkpoint) if model_class in (DashQwen3VL, DashQwen3_5) else model_folder(checkpoint)
    lmm = model_class(pretrained=str(folder), compression_ratio=0.5, batch_size=4, device_map="cpu", **args)
    assert lmm.vlm.model.config.model_type == {"qwen2-vl": "qwen2_vl"}.get(checkpoint, checkpoint)
    lmm.task_dict = {"dash_shapes": shapes_task.dataset}
    requests = shapes_requests(shapes_task, 6)
    figures.clear()
    batched = lmm.generate_until(requests)
    assert all(isinstance(result, GenerationResult) for result in batched)
    recorded = [figures.lookup("dash_shapes", i) for i in range(6)]
    lmm.batch_size_per_gpu = 1
    alone = lmm.generate_until(requests)
    assert [r.text for r in batched] == [r.text for r in alone]
    for i, result in enumerate(batched):
        figure = recorded[i]
        assert set(figure) == set(FIGURES)
        assert figure["dash_kept_tokens"] < figure["dash_tokens"] == result.token_counts.input_tokens
        assert figure["dash_ttft_ms"] >= figure["dash_prefill_ms"] > 0
        assert figures.lookup("dash_shapes", i)["dash_kept_tokens"] == figure["dash_kept_tokens"]
    # LLaVA's prompts follow lmms-eval's llava_hf format, not the chat template, and Qwen3-VL's have lmms-eval's
    # system message, which its chat template (unlike Qwen2-VL's) does not add: only Qwen2-VL's equal generate's
    if model_class is DashQwen2VL:
        samples = read_test_split()[:6]
        direct = lmm.vlm.generate(image=[s.image for s in samples], prompt=[s.question for s in samples])
        assert [r.text for r in batched] == [r.text for r in direct]
    with pytest.raises(NotImplementedError, match="multi-round"):
        lmm.generate_until_multi_round(requests)


@pytest.mark.parametrize("model_class, answer", [(DashQwen2VL, "yes"), (DashQwen3VL, "yes\n\nno")])
def test_answers_are_cut_at_the_stop_strings_of_the_familys_lmms_eval_model(
    shapes_task, tiny_qwen3, model_class, answer
):
    """lmms-eval's ``qwen3_vl`` drops ``"\\n\\n"`` from a task's ``until`` (its answers run on past a blank line);
    its ``qwen2_vl`` cuts there. Both cut at the task's other stop strings."""
    folder, args = (tiny_qwen3("qwen3_vl"), TINY_PIXELS) if model_class is DashQwen3VL else (QWEN, {})
    lmm = model_class(pretrained=str(folder), device_map="cpu", max_new_tokens=2, **args)
    lmm.task_dict = {"dash_shapes": shapes_task.dataset}
    generate = lmm.vlm.generate_conversations

    def answering(conversations, prompts=None, **kwargs):
        results = generate(conversations, prompts, **kwargs)
        for result in results:
            result.text = "yes\n\nno maybe so"
        return results

    lmm.vlm.generate_conversations = answering
    until = ["\n\n", " maybe"]
    question = shapes_task.eval_docs[0]["question"]
    request = Instance(
        "generate_until",
        (question, {"until": until}, shapes_task.doc_to_visual, 0, "dash_shapes", "test"),
        idx=0,
        metadata={"task": "dash_shapes", "doc_id": 0, "repeats": 1},
    )
    assert [result.text for result in lmm.generate_until([request])] == [answer]


QWEN3_REQUESTS = {
    "image": ("<image>what colour is the shape ?", [(50, 70)]),  # resized to a multiple of the 8 px merged patch
    "images": ("what colour is the shape <image> left ?", [(200, 120), (20, 30), (40, 56)]),  # over / under budget
    "video": ("how many shapes are there ?", "clip.mp4"),
}
LMMS_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@pytest.mark.parametrize(
    "kind, settings",
    [
        ("image", {}),
        ("images", {"system_prompt": "Answer in one word."}),
        ("video", {"max_num_frames": 4}),  # 4 of the clip's 8 frames
        ("video", {}),  # min(32, the clip's 8 frames)
    ],
)
def test_qwen3_vl_prompts_and_inputs_match_lmms_eval_qwen3_vl(tiny_qwen3, tmp_path, monkeypatch, kind, settings):
    """One request through ``dash_qwen3_vl`` at ratio 0 and through lmms-eval's ``qwen3_vl`` (``_preprocess_chunk``,
    the messages, chat template and processor call it generates from): the same prompt text and the same processor
    inputs, to the bit."""
    assert Qwen3VLConfig().vision_config.patch_size == Qwen3VLMoeConfig().vision_config.patch_size == 16
    folder = str(tiny_qwen3("qwen3_vl"))
    ours = DashQwen3VL(pretrained=folder, device_map="cpu", compression_ratio=0.0, **TINY_PIXELS, **settings)
    theirs = lmms_eval_at_checkpoint_patch(Qwen3_VL, folder, ours, monkeypatch, **TINY_PIXELS, **settings)
    prompt, expected = same_inputs_as_lmms_eval(ours, theirs, kind, tmp_path, monkeypatch)
    assert prompt.startswith(f"<|im_start|>system\n{settings.get('system_prompt', 'You are a helpful')}")
    if kind == "video":
        frames = min(settings.get("max_num_frames", 32), 8)
        assert expected["video_grid_thw"][0, 0].item() == frames // 2  # 2 frames a temporal patch


@pytest.mark.parametrize(
    "kind, settings, grid",
    [
        ("image", {}, None),
        ("image", {"enable_thinking": False}, None),
        ("images", {"system_prompt": "Answer in one word.", "enable_thinking": False}, None),
        # The 2-second clip's frames at 2 a second (at least 4), 2 to a temporal patch, in 4 px patches.
        ("video", {}, (2, 12, 16)),
        ("video", {"enable_thinking": False, "max_num_frames": 2}, (1, 12, 16)),
        ("video", {"total_pixels": 4096}, (2, 8, 12)),  # 2 * 4096 / 4 frames = 2048 px a frame at most: 32 x 48 px
        ("video", {"total_pixels": None}, (4, 12, 16)),  # no total budget: qwen3_vl's reading, all 8 frames
    ],
)
def test_qwen3_5_prompts_and_inputs_match_lmms_eval_qwen3_5(tiny_qwen3, tmp_path, monkeypatch, kind, settings, grid):
    """One request through ``dash_qwen3_5`` at ratio 0 and through lmms-eval's ``qwen3_5`` (its ``qwen3_vl``'s
    ``_preprocess_chunk`` under ``qwen3_5``'s defaults and thinking switch): the same prompt text and the same
    processor inputs, to the bit, with thinking on and off."""
    assert Qwen3_5Config().vision_config.patch_size == Qwen3_5MoeConfig().vision_config.patch_size == 16
    folder = str(tiny_qwen3("qwen3_5"))
    ours = DashQwen3_5(pretrained=folder, device_map="cpu", compression_ratio=0.0, **TINY_PIXELS, **settings)
    theirs = lmms_eval_at_checkpoint_patch(Qwen3_5, folder, ours, monkeypatch, **TINY_PIXELS, **settings)
    assert theirs.enable_thinking is settings.get("enable_thinking", True)
    prompt, expected = same_inputs_as_lmms_eval(ours, theirs, kind, tmp_path, monkeypatch)
    assert prompt.startswith(f"<|im_start|>system\n{settings.get('system_prompt', 'You are a helpful')}")
    thinking = settings.get("enable_thinking", True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n" if thinking else "<think>\n\n</think>\n\n")
    if kind == "video":
        assert expected["video_grid_thw"].tolist() == [list(grid)]


# Generated texts and a task's stop strings: lmms-eval's qwen3_5 cuts at the stop strings (less "\n\n") first, then
# keeps what follows the thinking.
RAW_ANSWERS = [
    "a plan\n</think>\n\nyes maybe so",  # thinking on: "yes"
    "the thinking did not end",  # thinking on: ""
    "x</think> one</think>two \n",  # thinking on: the text after the first </think>
    "plan maybe</think> yes",  # cut at " maybe" before the thinking ends: ""
    "</think>",
    "  plain answer\n\nmore ",
]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_5_answers_are_post_processed_as_lmms_eval_qwen3_5s(tiny_qwen3, monkeypatch, enable_thinking):
    """The same generated text through ``dash_qwen3_5``'s ``generate_until`` and through lmms-eval's ``qwen3_5``'s
    (its decoded text replaced): the same answer. With thinking on, the text after ``</think>`` (stripped), ``""``
    where there is none; with it off the text as cut at the stop strings (which ``DashLMM`` strips of surrounding
    whitespace, as for every family)."""
    folder = str(tiny_qwen3("qwen3_5"))
    settings = TINY_PIXELS | {"enable_thinking": enable_thinking}
    ours = DashQwen3_5(pretrained=folder, device_map="cpu", max_new_tokens=2, **settings)
    theirs = Qwen3_5(pretrained=folder, device="cpu", device_map="cpu", **settings)
    docs = {"t": {"test": [{"visuals": [random_image(40, 56, seed=0)]}]}}
    theirs.task_dict = ours.task_dict = docs
    kwargs = {"until": ["\n\n", " maybe"], "max_new_tokens": 2, "temperature": 0}
    args = ("what colour is the shape ?", kwargs, lambda doc: doc["visuals"], 0, "t", "test")
    request = Instance("generate_until", args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    generate = ours.vlm.generate_conversations
    for raw in RAW_ANSWERS:

        def answering(conversations, prompts=None, _raw=raw, **kwargs):
            results = generate(conversations, prompts, **kwargs)
            for result in results:
                result.text = _raw
            return results

        monkeypatch.setattr(ours.vlm, "generate_conversations", answering)
        monkeypatch.setattr(theirs.processor, "batch_decode", lambda *args, _raw=raw, **kwargs: [_raw])
        (expected,) = theirs.generate_until([request])
        (answer,) = ours.generate_until([request])
        cut = raw.split(" maybe")[0]
        assert expected == (cut.partition("</think>")[2].strip() if enable_thinking else cut)  # the quoted rule
        assert answer.text == expected.strip(), raw


def test_qwen3_5_settings_default_to_lmms_eval_qwen3_5s(tmp_path, monkeypatch):
    """``dash_qwen3_5``'s settings default to those of lmms-eval's ``qwen3_5``, come converted from ``--model_args``
    text, and bad ones (``enable_thinking`` not a bool) are refused before any weights load."""
    loaded = {}
    monkeypatch.setattr(DashVLM, "from_pretrained", lambda pretrained, **kwargs: loaded.update(kwargs))
    Qwen3_5Config().save_pretrained(tmp_path)
    theirs = inspect.signature(Qwen3_5.__init__).parameters
    lmm = DashQwen3_5.create_from_arg_string(f"pretrained={tmp_path}", {"batch_size": "1"})
    assert (lmm.max_num_frames, lmm.total_pixels, lmm.enable_thinking) == tuple(
        theirs[name].default for name in ("max_num_frames", "total_pixels", "enable_thinking")
    )
    assert (loaded["min_pixels"], loaded["max_pixels"]) == (theirs["min_pixels"].default, theirs["max_pixels"].default)
    assert lmm.system_prompt == inspect.signature(Qwen3_VL.__init__).parameters["system_prompt"].default
    assert lmm.max_new_tokens == Qwen3_5.DEFAULT_GEN_KWARGS["max_new_tokens"]
    assert inspect.signature(DashQwen3_5.__init__).parameters["pretrained"].default == theirs["pretrained"].default
    lmm = DashQwen3_5.create_from_arg_string(
        f"pretrained={tmp_path},enable_thinking=false,total_pixels=4096.0,max_frames=8,min_pixels=1024",
        {"batch_size": "2"},
    )
    assert (lmm.enable_thinking, lmm.total_pixels, lmm.max_num_frames, loaded["min_pixels"]) == (False, 4096, 8, 1024)
    assert lmm.prompt_options() == {
        "system_prompt": "You are a helpful assistant.",
        "max_num_frames": 8,
        "total_pixels": 4096,
        "enable_thinking": False,
    }
    assert DashQwen3_5(pretrained=str(tmp_path), total_pixels="None").total_pixels is None

    def load(*args, **kwargs):
        raise AssertionError("DashVLM.from_pretrained was called before the model args were refused")

    monkeypatch.setattr(DashVLM, "from_pretrained", load)
    for args, message in [
        ({"enable_thinking": "maybe"}, "enable_thinking must be true or false, got 'maybe'"),
        ({"enable_thinking": None}, "enable_thinking must be true or false, got None"),
        ({"total_pixels": 0}, "total_pixels must be an int >= 1, got 0"),
        ({"max_frames": "abc"}, "max_frames must be an int, got 'abc'"),
        ({"reasoning_prompt": "Think."}, "unknown model args \\['reasoning_prompt'\\]; it takes .*enable_thinking"),
    ]:
        with pytest.raises(ValueError, match=message):
            DashQwen3_5(pretrained=str(tmp_path), **args)


@pytest.mark.parametrize(
    "model_class, config, advice",
    [
        (DashQwen3_5, Qwen3VLConfig(), "use dash_qwen3_vl"),
        (DashQwen3VL, Qwen3_5Config(), "use dash_qwen3_5"),
        (DashQwen2VL, Qwen3_5MoeConfig(), "use dash_qwen3_5"),
        (DashQwen3_5, None, "use dash_qwen2vl"),
    ],
)
def test_qwen3_5_checkpoints_and_only_they_go_to_dash_qwen3_5(tmp_path, monkeypatch, model_class, config, advice):
    """``dash_qwen3_5`` refuses another family's checkpoint before any weights load, naming the model that serves
    it, and the other families name ``dash_qwen3_5`` for a Qwen3.5 checkpoint; it serves both Qwen3.5 types."""

    def load(*args, **kwargs):
        raise AssertionError("DashVLM.from_pretrained was called before the checkpoint was refused")

    monkeypatch.setattr(DashVLM, "from_pretrained", load)
    if config is not None:
        config.save_pretrained(tmp_path)
    checkpoint = str(tmp_path) if config is not None else str(QWEN)
    with pytest.raises(ValueError, match=f"serves model types .*; the checkpoint .* is .*; {advice}$"):
        model_class(pretrained=checkpoint, device_map="cpu")
    monkeypatch.setattr(DashVLM, "from_pretrained", lambda *args, **kwargs: None)
    for served in (Qwen3_5Config(), Qwen3_5MoeConfig()):
        served.save_pretrained(tmp_path / served.model_type)
        DashQwen3_5(pretrained=str(tmp_path / served.model_type))


def test_qwen3_5_video_entries_with_and_without_total_pixels_do_not_mix(tiny_qwen3, tmp_path):
    """A batch holding both lmms-eval ``qwen3_5`` video entries (``total_pixels``) and other videos is refused."""
    processor = AutoProcessor.from_pretrained(tiny_qwen3("qwen3_5"))
    write_video(tmp_path / "clip.mp4")
    video = {"type": "video", "video": str(tmp_path / "clip.mp4")}
    with pytest.raises(ValueError, match="1 of 2 video entries name total_pixels"):
        adapter_for("qwen3_5").vision_inputs(processor, [video | {"total_pixels": 4096}, video], 1024, 16384)


def lmms_eval_at_checkpoint_patch(model_class: type, folder: str, ours, monkeypatch, **settings):
    """lmms-eval's model of the family on the tiny checkpoint ``folder``. lmms-eval's ``qwen3_vl`` (and ``qwen3_5``)
    resizes for 16 px patches whatever the checkpoint (``image_patch_size=16``), the patch of every real checkpoint;
    the tiny one has 4 px ones, so there its reading is given the checkpoint's patch."""
    patch = ours.vlm.processor.image_processor.patch_size

    def at_checkpoint_patch(*args, image_patch_size, **kwargs):
        assert image_patch_size == 16
        return process_vision_info(*args, image_patch_size=patch, **kwargs)

    monkeypatch.setattr(lmms_qwen3_vl, "process_vision_info", at_checkpoint_patch)
    return model_class(pretrained=folder, device="cpu", device_map="cpu", **settings)


def same_inputs_as_lmms_eval(ours, theirs, kind: str, tmp_path, monkeypatch) -> tuple[str, dict]:
    """Put the request ``QWEN3_REQUESTS[kind]`` through ``ours`` (generating, the prefill's inputs recorded) and
    through ``theirs``'s ``_preprocess_chunk``; assert one prompt each, equal, and equal processor inputs (dtype and
    values), and the whole prompt kept at ratio 0. Returns the prompt and lmms-eval's inputs."""
    context, visuals = QWEN3_REQUESTS[kind]
    if kind == "video":
        write_video(tmp_path / visuals)  # 8 frames of 64 x 48 px, 4 a second
        visuals = [str(tmp_path / visuals)]
    else:
        visuals = [random_image(height, width, seed=i) for i, (height, width) in enumerate(visuals)]
    docs = {"t": {"test": [{"visuals": visuals}]}}
    args = (context, {"max_new_tokens": 2, "until": ["\n"]}, lambda doc: doc["visuals"], 0, "t", "test")
    request = Instance("generate_until", args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    prompts = {"ours": [], "theirs": []}
    for name, processor in (("ours", ours.vlm.processor), ("theirs", theirs.processor)):
        template = processor.apply_chat_template

        def recorded(*args, _name=name, _template=template, **kwargs):
            text = _template(*args, **kwargs)
            prompts[_name] += [text] if isinstance(text, str) else text
            return text

        monkeypatch.setattr(processor, "apply_chat_template", recorded)
    theirs.task_dict = ours.task_dict = docs
    expected, *_ = theirs._preprocess_chunk([args])
    seen = {}

    def record(module, args, kwargs):
        if not seen:  # the prefill's inputs
            seen.update({key: value for key, value in kwargs.items() if key in LMMS_INPUTS})

    handle = ours.vlm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        figures.clear()
        (result,) = ours.generate_until([request])
    finally:
        handle.remove()
    assert len(prompts["ours"]) == len(prompts["theirs"]) == 1
    assert prompts["ours"] == prompts["theirs"]
    assert "<image>" not in prompts["ours"][0]
    present = [key for key in LMMS_INPUTS if seen.get(key) is not None]
    assert present == [key for key in LMMS_INPUTS if expected.get(key) is not None]
    for key in present:
        assert seen[key].dtype == expected[key].dtype and torch.equal(seen[key], expected[key]), key
    pixels, grid = ("pixel_values_videos", "video_grid_thw") if kind == "video" else ("pixel_values", "image_grid_thw")
    assert pixels in present and len(expected[grid]) == len(visuals)
    figure = figures.lookup("t", 0)
    assert figure["dash_kept_tokens"] == figure["dash_tokens"] == result.token_counts.input_tokens  # ratio 0
    return prompts["ours"][0], expected


def test_loglikelihood_protects_the_continuation(shapes_task):
    sample = read_test_split()[0]
    lmm = DashQwen2VL(pretrained=str(QWEN), compression_ratio=0.9, scope="all", device_map="cpu")
    lmm.task_dict = {"dash_shapes": shapes_task.dataset}
    request = Instance(
        "loglikelihood",
        (sample.question, lambda doc: " " + doc["answer"], shapes_task.doc_to_visual, 0, "dash_shapes", "test"),
        0,
        metadata={"task": "dash_shapes", "doc_id": 0, "repeats": 1},
    )
    ((log_prob, greedy),) = lmm.loglikelihood([request])
    stats = lmm.vlm.press.last_stats[0]
    continuation_positions = set(range(stats.tokens - 1, stats.tokens))  # the answer word is one token
    assert not continuation_positions & set(stats.halted_positions) and stats.kept < stats.tokens
    assert log_prob < 0 and isinstance(greedy, bool)
    # At ratio 0 the score is the unmodified model's.
    lmm.vlm.press.compression_ratio = 0.0
    ((plain_log_prob, plain_greedy),) = lmm.loglikelihood([request])
    conversation, _ = lmm.conversation(sample.question, [sample.image])
    processor, model = lmm.vlm.processor, lmm.vlm.model
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt + " " + sample.answer], images=[sample.image], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -2]
    expected = torch.log_softmax(logits.float(), -1)[inputs["input_ids"][0, -1]].item()
    assert plain_log_prob == pytest.approx(expected, abs=1e-4)
    assert plain_greedy == (sample.answer == processor.tokenizer.decode([logits.argmax().item()]).strip())


def run_lmms_eval(
    tmp_path: Path, processes: int, limit: int, *extra: str, task: str = "dash_shapes"
) -> tuple[dict, list[dict]]:
    output = tmp_path / f"run{processes}{''.join(extra)}{task}"
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--cpu",
                    "-m", "lmms_eval"]  # fmt: skip
    command = [
        *launcher,
        "--model", "dash_qwen2vl",
        "--model_args", f"pretrained={QWEN},compression_ratio=0.5,device_map=cpu",
        "--tasks", task,
        "--include_path", str(tasks_folder()),
        "--limit", str(limit),
        "--batch_size", "8",
        "--log_samples",
        "--output_path", str(output),
        *extra,
    ]  # fmt: skip
    run = subprocess.run(command, env=os.environ | OFFLINE, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next(output.rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in next(output.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
    return results, samples


def test_lmms_eval_command_line_one_and_two_processes(tmp_path):
    limit = 24
    one, one_samples = run_lmms_eval(tmp_path, 1, limit)
    scores = one["results"]["dash_shapes"]
    expected = read_test_split()[:limit]
    assert len(one_samples) == limit
    correct = [is_correct(sample["filtered_resps"], doc.answer) for sample, doc in zip(
        sorted(one_samples, key=lambda s: s["doc_id"]), expected, strict=True)]  # fmt: skip
    assert scores["exact_match,none"] == pytest.approx(sum(correct) / limit)
    # The trained checkpoint answers through lmms-eval exactly as through DashVLM (the same prompt and images).
    vlm = DashVLM.from_pretrained(QWEN, compression_ratio=0.5)
    direct = vlm.generate(image=[doc.image for doc in expected], prompt=[doc.question for doc in expected])
    assert [s["filtered_resps"] for s in sorted(one_samples, key=lambda s: s["doc_id"])] == [r.text for r in direct]
    assert scores["exact_match,none"] > 0.5
    for name in FIGURES:
        assert scores[f"{name},none"] > 0 or name == "dash_cuda_graphs"
        assert all(name in sample for sample in one_samples)
    assert scores["dash_cuda_graphs,none"] == 0  # the eager path ran
    assert scores["dash_kept_tokens,none"] < scores["dash_tokens,none"]
    assert one["throughput"]["total_gen_tokens"] >= limit

    two, two_samples = run_lmms_eval(tmp_path, 2, limit)
    assert sorted(sample["doc_id"] for sample in two_samples) == list(range(limit))  # both ranks' samples
    assert all(all(name in sample for name in FIGURES) for sample in two_samples)  # both ranks' figures
    for name in ("exact_match", "dash_tokens", "dash_kept_tokens", "dash_kv_cache_mb"):
        assert two["results"]["dash_shapes"][f"{name},none"] == pytest.approx(scores[f"{name},none"])


def test_lmms_eval_command_line_video_task(tmp_path):
    """``dash_shapes_video`` end to end: the clips reach the model as video (lmms-eval's decord reading), and the
    answers equal ``DashVLM.generate(video=...)`` on the same files (PyAV reading)."""
    limit = 12
    results, samples = run_lmms_eval(tmp_path, 1, limit, task="dash_shapes_video")
    docs = video.read_test_split()[:limit]
    vlm = DashVLM.from_pretrained(QWEN, compression_ratio=0.5)
    direct = vlm.generate(video=[str(d.path) for d in docs], prompt=[d.question for d in docs], max_new_tokens=4)
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [r.text for r in direct]
    scores = results["results"]["dash_shapes_video"]
    assert scores["exact_match,none"] == pytest.approx(sum(is_correct(r.text, d.answer) for r, d in zip(
        direct, docs, strict=True)) / limit)  # fmt: skip
    assert scores["dash_kept_tokens,none"] < scores["dash_tokens,none"] and scores["dash_tokens,none"] > 256


def test_lmms_eval_beam_search_gives_one_answer_per_request(tmp_path):
    limit = 8
    results, samples = run_lmms_eval(tmp_path, 1, limit, "--gen_kwargs", "num_beams=2")
    assert sorted(sample["doc_id"] for sample in samples) == list(range(limit))
    assert all(all(name in sample for name in FIGURES) for sample in samples)
    docs = read_test_split()[:limit]
    vlm = DashVLM.from_pretrained(QWEN, compression_ratio=0.5)
    direct = vlm.generate(image=[d.image for d in docs], prompt=[d.question for d in docs], num_beams=2)
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [r.text for r in direct]
    assert (
        results["results"]["dash_shapes"]["dash_kept_tokens,none"]
        < results["results"]["dash_shapes"]["dash_tokens,none"]
    )


def test_dash_mvbench_groups_every_subtask_of_lmms_eval_mvbench():
    theirs = load_yaml_config(str(LMMS_TASKS / "mvbench" / "mvbench.yaml"), mode="simple")["task"]
    ours = load_yaml_config(str(tasks_folder() / "dash_mvbench" / "dash_mvbench.yaml"), mode="simple")
    assert ours["group"] == "dash_mvbench" and ours["task"] == [f"dash_{task}" for task in theirs]
