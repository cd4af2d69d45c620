"""Text-only decoders that kvpress supports: the prefill module is the decoder itself."""

from dash_vlm.models import ModelAdapter, register_adapter

TEXT = register_adapter(ModelAdapter(model_types=("llama", "mistral", "qwen2", "qwen3")))
