"""lmms-eval model args checked before any weights load (issue 30, items 3 and 15): a bad value, given as lmms-eval
hands it over (a Python value, or text from ``--model_args`` / ``--batch_size``), raises a ``ValueError`` naming the
argument, its value and what it accepts; a checkpoint of another family names the dash model that serves it."""

from __future__ import annotations

import inspect
import re

import pytest
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL
from transformers import LlamaConfig, Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

from dash_vlm import vlm
from dash_vlm.lmms.models import DashLlava, DashQwen2_5_VL, DashQwen2VL, DashQwen3VL
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


@pytest.mark.parametrize("model_class", [DashQwen2VL, DashQwen2_5_VL, DashQwen3VL])
@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[str(args) for args, _ in BAD_ARGS])
def test_bad_model_args_are_refused_before_loading(no_weights, config_folder, model_class, args, message):
    pretrained = config_folder(Qwen3VLConfig()) if model_class is DashQwen3VL else QWEN
    with pytest.raises(ValueError, match=message):
        model_class(pretrained=pretrained, device_map="cpu", **args)


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


def test_qwen3_vl_settings_default_to_lmms_eval_qwen3_vls(loaded, config_folder):
    """``dash_qwen3_vl``'s prompt settings default to those of lmms-eval's ``qwen3_vl``, and come converted from
    ``--model_args`` text as the other families' do."""
    theirs = inspect.signature(Qwen3_VL.__init__).parameters
    checkpoint = config_folder(Qwen3VLConfig())
    lmm = DashQwen3VL.create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": "1"})
    assert (lmm.system_prompt, lmm.max_num_frames) == (
        theirs["system_prompt"].default,
        theirs["max_num_frames"].default,
    )
    assert (loaded["min_pixels"], loaded["max_pixels"]) == (theirs["min_pixels"].default, theirs["max_pixels"].default)
    assert inspect.signature(DashQwen3VL.__init__).parameters["pretrained"].default == "Qwen/Qwen3-VL-8B-Instruct"
    loaded.clear()
    lmm = DashQwen3VL.create_from_arg_string(
        f"pretrained={checkpoint},min_pixels=1024,max_pixels=4096.0,max_num_frames= 8,system_prompt=Be brief.",
        {"batch_size": "2"},
    )
    assert (lmm.batch_size, lmm.max_num_frames, lmm.system_prompt) == (2, 8, "Be brief.")
    assert (loaded["min_pixels"], loaded["max_pixels"]) == (1024, 4096) and type(loaded["max_pixels"]) is int


