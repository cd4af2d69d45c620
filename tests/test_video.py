"""Video through DashVLM and lmms-eval: the frame cap (which frames, never more held), and the inputs of a video
document against lmms-eval's own ``qwen2_vl`` model on the same document."""

from __future__ import annotations

from functools import partial

import av
import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple import qwen2_vl as lmms_qwen2_vl
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor

from dash_vlm import DashVLM
from dash_vlm.lmms.models import DashLlava, DashQwen2VL
from dash_vlm.models import frame_indices
from dash_vlm.shapes.evaluate import model_folder
from dash_vlm.vlm import decode_video

QWEN, LLAVA = model_folder("qwen2-vl"), model_folder("llava")
FRAMES, RATE, STEP = 60, 10, 5  # a 6-second clip at 10 frames a second, read at 2 a second: every 5th frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Frame ``i`` shows ``i // 8`` in its left half and ``i % 8`` in its right half (grey levels 32 apart, well
    clear of the codec's error), so a decoded frame says which one it is."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"qscale": "1"}
        for index in range(FRAMES):
            pixels = np.zeros((64, 64, 3), np.uint8)
            pixels[:, :32], pixels[:, 32:] = 32 * (index // 8), 32 * (index % 8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_number(image) -> int:
    pixels = np.asarray(image, dtype=np.float64)
    return 8 * round(pixels[:, 4:28].mean() / 32) + round(pixels[:, 36:60].mean() / 32)


def test_frame_indices_are_evenly_spaced_and_unique():
    assert frame_indices(12, 4).tolist() == [0, 3, 7, 11]
    assert frame_indices(100, 32)[[0, -1]].tolist() == [0, 99] and len(frame_indices(100, 32)) == 32
    assert frame_indices(5, 32).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="max_frames must be a positive int"):
        frame_indices(5, 0)


def test_generate_keeps_at_most_max_frames(clip):
    vlm = DashVLM.from_pretrained(QWEN, device_map="cpu", compression_ratio=0.5)
    sampled = list(range(0, FRAMES, STEP))  # 12 frames at 2 a second
    frames, rate = decode_video(str(clip), "clip", 4)
    assert [frame_number(frame) for frame in frames] == [sampled[i] for i in (0, 3, 7, 11)]
    assert rate == pytest.approx(RATE / ((sampled[11] - sampled[0]) / 3))  # the kept frames' mean spacing
    frames, rate = decode_video(str(clip), "clip", 32)
    assert [frame_number(frame) for frame in frames] == sampled and rate == pytest.approx(RATE / STEP)
    seen, handle = model_inputs(vlm.model)
    try:
        result = vlm.generate(video=str(clip), prompt="how many circles are there ?", max_frames=4, max_new_tokens=2)
    finally:
        handle.remove()
    assert seen["video_grid_thw"][:, 0].tolist() == [2]  # 4 frames, 2 per temporal patch
    assert result.stats.vision_patches > 0 and result.stats.kept < result.stats.tokens
    with pytest.raises(ValueError, match="max_frames must be a positive int"):
        vlm.generate(video=str(clip), prompt="how many ?", max_frames=0)


def model_inputs(model) -> tuple[dict, object]:
    """The keyword arguments of ``model``'s first forward (the prefill), and the hook's handle."""
    seen = {}

    def record(module, args, kwargs):
        if not seen:
            seen.update({key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)})

    return seen, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("max_num_frames", [4, 32])
def test_lmms_video_matches_lmms_eval_qwen2_vl(clip, max_num_frames, monkeypatch):
    """One video document through ``dash_qwen2vl`` at ratio 0 and through lmms-eval's ``qwen2_vl``: the same prompt,
    the same frames, as video inputs (not images)."""
    # lmms-eval's qwen2_vl resizes for Qwen's 14-pixel patches whatever the checkpoint; the tiny one has 4-pixel ones
    patch = AutoProcessor.from_pretrained(QWEN).image_processor.patch_size
    monkeypatch.setattr(lmms_qwen2_vl, "process_vision_info", partial(process_vision_info, image_patch_size=patch))
    docs = {"video_task": {"test": [{"video": str(clip)}]}}
    context = "how many circles are there ?"
    request = Instance(
        request_type="generate_until",
        arguments=(
            context,
            {"max_new_tokens": 2, "until": ["\n"]},
            lambda doc: [doc["video"]],
            0,
            "video_task",
            "test",
        ),
        idx=0,
        metadata={"task": "video_task", "doc_id": 0, "repeats": 1},
    )
    inputs = {}
    theirs = Qwen2_VL(pretrained=str(QWEN), device="cpu", device_map="cpu", max_num_frames=max_num_frames)
    ours = DashQwen2VL(pretrained=str(QWEN), device_map="cpu", compression_ratio=0.0, max_num_frames=max_num_frames)
    for name, lmm, model in (("theirs", theirs, theirs.model), ("ours", ours, ours.vlm.model)):
        lmm.task_dict = docs
        inputs[name], handle = model_inputs(model)
        try:
            lmm.generate_until([request])
        finally:
            handle.remove()
    assert "pixel_values_videos" in inputs["ours"] and "pixel_values" not in inputs["ours"]
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"):
        torch.testing.assert_close(inputs["ours"][key], inputs["theirs"][key], rtol=0, atol=1e-6, msg=key)
    frames = min(max_num_frames, len(range(0, FRAMES, STEP)))
    assert inputs["ours"]["video_grid_thw"][0, 0].item() == (frames + 1) // 2


def test_llava_lmms_model_rejects_video(clip):
    lmm = DashLlava(pretrained=str(LLAVA), device_map="cpu")
    lmm.task_dict = {"video_task": {"test": [{"video": str(clip)}]}}
    with pytest.raises(NotImplementedError, match="takes images only; video_task gave the video"):
        lmm._visuals(lambda doc: [doc["video"]], "video_task", "test", 0)
