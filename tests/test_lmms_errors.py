"""lmms-eval model args checked before any weights load (issue 30, items 3 and 15): a bad value, given as lmms-eval
hands it over (a Python value, or text from ``--model_args`` / ``--batch_size``), raises a ``ValueError`` naming the
argument, its value and what it accepts; a checkpoint of another family names the dash model that serves it."""

from __future__ import annotations

import re

import pytest
from transformers import LlamaConfig, Qwen2_5_VLConfig

from dash_vlm import vlm
from dash_vlm.lmms.models import DashLlava, DashQwen2_5_VL, DashQwen2VL
from dash_vlm.models import MAX_FRAMES_LIMIT
from dash_vlm.shapes.evaluate import model_folder

QWEN, LLAVA = str(model_folder("qwen2-vl")), str(model_folder("llava"))


@pytest.fixture
def no_weights(monkeypatch):
    """``DashVLM.from_pretrained`` fails the test: every check must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("DashVLM.from_pretrained was called before the model args were refused")

    monkeypatch.setattr(vlm.DashVLM, "from_pretrained", load)


@pytest.fixture
def loaded(monkeypatch) -> dict:
    """``DashVLM.from_pretrained`` records its arguments instead of loading; returns them."""
    seen = {}

    def load(pretrained, **kwargs):
        seen.update(kwargs, pretrained=pretrained)

    monkeypatch.setattr(vlm.DashVLM, "from_pretrained", load)
    return seen


@pytest.fixture
def config_folder(tmp_path):
    """A checkpoint folder holding only the config of ``model_type`` (what the family check reads)."""

    def folder(config) -> str:
        config.save_pretrained(tmp_path / config.model_type)
        return str(tmp_path / config.model_type)

    return folder


BAD_ARGS = [
    # --batch_size 0 / -1 reach the model as text, batch_size=-1 in --model_args as the float -1.0
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": "0"}, "batch_size must be an int >= 1, got '0'"),
    ({"batch_size": "-1"}, "batch_size must be an int >= 1, got '-1'"),
    ({"batch_size": -1.0}, "batch_size must be an int >= 1, got -1.0"),
    ({"batch_size": "2.5"}, "batch_size must be an int >= 1, got '2.5'"),
    ({"batch_size": "auto"}, "batch_size must be an int >= 1, got 'auto': .* --batch_size N"),
    ({"batch_size": "auto:4"}, "batch_size must be an int >= 1, got 'auto:4'"),
    ({"max_new_tokens": "abc"}, "max_new_tokens must be an int >= 1, got 'abc'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
    ({"min_pixels": "abc"}, "min_pixels must be an int, got 'abc'"),
    ({"max_pixels": 1.5}, "max_pixels must be an int, got 1.5"),
    ({"max_num_frames": "abc"}, "max_num_frames must be an int, got 'abc'"),
    ({"max_num_frames": 0}, "max_num_frames must be a positive int, got 0"),
    ({"max_num_frames": str(MAX_FRAMES_LIMIT + 1)}, f"max_num_frames must be at most {MAX_FRAMES_LIMIT}"),
    ({"max_num_frames": 10**12}, f"max_num_frames must be at most {MAX_FRAMES_LIMIT}"),
    ({"cuda_graphs": "maybe"}, "cuda_graphs must be true or false, got 'maybe' \\(accepted: true, 1, yes"),
    ({"ratio": 0.5}, "unknown model args \\['ratio'\\]; it takes .*batch_size, .*compression_ratio, .*min_pixels"),
]


@pytest.mark.parametrize("model_class", [DashQwen2VL, DashQwen2_5_VL])
@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[str(args) for args, _ in BAD_ARGS])
def test_bad_model_args_are_refused_before_loading(no_weights, model_class, args, message):
    with pytest.raises(ValueError, match=message):
        model_class(pretrained=QWEN, device_map="cpu", **args)


def test_bad_model_args_as_lmms_eval_passes_them(no_weights):
    """Through lmms-eval's own constructor: ``--model_args`` text parsed by lmms-eval, ``--batch_size`` as text."""
    for model_args, batch_size, message in [
        (f"pretrained={QWEN}", "auto", "batch_size must be an int >= 1, got 'auto'"),
        (f"pretrained={QWEN}", "0", "batch_size must be an int >= 1, got '0'"),
        (f"pretrained={QWEN},batch_size=-1", None, "batch_size must be an int >= 1, got -1.0"),
        (f"pretrained={QWEN},min_pixels=abc", "1", "min_pixels must be an int, got 'abc'"),
        (f"pretrained={QWEN},max_num_frames=1e6", "1", f"max_num_frames must be at most {MAX_FRAMES_LIMIT}"),
        (f"pretrained={LLAVA},max_new_tokens=abc", "1", "max_new_tokens must be an int >= 1, got 'abc'"),
    ]:
        with pytest.raises(ValueError, match=message):
            DashQwen2VL.create_from_arg_string(model_args, {"batch_size": batch_size, "max_batch_size": None})


