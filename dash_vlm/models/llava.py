"""LLaVA-1.5 and LLaVA-NeXT: every position the processor filled with image features is eligible."""

from dash_vlm.models import ModelAdapter, register_adapter

LLAVA = register_adapter(
    ModelAdapter(
        model_types=("llava", "llava_next"),
        vision_token_attributes=("image_token_id",),
        vision_tower_attribute="vision_tower",
    )
)
