"""Bad input ends early in a clear error naming the culprit; numeric scalars of any kind are accepted."""

from __future__ import annotations

import gc
import io
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from dash_vlm import DashVLM, DeltaPress
from dash_vlm.models import model_types_with
from dash_vlm.shapes.evaluate import model_folder
from dash_vlm.vlm import VisualLoader, decode_video

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
    loaded = VisualLoader(allow_urls=False, decode_video_files=True).image(path)[0]
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
    loaded = VisualLoader(allow_urls=False, decode_video_files=True).image(path)[0]
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
    """``dash-vlm check leaks`` on the bundled checkpoint, decoder and vision halting, a few calls (its 200-call
    figures are in the README)."""
    from dash_vlm.checks import leaks
    from dash_vlm.shapes.data import read_test_split
    from dash_vlm.shapes.evaluate import model_folder

    sample = read_test_split()[0]
    press = DeltaPress(compression_ratio=0.667, vision_compression_ratio=0.5)
    request = {"image": sample.image, "prompt": sample.question}
    document = leaks.run(model_folder("qwen2-vl"), "dash-shapes", press, request, calls=5, steps=4, device="cpu")
    assert document["passed"], document["cases"]
    assert document["cases"]["hooks"]["value"] == 0 and document["cases"]["halted caches"]["value"] == 0


# Issue 30: consent, downloads, unbounded inputs, late failures (each case: a clear error before model work, or the
# legitimate request done right).