@pytest.mark.parametrize(
    "model_class, name, checkpoint, model_type, advice",
    [
        (DashQwen2VL, "dash_qwen2vl", LLAVA, "llava", "use dash_llava"),
        (DashQwen2_5_VL, "dash_qwen2_5_vl", LLAVA, "llava", "use dash_llava"),
        (DashLlava, "dash_llava", QWEN, "qwen2_vl", "use dash_qwen2vl"),
        (DashLlava, "dash_llava", Qwen2_5_VLConfig(), "qwen2_5_vl", "use dash_qwen2_5_vl"),
        (DashQwen2VL, "dash_qwen2vl", LlamaConfig(), "llama", "no dash lmms-eval model serves it"),
        (DashQwen2VL, "dash_qwen2vl", Qwen3VLConfig(), "qwen3_vl", "use dash_qwen3_vl"),
        (DashLlava, "dash_llava", Qwen3VLMoeConfig(), "qwen3_vl_moe", "use dash_qwen3_vl"),
        (DashQwen3VL, "dash_qwen3_vl", QWEN, "qwen2_vl", "use dash_qwen2vl"),
        (DashQwen3VL, "dash_qwen3_vl", Qwen2_5_VLConfig(), "qwen2_5_vl", "use dash_qwen2_5_vl"),
        (DashQwen3VL, "dash_qwen3_vl", LLAVA, "llava", "use dash_llava"),
    ],
)
def test_checkpoint_of_another_family_is_refused_before_loading(
    no_weights, config_folder, model_class, name, checkpoint, model_type, advice
):
    checkpoint = checkpoint if isinstance(checkpoint, str) else config_folder(checkpoint)
    served = {DashLlava: "llava, llava_next", DashQwen3VL: "qwen3_vl, qwen3_vl_moe"}.get(
        model_class, "qwen2_vl, qwen2_5_vl"
    )
    message = (
        f"{name} serves model types {served}; the checkpoint pretrained={checkpoint!r} is {model_type!r}; {advice}"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        model_class(pretrained=checkpoint, device_map="cpu")
    assert "pixels" not in str(error.value)  # not the Qwen pixel budget, which the user never set


@pytest.mark.parametrize(
    "model_class, config",
    [(DashQwen2VL, Qwen2_5_VLConfig()), (DashQwen3VL, Qwen3VLConfig()), (DashQwen3VL, Qwen3VLMoeConfig())],
)
def test_family_serves_its_model_types(loaded, config_folder, model_class, config):
    checkpoint = config_folder(config)
    model_class(pretrained=checkpoint)
    assert loaded["pretrained"] == checkpoint


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


@pytest.mark.parametrize(
    "args",
    [
        {"seed": 3.0, "fastv_layer": 1e0, "protect_last": 2.0, "protect_first": "1"},
        {"seed": "3", "fastv_layer": 1, "protect_last": 2, "protect_first": 1.0},
    ],
)
def test_integral_floats_are_ints_for_the_halting_fields_too(loaded, args):
    """lmms-eval's parser makes ``seed=3.0`` and ``fastv_layer=1e0`` floats: accepted as ``batch_size=2.0`` is."""
    DashQwen2VL(pretrained=QWEN, batch_size=2.0, **args)
    press = loaded["press"]
    assert (press.seed, press.fastv_layer, press.protect_last, press.protect_first) == (3, 1, 2, 1)
    assert all(type(getattr(press, name)) is int for name in ("seed", "fastv_layer", "protect_last", "protect_first"))
    loaded.clear()
    DashQwen2VL.create_from_arg_string(f"pretrained={QWEN},seed=3.0,fastv_layer=1e0", {"batch_size": "2"})
    assert (loaded["press"].seed, loaded["press"].fastv_layer) == (3, 1)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"seed": 2.5}, "seed must be an int, got 2.5"),
        ({"fastv_layer": "abc"}, "fastv_layer must be an int, got 'abc'"),
        ({"protect_last": True}, "protect_last must be an int, got True"),
        ({"compression_ratio": "half"}, "compression_ratio must be given as float, got 'half'"),
    ],
)
def test_bad_halting_fields_are_refused_before_loading(no_weights, args, message):
    with pytest.raises(ValueError, match=message):
        DashQwen2VL(pretrained=QWEN, **args)


def test_generation_settings_left_unset_fall_back_to_the_defaults():
    """A task's ``max_new_tokens: None`` is the model's ``max_new_tokens``, generation settings of None are none, and a
    ``doc_to_visual`` returning None gives a request without visuals."""
    from PIL import Image

    lmm = DashQwen2VL(pretrained=QWEN, device_map="cpu", max_new_tokens=2, batch_size=2)
    lmm.task_dict = {"t": {"test": [{"question": "what colour"}] * 3}}
    seen = []
    generate = lmm.vlm.generate_conversations

    def recording(conversations, prompts=None, **kwargs):
        seen.append((len(conversations), kwargs["max_new_tokens"]))
        return generate(conversations, prompts, **kwargs)

    lmm.vlm.generate_conversations = recording
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    settings = [
        ("a?", {"max_new_tokens": None}, lambda doc: [image]),
        ("bb?", None, lambda doc: None),
        ("ccc?", {"max_new_tokens": 1, "until": None}, None),
    ]
    requests = [
        Instance("generate_until", (*request, i, "t", "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, request in enumerate(settings)
    ]
    results = lmm.generate_until(requests)
    assert len(results) == 3 and all(result.token_counts.output_tokens <= 2 for result in results)
    assert sorted(seen) == [(1, 1), (1, 2), (1, 2)]  # one batch per group of settings; unset: the default 2
