"""Bad input ends early in a clear error naming the culprit; numeric scalars of any kind are accepted."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.shapes.evaluate import model_folder

QWEN = model_folder("qwen2-vl")


def test_numpy_scalars_are_accepted_as_python_numbers():
    press = DeltaPress(
        compression_ratio=np.float32(0.5), start_ratio=np.float64(0.25), seed=np.int64(3), protect_last=np.int32(2)
    )
    assert (press.compression_ratio, press.start_ratio, press.seed, press.protect_last) == (0.5, 0.25, 3, 2)
    assert type(press.compression_ratio) is float and type(press.seed) is int
    for bad in (float("nan"), np.float32(1.0), "0.5", True):
        with pytest.raises(ValueError, match="compression_ratio must be a number in"):
            DeltaPress(compression_ratio=bad)


@pytest.fixture(scope="module")
def vlm():
    return DashVLM.from_pretrained(QWEN, device_map="cpu")


def test_generate_rejects_bad_prompts_and_conversations_before_model_work(vlm, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(vlm.model, "generate", no_model_work)
    monkeypatch.setattr(vlm, "processor", no_model_work)
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings, got NoneType"):
        vlm.generate(prompt=None)
    with pytest.raises(TypeError, match="prompt must be .* got int"):
        vlm.generate(prompt=5)
    with pytest.raises(ValueError, match="conversations must hold at least one conversation"):
        vlm.generate_conversations([])
    chat = [{"role": "user", "content": [{"type": "text", "text": "what colour"}]}]
    with pytest.raises(ValueError, match="prompts must have one entry per conversation \\(2\\), got 1"):
        vlm.generate_conversations([chat, chat], prompts=["one"])


@pytest.mark.parametrize("device_map", ["cuda", "cuda:1", {"": 0}])
def test_a_gpu_device_map_without_a_gpu_fails_before_loading(device_map, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device_map=.* asks for a GPU, but torch sees none"):
        DashVLM.from_pretrained(QWEN, device_map=device_map)


@pytest.fixture(scope="module")
def scene():
    from dash_vlm.shapes.data import read_test_split

    sample = read_test_split()[3]
    return sample.image.convert("RGB"), sample.question


def answer(vlm, image, question) -> str:
    return vlm.generate(image=image, prompt=question, max_new_tokens=4).text


def test_arrays_tensors_and_bytes_are_images(vlm, scene, tmp_path):
    image, question = scene
    expected = answer(vlm, image, question)
    pixels = np.asarray(image)
    path = tmp_path / "scene.png"
    image.save(path)
    for given in (
        pixels,  # [height, width, 3] uint8
        pixels.transpose(2, 0, 1).astype(np.float32) / 255,  # [3, height, width] floats in [0, 1]
        torch.from_numpy(pixels.copy()),
        path.read_bytes(),
    ):
        assert answer(vlm, given, question) == expected
    assert [r.text for r in vlm.generate(image=[pixels, path], prompt=[question, question], max_new_tokens=4)] == [
        expected,
        expected,
    ]
    with pytest.raises(ValueError, match="image array must be .* got shape \\(2, 5, 7, 3\\)"):
        vlm.generate(image=np.zeros((2, 5, 7, 3), dtype=np.uint8), prompt=question)
    with pytest.raises(ValueError, match="image array must hold uint8 values or floats in \\[0, 1\\], got int64"):
        vlm.generate(image=np.zeros((8, 8, 3), dtype=np.int64), prompt=question)
    with pytest.raises(TypeError, match="image must be a path, URL, bytes, PIL image, numpy array or torch tensor"):
        vlm.generate(image=[3.5], prompt=question)
    with pytest.raises(ValueError, match="is empty \\(0x0 pixels\\)"):
        vlm.generate(image=Image.new("RGB", (0, 0)), prompt=question)


def test_sixteen_bit_images_are_answered_as_their_content(vlm, scene, tmp_path):
    image, question = scene
    gray = image.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # mode I;16, the same picture
    path = tmp_path / "scene16.png"
    sixteen.save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = vlm._load_image(path)
    assert np.array_equal(np.asarray(loaded), np.asarray(gray.convert("RGB")))  # not clipped to white
    assert answer(vlm, path, question) == answer(vlm, gray.convert("RGB"), question)


def test_exif_orientation_is_applied(vlm, scene, tmp_path):
    image, _ = scene
    upright = image.resize((96, 64))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for orientation 6 ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with this tag: "rotate 90 degrees clockwise to view"
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    loaded = vlm._load_image(path)
    assert loaded.size == upright.size
    difference = np.abs(np.asarray(loaded, dtype=float) - np.asarray(upright, dtype=float)).mean()
    assert difference < 8  # JPEG noise only; sideways it differs by far more
    sideways = np.abs(np.asarray(stored.resize(upright.size), dtype=float) - np.asarray(upright, dtype=float)).mean()
    assert sideways > 4 * difference


def test_beam_search_gives_one_result_per_prompt_as_transformers_does(vlm, scene):
    image, question = scene
    vlm.press = DeltaPress(compression_ratio=0.0)
    results = vlm.generate(image=[image, image], prompt=[question, "how many shapes"], max_new_tokens=4, num_beams=2)
    assert len(results) == 2  # one result and one PrefillStats per prompt, not per beam
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        for text in (question, "how many shapes")
    ]
    inputs = vlm.adapter.processor_inputs(vlm.processor, chats)
    with torch.inference_mode():
        plain = vlm.model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    texts = vlm.processor.batch_decode(plain[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [r.text for r in results] == [text.strip() for text in texts]
    halted = DeltaPress(compression_ratio=0.667)
    vlm.press = halted
    results = vlm.generate(image=[image, image], prompt=[question, "how many shapes"], max_new_tokens=4, num_beams=2)
    assert [r.stats.kept < r.stats.tokens for r in results] == [True, True]
    vlm.press = DeltaPress()


def test_presses_do_not_nest_and_threads_take_turns(vlm, scene):
    import threading

    model = vlm.model
    with DeltaPress()(model):
        with pytest.raises(NotImplementedError, match="DASH presses do not nest"), DeltaPress()(model):
            pass
    with DeltaPress()(model):  # the failed inner press left nothing behind
        pass
    image, question = scene
    questions = [question, "how many shapes", "is there a circle", "what colour is the square"]
    expected = [answer(vlm, image, text) for text in questions]
    other = DashVLM.from_pretrained(QWEN, device_map="cpu")
    answers: dict[tuple[int, int], str] = {}

    def ask(worker: int, instance: DashVLM) -> None:
        for index, text in enumerate(questions):
            answers[(worker, index)] = answer(instance, image, text)

    threads = [threading.Thread(target=ask, args=(worker, vlm if worker < 2 else other)) for worker in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answers[(worker, index)] == expected[index] for worker in range(3) for index in range(len(questions)))


def test_unsupported_uses_of_the_press_are_named():
    from kvpress import ComposedPress

    from dash_vlm.models import adapter_for

    model = adapter_for("qwen2_vl").tiny_model("qwen2_vl", "eager")
    inputs = adapter_for("qwen2_vl").tiny_inputs("qwen2_vl")["image"]
    with pytest.raises(NotImplementedError, match="cannot run inside kvpress's ComposedPress"):
        with torch.no_grad(), ComposedPress([DeltaPress()])(model):
            model(**inputs)
    with pytest.raises(NotImplementedError, match="needs transformers' DynamicCache, got StaticCache"):
        with torch.no_grad(), DeltaPress()(model):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="output_attentions=True"), torch.no_grad(), DeltaPress()(model):
        model(**inputs, output_attentions=True)
    model.config.output_hidden_states = True
    try:
        with pytest.raises(ValueError, match="output_hidden_states=True"), torch.no_grad(), DeltaPress()(model):
            model(**inputs)
    finally:
        model.config.output_hidden_states = False
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_nothing_keeps_a_deleted_model_alive_without_the_cyclic_collector(scene):
    image, question = scene
    gc.collect()
    gc.disable()
    try:
        vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", compression_ratio=0.667, vision_compression_ratio=0.5)
        vlm.generate(image=image, prompt=question, max_new_tokens=4)
        press = vlm.press
        weight = weakref.ref(vlm.model.model.language_model.layers[0].mlp.up_proj.weight)
        del vlm
        assert weight() is None and press.last_stats[0].kept < press.last_stats[0].tokens
        model = DashVLM.from_pretrained(QWEN, device_map="cpu").model
        with torch.no_grad(), press(model):
            model(**{k: v for k, v in _inputs(model, image, question).items()})
        weight = weakref.ref(model.model.language_model.layers[0].mlp.up_proj.weight)
        del model
        assert weight() is None and press.last_stats
    finally:
        gc.enable()


def test_fast_path_keeps_nothing_alive():
    """The fast path's decoder (its graphs, buffers and the decoder stack it stands in with) holds the model only
    through the DashVLM: with the garbage collector off, ``del vlm`` frees the weights (here its CPU form, the same
    objects as on a GPU, where the captured graphs hold memory but no Python reference)."""
    from dash_vlm.graphs import StaticDecoder
    from dash_vlm.shapes.data import read_test_split

    sample = read_test_split()[0]
    gc.collect()
    gc.disable()
    try:
        vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", compression_ratio=0.667)
        vlm.fast = StaticDecoder(vlm.model, capture=False)
        vlm.generate(image=sample.image, prompt=sample.question, max_new_tokens=4)
        assert vlm.fast.prefill_graphs and vlm.fast.graphs
        weight = weakref.ref(vlm.model.model.language_model.layers[0].mlp.up_proj.weight)
        del vlm
        assert weight() is None
    finally:
        gc.enable()


def _inputs(model, image, question) -> dict:
    from transformers import AutoProcessor

    from dash_vlm.models import adapter_for

    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return dict(adapter_for(model).processor_inputs(AutoProcessor.from_pretrained(QWEN), [chat]))


def test_a_missing_local_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a local path that does not exist"):
        DashVLM.from_pretrained(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(FileNotFoundError, match="local path that does not exist"):
        DashVLM.from_pretrained("./no-such-checkpoint")


def test_repeated_calls_leave_no_hooks_and_no_halted_caches():
    """The leak script on a few calls (its 200-call memory figure is in the README)."""
    from leak_check import main as leak_check

    result = leak_check(["--calls", "5"])
    assert result["hooks_left"] == 0 and result["halted_layers_alive"] == 0