def image_chat(image, text: str = "what colour") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.fixture
def no_model_work(vlm, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(vlm.model, "generate", refuse)
    monkeypatch.setattr(vlm.model, "forward", refuse)
    return vlm


@pytest.fixture(scope="module")
def server(scene, tmp_path_factory):
    """A local HTTP server: /scene.png (the scene), /big.png (the scene's file and 4 kB more), /slow.png (the scene's
    file in pieces), /drip.png (a byte at a time), /redirect.png (to /scene.png)."""
    import http.server
    import threading
    import time

    image, _ = scene
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect.png":
                self.send_response(302)
                self.send_header("Location", "/scene.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/drip.png":  # one byte every 0.05 s for 10 s: never silent, but far too slow
                self.send_response(200)
                self.send_header("Content-Length", "200")
                self.end_headers()
                for _ in range(200):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.05)
                return
            body = png + b"\0" * (4096 if self.path == "/big.png" else 0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/slow.png":  # 16 pieces 0.1 s apart: 1.6 s in all, never 0.3 s of silence
                piece = -(-len(body) // 16)
                for start in range(0, len(body), piece):
                    self.wfile.write(body[start : start + piece])
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", len(png)
    httpd.shutdown()


def test_urls_need_consent_wherever_a_visual_enters(vlm, no_model_work, server):
    base, _ = server
    url = f"{base}/scene.png"
    with pytest.raises(ValueError, match="is a URL; pass allow_urls=True"):
        vlm.generate(image=url, prompt="what colour")
    with pytest.raises(ValueError, match="is a URL; pass allow_urls=True"):
        vlm.generate_conversations([image_chat(url)])
    with pytest.raises(ValueError, match="is a URL; pass allow_urls=True"):
        vlm.score_continuation(image_chat(url), "red")
    video = [
        {"role": "user", "content": [{"type": "video", "video": f"{base}/clip.mp4"}, {"type": "text", "text": "hi"}]}
    ]
    with pytest.raises(ValueError, match="video .* is a URL; pass allow_urls=True"):
        vlm.generate_conversations([video])


def test_lmms_eval_model_asks_for_consent_too(server):
    from lmms_eval.api.instance import Instance

    from dash_vlm.lmms.models import DashQwen2VL

    base, _ = server
    lmm = DashQwen2VL(pretrained=str(QWEN), device_map="cpu")
    lmm.task_dict = {"task": {"test": [{}]}}
    request = Instance(
        request_type="generate_until",
        arguments=("describe", {"max_new_tokens": 2}, lambda doc: [f"{base}/clip.mp4"], 0, "task", "test"),
        idx=0,
        metadata={"task": "task", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(ValueError, match="video .* is a URL; pass allow_urls=True"):
        lmm.generate_until([request])


def test_downloads_are_bounded_in_size_and_time(scene, server, monkeypatch):
    import dash_vlm.vlm as vlm_module

    base, size = server
    image, question = scene
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", allow_urls=True)
    assert answer(vlm, f"{base}/scene.png", question) == answer(vlm, image, question)
    monkeypatch.setattr(vlm_module, "DOWNLOAD_LIMIT_BYTES", size + 100)
    with pytest.raises(ValueError, match=f"big.png' is larger than {size + 100} bytes, the download limit"):
        vlm.generate(image=f"{base}/big.png", prompt=question)
    monkeypatch.setattr(vlm_module, "DOWNLOAD_TIMEOUT_S", 0.3)
    with pytest.raises(ValueError, match="slow.png' did not arrive within 0.3 s"):
        vlm.generate(image=f"{base}/slow.png", prompt=question)
    with pytest.raises(ValueError, match="missing.png' could not be fetched"):
        vlm.generate(image="http://127.0.0.1:9/missing.png", prompt=question)
    monkeypatch.setattr(vlm_module, "DOWNLOAD_TIMEOUT_S", 0.5)
    started = time.monotonic()
    with pytest.raises(ValueError, match="drip.png' did not arrive within 0.5 s"):
        vlm.generate(image=f"{base}/drip.png", prompt=question)
    assert time.monotonic() - started < 3  # the sender never falls silent, and is cut off all the same
    with pytest.raises(ValueError, match="redirect.png' redirects to '/scene.png'; redirects are not followed"):
        vlm.generate(image=f"{base}/redirect.png", prompt=question)


def test_results_keep_no_decoded_pixels_and_still_draw_their_maps(scene, tmp_path, monkeypatch):
    """A result keeps the path it was given, not the decoded image; its halting map reads the file again."""
    import dash_vlm.vlm as vlm_module

    image, question = scene
    path = tmp_path / "scene.png"
    image.resize((300, 300)).save(path)
    decoded = []
    real_open = vlm_module.open_image

    def tracked(data, name):
        picture = real_open(data, name)
        decoded.append(weakref.ref(picture))
        return picture

    monkeypatch.setattr(vlm_module, "open_image", tracked)
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", compression_ratio=0.667)
    results = vlm.generate(image=[path, path], prompt=[question, question], max_new_tokens=2)
    gc.collect()
    assert decoded and all(ref() is None for ref in decoded)  # nothing the results hold keeps a decoded image
    maps = results[0].halting_map()
    in_memory = vlm.generate(image=Image.open(path).convert("RGB"), prompt=question, max_new_tokens=2)
    assert [np.asarray(m).tolist() for m in maps] == [np.asarray(m).tolist() for m in in_memory.halting_map()]
    assert results[0].stats.halted_positions == in_memory.stats.halted_positions


def test_max_frames_is_bounded_by_the_clip_and_absurd_values_are_refused(vlm, no_model_work, scene):
    from dash_vlm.models import MAX_FRAMES_LIMIT, frame_indices

    assert frame_indices(8, MAX_FRAMES_LIMIT).tolist() == list(range(8))  # work bounded by the clip
    with pytest.raises(ValueError, match=f"max_frames must be at most {MAX_FRAMES_LIMIT}"):
        vlm.generate(video=[scene[0]] * 8, prompt="what", max_frames=10**9)
    with pytest.raises(ValueError, match="max_frames must be at most"):
        vlm.generate_conversations(
            [[{"role": "user", "content": [{"type": "video", "video": [scene[0]] * 2, "max_frames": 10**9}]}]]
        )


def test_generation_settings_in_a_generation_config_are_honoured_or_refused_up_front(vlm, scene, monkeypatch):
    from transformers import GenerationConfig

    image, question = scene
    vlm.press = DeltaPress(compression_ratio=0.667)
    by_keyword = vlm.generate(image=[image, image], prompt=[question, "how many shapes"], max_new_tokens=3, num_beams=2)
    by_config = vlm.generate(
        image=[image, image], prompt=[question, "how many shapes"], generation_config=GenerationConfig(num_beams=2)
    )
    assert [r.text for r in by_config] == [r.text for r in by_keyword] and len(by_config) == 2
    vlm.press = DeltaPress()

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(vlm.model, "generate", refuse)
    beams = GenerationConfig(num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="does not take \\{'num_return_sequences': 2\\}"):
        vlm.generate(image=image, prompt=question, generation_config=beams)
    with pytest.raises(ValueError, match="does not take \\{'num_return_sequences': 2\\}"):
        vlm.generate(image=image, prompt=question, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="does not take \\{'return_dict_in_generate': True\\}"):
        vlm.generate(image=image, prompt=question, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="does not take \\{'output_scores': True\\}"):
        vlm.generate(image=image, prompt=question, generation_config=GenerationConfig(output_scores=True))


def test_settings_are_checked_when_the_vlm_is_made(vlm, monkeypatch):
    from kvpress import KnormPress
    from transformers import AutoModelForImageTextToText

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    cases = [
        (dict(max_pixels=10), "min_pixels 256 \\(the processor's default\\) exceeds max_pixels 10"),
        (dict(min_pixels=10**9), "min_pixels 1000000000 exceeds max_pixels 16384 \\(the processor's default\\)"),
        (dict(min_pixels=True), "min_pixels must be a positive int, got True"),
        (dict(cuda_graphs="True"), "cuda_graphs must be True or False, got 'True'"),
        (dict(allow_urls="no"), "allow_urls must be True or False, got 'no'"),
        (dict(press=KnormPress()), "press must be a DeltaPress, got KnormPress"),
        (dict(press="0.5"), "press must be a DeltaPress, got str"),
        (dict(compresion_ratio=0.5), "unknown argument 'compresion_ratio': did you mean .*'compression_ratio'"),
        (dict(start_ratio=0.95), "start_ratio=0.95 .* last of 8 decoder layers.* below 0.875"),
        (dict(vision_compression_ratio=0.5, vision_start_ratio=0.9), "vision_start_ratio=0.9 .* below 0.75"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            DashVLM.from_pretrained(QWEN, device_map="cpu", **kwargs)
    with pytest.raises(ValueError, match="vision_compression_ratio > 0 needs a model whose vision tower can halt"):
        DashVLM.from_pretrained(model_folder("llava"), device_map="cpu", vision_compression_ratio=0.5)
    with pytest.raises(ValueError, match="press must be a DeltaPress, got str"):
        DashVLM(vlm.model, vlm.processor, press="0.5")
    with pytest.raises(ValueError, match="min_pixels .* exceeds max_pixels"):
        DashVLM(vlm.model, vlm.processor, max_pixels=100)
    with pytest.raises(ValueError, match="press must be a DeltaPress, got KnormPress"):
        vlm.press = KnormPress()
    assert isinstance(vlm.press, DeltaPress)


def test_bad_video_frames_and_typed_placeholders_are_named(vlm, no_model_work, scene):
    image, _ = scene
    with pytest.raises(ValueError, match="video is an empty list of frames"):
        vlm.generate(video=[[]], prompt="what")
    with pytest.raises(ValueError, match="video frames must all have one size, got \\[\\(32, 64\\), \\(64, 64\\)\\]"):
        vlm.generate(video=[image.resize((64, 64)), image.resize((32, 64))], prompt="what")
    with pytest.raises(ValueError, match="video frames of 1600x16 px are too thin for qwen-vl-utils"):
        vlm.generate(video=[Image.new("RGB", (1600, 16))] * 4, prompt="what")
    with pytest.raises(ValueError, match="holds the vision placeholder '<\\|image_pad\\|>'"):
        vlm.generate(video=[image] * 4, prompt="what <|image_pad|> is it")
    with pytest.raises(ValueError, match="holds the vision placeholder"):
        vlm.score_continuation(image_chat(image, "is it <|video_pad|>"), "red")
    with pytest.raises(TypeError, match="image must be one image, or a list or tuple of them, got dict"):
        vlm.generate(image={"a": image}, prompt="what")
    with pytest.raises(TypeError, match="image must be one image, or a list or tuple of them, got set"):
        vlm.generate(image={"scene.png"}, prompt="what")


def write_clip(path, frames: int, side: int = 32) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for index in range(frames):
            pixels = np.full((side, side, 3), 30 * index % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def test_short_and_corrupt_clips_given_as_files(vlm, tmp_path):
    """A one-frame clip (qwen-vl-utils reads none under two frames) is decoded by PyAV and answered as its frame;
    a corrupt file is named before any model work."""
    one = tmp_path / "one.mp4"
    write_clip(one, 1)
    chat = [{"role": "user", "content": [{"type": "video", "video": str(one)}, {"type": "text", "text": "what"}]}]
    from_file = vlm.generate_conversations([chat], max_new_tokens=3)[0]
    frames, _ = decode_video(str(one), "one", 32)
    assert len(frames) == 1
    assert from_file.text == vlm.generate(video=[frames], prompt="what", max_new_tokens=3).text
    assert from_file.stats.vision_patches > 0
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0\0\0 ftypisom" + b"garbage" * 100)
    chat[0]["content"][0]["video"] = str(broken)
    with pytest.raises(ValueError, match="broken.mp4' is not a video file PyAV can decode"):
        vlm.generate_conversations([chat])


def test_protect_converts_cleanly_or_is_refused_by_name():
    from dash_vlm.models import adapter_for

    adapter = adapter_for("qwen2_vl")
    model, inputs = adapter.tiny_model("qwen2_vl"), adapter.tiny_inputs("qwen2_vl")["image"]
    length = inputs["input_ids"].shape[1]
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, 10:30] = True
    halted = []
    for protect in (mask, mask.numpy(), mask.tolist()):
        press = DeltaPress(compression_ratio=0.8)
        with torch.no_grad(), press(model, protect=protect):
            model(**inputs)
        halted.append(press.last_stats[0].halted_positions)
    assert halted[0] == halted[1] == halted[2] and not set(halted[0]) & set(range(10, 30))
    for bad, described in ((mask.long().tolist(), "list of torch.int64"), (np.ones(3, bool), "ndarray of torch.bool")):
        with pytest.raises(ValueError, match=f"protect must be a \\[batch, tokens\\] bool mask .* got {described}"):
            with DeltaPress()(model, protect=bad):
                pass
    with pytest.raises(ValueError, match="protect must be .* got object"):
        with DeltaPress()(model, protect=object()):
            pass
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_labels_under_a_halting_press_are_warned_about(caplog):
    from dash_vlm.models import adapter_for

    adapter = adapter_for("qwen2_vl")
    model, inputs = adapter.tiny_model("qwen2_vl"), adapter.tiny_inputs("qwen2_vl")["image"]
    with torch.no_grad(), DeltaPress(compression_ratio=0.0)(model):
        model(**inputs, labels=inputs["input_ids"])
    assert "labels given under a halting press" not in caplog.text
    with torch.no_grad(), DeltaPress(compression_ratio=0.5)(model):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert "labels given under a halting press: the loss also covers the halted positions" in caplog.text
    assert torch.isfinite(loss)


# The first-hour probe's library findings.


def test_a_generation_config_decides_what_it_sets(vlm, scene):
    from transformers import GenerationConfig

    image, question = scene
    vlm.press = DeltaPress(compression_ratio=0.5)
    capped = vlm.generate(image=image, prompt=question, generation_config=GenerationConfig(max_new_tokens=2))
    assert capped.generated_tokens <= 2  # not the default 128
    sampling = dict(do_sample=True, top_k=0, temperature=5.0, max_new_tokens=3)
    answers = []
    for given in (dict(generation_config=GenerationConfig(**sampling)), sampling):
        torch.manual_seed(0)
        answers.append([vlm.generate(image=image, prompt=question, **given).text for _ in range(4)])
    assert answers[0] == answers[1]  # sampled as asked, not made greedy
    vlm.press = DeltaPress()


def test_assigning_the_press_from_another_thread_waits_for_the_call(scene):
    import threading

    image, question = scene
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            vlm.press = DeltaPress(compression_ratio=0.5)
            vlm.press = DeltaPress(compression_ratio=0.0)

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        results = [vlm.generate(image=[image, image], prompt=[question] * 2, max_new_tokens=1) for _ in range(6)]
    finally:
        stop.set()
        thread.join()
    assert all(len(pair) == 2 and pair[0].stats.kept == pair[1].stats.kept for pair in results)


def test_a_large_file_that_is_no_image_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as file:
        file.truncate(2**29)  # 512 MiB of zeros, no disk used
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="huge.png' is not an image file PIL can read"):
            VisualLoader(allow_urls=False, decode_video_files=True).image(sparse)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24


def test_a_halting_map_is_never_drawn_over_a_file_that_changed(vlm, scene, tmp_path):
    image, question = scene
    path = tmp_path / "scene.png"
    image.save(path)
    result = vlm.generate(image=path, prompt=question, max_new_tokens=1)
    assert result.halting_map()
    image.resize((200, 48)).save(path)
    result.__dict__.pop("grids", None)  # drawn again from the file
    with pytest.raises(ValueError, match="scene.png' changed since the model read it"):
        result.halting_map()
    path.unlink()
    with pytest.raises(ValueError, match="scene.png' is gone since it was read"):
        result.halting_map()
    with pytest.raises(ValueError, match="min_height must be a number of pixel rows in \\[0, 8192\\]"):
        result.halting_map(min_height=10**6)
    with pytest.raises(ValueError, match="min_height must be"):
        result.halting_map(min_height="256")


def test_malformed_conversations_and_prompts_are_named_before_model_work(vlm, no_model_work, scene):
    image, _ = scene
    chat = image_chat(image, "what colour")
    cases = [
        ([[]], None, "a conversation must be a non-empty list of messages"),
        ([[{"role": "user", "content": None}]], None, "a conversation must be a non-empty list"),
        ([[{"content": "hi"}]], None, "a conversation must be a non-empty list"),
        ([[{"role": "user", "content": []}]], None, "a message has no text and no image or video"),
        ([[{"role": "user", "content": [{"type": "text", "text": "  "}]}]], None, "a message has no text"),
        ([chat], [None], "prompts\\[0\\] must be a non-empty string"),
        ([chat], [""], "prompts\\[0\\] must be a non-empty string"),
        ([chat], ["<|im_start|>user hi<|im_end|>"], "prompts\\[0\\] holds 0 '<\\|image_pad\\|>' placeholders for 1"),
        (
            [[{"role": "user", "content": [{"type": "text", "text": "q"}]}]],
            ["<|vision_start|><|image_pad|><|vision_end|>hi"],
            "prompts\\[0\\] holds 1 '<\\|image_pad\\|>' placeholders for 0 images",
        ),
    ]
    for conversations, prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            vlm.generate_conversations(conversations, prompts)
    with pytest.raises(ValueError, match="holds the vision placeholder '<\\|image_pad\\|>'"):
        vlm.score_continuation(chat, "<|image_pad|>")
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        vlm.score_continuation(chat, "red", prompt="")
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        vlm.generate(image=image, prompt=b"what")
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        vlm.generate(image=[image, image], prompt=["what", None])


def test_loading_arguments_are_checked_before_any_file_is_read(vlm, monkeypatch, tmp_path):
    from transformers import AutoModelForImageTextToText

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    for device_map in ("meta", "mps", ["cpu"], {"": "meta"}):
        with pytest.raises(ValueError, match="device_map must be cpu, cuda, cuda:N"):
            DashVLM.from_pretrained(QWEN, device_map=device_map)
    for dtype in ("bf16", torch.int8, 123):
        with pytest.raises(ValueError, match="dtype must be 'auto', a floating torch dtype or its name"):
            DashVLM.from_pretrained(QWEN, device_map="cpu", dtype=dtype)
    for name in (None, 123, ""):
        with pytest.raises(TypeError, match="name_or_path must be a hub id or a folder"):
            DashVLM.from_pretrained(name)
    with pytest.raises(ValueError, match="config.json' is a file; give the checkpoint's folder"):
        DashVLM.from_pretrained(QWEN / "config.json")
    with pytest.raises(ImportError, match="attn_implementation='flash_attention_2' needs the flash-attn package"):
        DashVLM.from_pretrained(QWEN, device_map="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(TypeError, match="DashVLM takes a transformers model and its processor, got .* NoneType"):
        DashVLM(vlm.model, None)
    with pytest.raises(TypeError, match="press\\(model\\) takes a model"):
        with DeltaPress()(vlm.model.config):
            pass


def test_odd_but_legitimate_inputs(vlm, scene, monkeypatch):
    image, question = scene
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    assert answer(vlm, pixels.bfloat16(), question) == answer(vlm, pixels.bfloat16().float(), question)
    frames = [np.asarray(image)] * 4  # a video as a list of array frames
    assert (
        vlm.generate(video=frames, prompt=question, max_new_tokens=2).text
        == vlm.generate(video=[image] * 4, prompt=question, max_new_tokens=2).text
    )
    with pytest.raises(ValueError, match="image array holds NaN values"):
        vlm.generate(image=np.full((8, 8, 3), np.nan, np.float32), prompt=question)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with pytest.raises(ValueError, match="is larger than PIL allows"):
        vlm.generate(image=buffer.getvalue(), prompt=question)


def test_protect_under_beam_search_is_given_per_beam_and_a_bare_mask_is_refused_with_the_way():
    from dash_vlm.models import adapter_for

    adapter = adapter_for("qwen2_vl")
    model, inputs = adapter.tiny_model("qwen2_vl"), adapter.tiny_inputs("qwen2_vl")["image"]
    protect = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    protect[0, 10:30] = True
    press = DeltaPress(compression_ratio=0.8)
    with pytest.raises(ValueError, match="beam search expands each prompt in place: give protect.repeat_interleave"):
        with torch.no_grad(), press(model, protect=protect):
            model.generate(**inputs, num_beams=2, max_new_tokens=2, do_sample=False)
    with torch.no_grad(), press(model, protect=protect.repeat_interleave(2, 0)):
        model.generate(**inputs, num_beams=2, max_new_tokens=2, do_sample=False)
    assert len(press.last_stats) == 2
    assert all(s.kept < s.tokens and not set(s.halted_positions) & set(range(10, 30)) for s in press.last_stats)


def test_a_video_file_qwen_vl_utils_cannot_read_is_named(vlm, no_model_work, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_clip(clip, 8)
    entry = {"type": "video", "video": str(clip), "nframes": 1000}  # more frames than the file has
    with pytest.raises(ValueError, match="qwen-vl-utils could not read the video file"):
        vlm.generate_conversations([[{"role": "user", "content": [entry, {"type": "text", "text": "what"}]}]])


def test_a_video_in_a_conversation_for_a_model_without_video_is_refused():
    chat = [{"role": "user", "content": [{"type": "video", "video": [Image.new("RGB", (32, 32))] * 2}]}]
    llava = DashVLM.from_pretrained(model_folder("llava"), device_map="cpu")
    with pytest.raises(
        ValueError, match=f"video is supported for model types {', '.join(model_types_with('video'))}, not 'llava'"
    ):
        llava.generate_conversations([chat])