def test_text_model_args_are_converted(loaded):
    lmm = DashQwen2VL.create_from_arg_string(
        f"pretrained={QWEN},max_new_tokens=16,min_pixels=1024,max_pixels=4096.0,max_num_frames= 64,cuda_graphs=no",
        {"batch_size": "8"},
    )
    assert (lmm.batch_size, lmm.max_new_tokens, lmm.max_num_frames) == (8, 16, 64)
    assert loaded["min_pixels"] == 1024 and loaded["max_pixels"] == 4096 and type(loaded["max_pixels"]) is int
    assert loaded["cuda_graphs"] is False and loaded["pretrained"] == QWEN
    loaded.clear()
    lmm = DashLlava(pretrained=LLAVA, batch_size=2, max_new_tokens="4", cuda_graphs=False)
    assert (lmm.batch_size, lmm.max_new_tokens) == (2, 4) and "min_pixels" not in loaded


@pytest.mark.parametrize(
    "model_class, name, checkpoint, model_type, advice",
    [
        (DashQwen2VL, "dash_qwen2vl", LLAVA, "llava", "use dash_llava"),
        (DashQwen2_5_VL, "dash_qwen2_5_vl", LLAVA, "llava", "use dash_llava"),
        (DashLlava, "dash_llava", QWEN, "qwen2_vl", "use dash_qwen2vl"),
        (DashLlava, "dash_llava", Qwen2_5_VLConfig(), "qwen2_5_vl", "use dash_qwen2_5_vl"),
        (DashQwen2VL, "dash_qwen2vl", LlamaConfig(), "llama", "no dash lmms-eval model serves it"),
    ],
)
def test_checkpoint_of_another_family_is_refused_before_loading(
    no_weights, config_folder, model_class, name, checkpoint, model_type, advice
):
    checkpoint = checkpoint if isinstance(checkpoint, str) else config_folder(checkpoint)
    served = "llava, llava_next" if model_class is DashLlava else "qwen2_vl, qwen2_5_vl"
    message = (
        f"{name} serves model types {served}; the checkpoint pretrained={checkpoint!r} is {model_type!r}; {advice}"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        model_class(pretrained=checkpoint, device_map="cpu")
    assert "pixels" not in str(error.value)  # not the Qwen pixel budget, which the user never set


def test_family_serves_its_model_types(loaded, config_folder):
    qwen2_5 = config_folder(Qwen2_5_VLConfig())
    DashQwen2VL(pretrained=qwen2_5)
    assert loaded["pretrained"] == qwen2_5


def test_checks_left_to_dash_vlm_still_precede_the_weights(monkeypatch):
    """A converted pixel budget out of range, and a missing checkpoint, are refused by ``DashVLM.from_pretrained``
    before it loads the model."""

    def load(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(vlm.AutoModelForImageTextToText, "from_pretrained", load)
    with pytest.raises(ValueError, match="min_pixels must be a positive int, got 0"):
        DashQwen2VL(pretrained=QWEN, device_map="cpu", min_pixels="0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DashQwen2VL(pretrained="/nonexistent/checkpoint", device_map="cpu")
