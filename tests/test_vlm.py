"""DashVLM and ``dash-vlm generate`` on tiny checkpoints saved as ordinary HF folders and loaded back offline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dash_vlm import DashVLM, GenerationResult
from dash_vlm.cli import main as cli_main
from dash_vlm.models import model_types_with
from dash_vlm.models.tiny import TEXT, tiny_checkpoint

WORDS = "what colour is the shape how many red blue left right describe image".split()
FAMILIES = model_types_with("is_vision_language")
NEW_TOKENS = 6


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        model, processor = tiny_checkpoint(family, WORDS, seed=3)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (height, width) in enumerate([(40, 56), (64, 48), (32, 32)]):  # multiples of 8: no Qwen resize
        paths.append(folder / f"image{i}.png")
        random_image(height, width, seed=i).save(paths[-1])
    return paths


def plain_transformers(folder, prompts: list[str], images: list[list]) -> list[str]:
    """The answer of unmodified transformers: the chat template, the processor, greedy ``generate``."""
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    texts, flat_images = [], []
    for prompt, sample_images in zip(prompts, images, strict=True):
        loaded = [Image.open(path).convert("RGB") for path in sample_images]
        content = [{"type": "image", "image": image} for image in loaded] + [{"type": "text", "text": prompt}]
        chat = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
        flat_images += loaded
    inputs = processor(text=texts, images=flat_images, padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return [text.strip() for text in processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], True)]


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_equals_plain_transformers(checkpoints, image_files, family):
    vlm = DashVLM.from_pretrained(checkpoints[family], compression_ratio=0.0)
    prompts = ["What colour is the shape?", "how many red shape left of the blue"]
    images = [[image_files[0]], [image_files[1], image_files[2]]]
    expected = plain_transformers(checkpoints[family], prompts, images)
    assert [
        vlm.generate(image=i, prompt=p, max_new_tokens=NEW_TOKENS).text for p, i in zip(prompts, images, strict=True)
    ] == expected
    batch = vlm.generate(image=images, prompt=prompts, max_new_tokens=NEW_TOKENS)
    assert [result.text for result in batch] == expected
    assert all(result.stats.kept == result.stats.tokens for result in batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics(checkpoints, image_files, family):
    vlm = DashVLM.from_pretrained(checkpoints[family], compression_ratio=0.5)
    prompt = "describe the image"
    result = vlm.generate(image=image_files[:2], prompt=prompt, max_new_tokens=NEW_TOKENS)
    assert isinstance(result, GenerationResult)
    assert isinstance(result.text, str) and result.text
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.open(p)} for p in image_files[:2]]}]
    conversation[0]["content"].append({"type": "text", "text": prompt})
    inputs = vlm.adapter.processor_inputs(vlm.processor, [conversation])
    ids = inputs["input_ids"][0]
    image_positions = (ids == vlm.model.config.image_token_id).nonzero().flatten().tolist()
    stats = result.stats
    layers = TEXT["num_hidden_layers"]
    assert stats.tokens == len(ids)
    assert stats.eligible == len(image_positions) > 0
    assert stats.kept == stats.tokens - round(0.5 * stats.eligible)
    assert stats.decision_layer == math.floor(0.4 * layers)
    assert len(stats.halted_positions) == stats.tokens - stats.kept
    assert set(stats.halted_positions) <= set(image_positions)
    assert stats.halted_positions == sorted(stats.halted_positions)
    per_position = 2 * TEXT["num_key_value_heads"] * TEXT["head_dim"] * 4  # keys and values, float32
    kinds = getattr(vlm.model.config.get_text_config(), "layer_types", None) or ["full_attention"] * layers
    attention = [index for index, kind in enumerate(kinds) if kind == "full_attention"]  # recurrent ones hold none
    deep = sum(index > stats.decision_layer for index in attention)
    assert stats.kv_cache_bytes == per_position * (stats.tokens * (len(attention) - deep) + stats.kept * deep)
    assert stats.prefill_ms > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "qwen3_vl", "qwen3_vl_moe"])
def test_batch_equals_single_calls(checkpoints, image_files, family):
    vlm = DashVLM.from_pretrained(checkpoints[family], compression_ratio=0.667)
    prompts = ["what colour is the shape", "how many red", "describe the image left and right"]
    images = [image_files[0], [image_files[1], image_files[2]], None]
    batch = vlm.generate(image=images, prompt=prompts, max_new_tokens=NEW_TOKENS)
    for prompt, image, batched in zip(prompts, images, batch, strict=True):
        alone = vlm.generate(image=image, prompt=prompt, max_new_tokens=NEW_TOKENS)
        assert batched.text == alone.text
        for name in ("tokens", "eligible", "kept", "decision_layer", "halted_positions", "kv_cache_bytes"):
            assert getattr(batched.stats, name) == getattr(alone.stats, name), name
    assert batch[2].stats.eligible == 0


def write_video(path, frames: int = 8, fps: int = 4) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            array = np.asarray(random_image(48, 64, seed=10 + i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("family", model_types_with("video"))
def test_qwen_video_file_and_frames(checkpoints, tmp_path, family):
    vlm = DashVLM.from_pretrained(checkpoints[family], compression_ratio=0.5)
    video_id = vlm.model.config.video_token_id
    path = tmp_path / "clip.mp4"
    write_video(path)
    frames = [random_image(48, 64, seed=10 + i) for i in range(4)]
    for video in (path, frames):
        result = vlm.generate(video=video, prompt="describe the image", max_new_tokens=NEW_TOKENS)
        assert result.stats.eligible > 0 and result.stats.kept == result.stats.tokens - round(
            0.5 * result.stats.eligible
        )
    conversation = [[{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "x"}]}]]
    ids = vlm.adapter.processor_inputs(vlm.processor, conversation)["input_ids"][0]
    assert vlm.generate(video=frames, prompt="x", max_new_tokens=1).stats.eligible == (ids == video_id).sum().item()


@pytest.mark.parametrize("family", model_types_with("pixel_limits"))
def test_pixel_limits_change_the_token_count(checkpoints, image_files, family):
    small = DashVLM.from_pretrained(checkpoints[family], max_pixels=16 * 16 * 4)
    large = DashVLM.from_pretrained(checkpoints[family], min_pixels=64 * 64, max_pixels=128 * 128)
    tokens = [vlm.generate(image=image_files[0], prompt="x", max_new_tokens=1).stats.eligible for vlm in (small, large)]
    assert tokens[0] < tokens[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])  # the CLI and lmms-eval pass the name
def test_loading_options(checkpoints, image_files, dtype):
    vlm = DashVLM.from_pretrained(
        checkpoints["llava"], start_ratio=0.6, scope="all", attn_implementation="eager", dtype=dtype
    )
    assert vlm.model.config._attn_implementation == "eager" and vlm.model.dtype == torch.bfloat16
    assert (vlm.press.start_ratio, vlm.press.scope) == (0.6, "all")
    stats = vlm.generate(image=image_files[0], prompt="what", max_new_tokens=2).stats
    assert stats.decision_layer == 3 and stats.eligible == stats.tokens - 1  # scope "all": every token but the last


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda image, text: dict(image="missing.png", prompt="x"), FileNotFoundError, "missing.png"),
        (lambda image, text: dict(image=[image, text], prompt="x"), ValueError, "notes.txt"),
        (lambda image, text: dict(image=image, prompt=""), ValueError, "prompt"),
        (lambda image, text: dict(image=image, prompt="   "), ValueError, "prompt"),
        (lambda image, text: dict(image=image, prompt=[]), ValueError, "prompt"),
        (lambda image, text: dict(image=[image], prompt=["a", "b"]), ValueError, "one entry per prompt"),
        (lambda image, text: dict(image=image, prompt=["a", "b"]), ValueError, "one entry per prompt"),
        (lambda image, text: dict(image="https://example.com/cat.jpg", prompt="x"), ValueError, "allow_urls"),
        (lambda image, text: dict(image=image, prompt="x", max_new_tokens=0), ValueError, "max_new_tokens"),
        (
            lambda image, text: dict(image=image, prompt="x", num_return_sequences=2),
            ValueError,
            "does not take \\{'num_return_sequences': 2\\}",
        ),
        (lambda image, text: dict(video=[Image.open(image)], prompt="x"), ValueError, "video is supported for"),
    ],
)
def test_bad_input_raises_before_model_work(checkpoints, image_files, tmp_path, monkeypatch, call, error, match):
    vlm = DashVLM.from_pretrained(checkpoints["llava"])
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")

    monkeypatch.setattr(vlm.model, "generate", no_model_work)
    with pytest.raises(error, match=match):
        vlm.generate(**call(image_files[0], not_an_image))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(compression_ratio=-0.1), "compression_ratio"),
        (dict(start_ratio=1.5), "start_ratio"),
        (dict(scope="image"), "scope"),
    ],
)
def test_bad_halting_parameters_raise_before_loading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DashVLM.from_pretrained(tmp_path / "no-such-checkpoint", **kwargs)


def test_unsupported_or_mismatched_checkpoints(checkpoints, tmp_path):
    families = ", ".join(model_types_with("pixel_limits"))
    with pytest.raises(ValueError, match=f"min_pixels / max_pixels apply to model types {families}"):
        DashVLM.from_pretrained(checkpoints["llava"], max_pixels=1000)
    with pytest.raises(ValueError, match="min_pixels 5000 exceeds max_pixels 1000"):
        DashVLM.from_pretrained(checkpoints["qwen2_vl"], min_pixels=5000, max_pixels=1000)
    from dash_vlm.models.text import tiny_text_model

    tiny_text_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text-only"):
        DashVLM.from_pretrained(tmp_path)


def test_cli_generate_compare(checkpoints, image_files, capsys):
    cli_main(
        [
            "generate",
            "--model",
            str(checkpoints["qwen2_vl"]),
            "--image",
            str(image_files[0]),
            str(image_files[1]),
            "--prompt",
            "what colour is the shape",
            "--max-new-tokens",
            "4",
            "--compare",
        ]
    )
    output = capsys.readouterr().out
    vlm = DashVLM.from_pretrained(checkpoints["qwen2_vl"])
    expected = vlm.generate(image=image_files[:2], prompt="what colour is the shape", max_new_tokens=4)
    assert f"DASH 0.667: {expected.text}\n" in output
    assert "vanilla: " in output and "prefill ms" in output and "KV MB" in output
    rows = [line.split() for line in output.splitlines() if line.startswith(("vanilla ", "DASH 0.667 "))]
    vanilla, dash = rows[-2], rows[-1]
    assert vanilla[1] == dash[2] == str(expected.stats.tokens)  # the same prompt in both runs
    assert vanilla[3] == vanilla[1] and dash[4] == str(expected.stats.kept)


def test_cli_generate_writes_one_halting_map_per_image(checkpoints, image_files, tmp_path, capsys):
    target = tmp_path / "map.png"
    argv = ["generate", "--model", str(checkpoints["llava"]), "--image", *map(str, image_files[:2])]
    cli_main([*argv, "--prompt", "what colour", "--max-new-tokens", "2", "--halting-map", str(target)])
    paths = [tmp_path / "map-1.png", tmp_path / "map-2.png"]
    assert f"halting map: {paths[0]}, {paths[1]}" in capsys.readouterr().out
    for path in paths:
        with Image.open(path) as picture:
            assert picture.height >= 256
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", str(checkpoints["llava"]), "--prompt", "what", "--halting-map", str(target)])
    assert "--halting-map needs an image" in capsys.readouterr().err


def test_offloaded_device_map_gives_the_same_answers(checkpoints, image_files, tmp_path):
    """A device map that offloads the deeper decoder layers to disk, through from_pretrained's ordinary options."""
    device_map = {name: "cpu" for name in ("model.visual", "model.language_model.embed_tokens", "lm_head")}
    device_map |= {"model.language_model.rotary_emb": "cpu", "model.language_model.norm": "cpu"}
    device_map |= {
        f"model.language_model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(TEXT["num_hidden_layers"])
    }
    offloaded = DashVLM.from_pretrained(checkpoints["qwen2_vl"], device_map=device_map, offload_folder=str(tmp_path))
    in_memory = DashVLM.from_pretrained(checkpoints["qwen2_vl"])
    prompts = ["what colour is the shape", "how many red"]
    images = [image_files[0], image_files[1]]
    for actual, expected in zip(
        offloaded.generate(image=images, prompt=prompts, max_new_tokens=NEW_TOKENS),
        in_memory.generate(image=images, prompt=prompts, max_new_tokens=NEW_TOKENS),
        strict=True,
    ):
        assert actual.text == expected.text and actual.stats.halted_positions == expected.stats.halted_positions
