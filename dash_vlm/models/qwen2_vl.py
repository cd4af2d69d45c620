"""Qwen2-VL and Qwen2.5-VL: image and video placeholders are eligible; M-RoPE positions pass through unchanged.

Images and videos go through ``qwen-vl-utils`` (the resizing the Qwen checkpoints were trained with) before the
processor, under the same pixel budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_vl_utils import process_vision_info
from transformers import ProcessorMixin

from dash_vlm.models import ModelAdapter, register_adapter


@dataclass(frozen=True)
class QwenVLAdapter(ModelAdapter):
    def vision_inputs(
        self, processor: ProcessorMixin, items: list[dict], min_pixels: int | None, max_pixels: int | None
    ) -> dict:
        size = processor.image_processor.size
        limits = {
            "min_pixels": size["shortest_edge"] if min_pixels is None else min_pixels,
            "max_pixels": size["longest_edge"] if max_pixels is None else max_pixels,
        }
        images, videos, video_kwargs = process_vision_info(
            [[{"role": "user", "content": [item | limits for item in items]}]],
            return_video_kwargs=True,
            image_patch_size=processor.image_processor.patch_size,
        )
        # Frames were sampled already; every video here is a frame list at the same sampling rate.
        video_kwargs = {"do_sample_frames": False, "fps": video_kwargs["fps"][0]} if videos else {}
        return {"images": images, "videos": videos, **limits, **video_kwargs}


QWEN2_VL = register_adapter(
    QwenVLAdapter(
        model_types=("qwen2_vl", "qwen2_5_vl"),
        vision_token_attributes=("image_token_id", "video_token_id"),
        video=True,
        pixel_limits=True,
        vision_tower_attribute="visual",
    )
)
