"""Bad input ends early in a clear error naming the culprit; numeric scalars of any kind are accepted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
