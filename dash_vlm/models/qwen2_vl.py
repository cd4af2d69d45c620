"""Qwen2-VL and Qwen2.5-VL: image and video placeholders are eligible; M-RoPE positions pass through unchanged."""

from dash_vlm.models import ModelAdapter, register_adapter

QWEN2_VL = register_adapter(
    ModelAdapter(model_types=("qwen2_vl", "qwen2_5_vl"), vision_token_attributes=("image_token_id", "video_token_id"))
)
