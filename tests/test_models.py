"""The family adapters: their insertion points, their presets and their lmms-eval prompt rules."""

import pytest
from PIL import Image

from dash_vlm import supported_model_types
from dash_vlm.models import adapter_for
from dash_vlm.models.llava import tiny_llava_processor
from dash_vlm.models.presets import PRESETS
from dash_vlm.models.tiny import TEXT, tiny_checkpoint


@pytest.mark.parametrize("model_type", supported_model_types())
def test_adapters_name_the_insertion_points(model_type):
    adapter = adapter_for(model_type)
    model = adapter.tiny_model(model_type)
    assert model.config.model_type == model_type
    layers = adapter.decoder_layers(model)
    assert len(layers) == TEXT["num_hidden_layers"]
    recurrent = adapter.recurrent_layers(model.config)  # a hybrid decoder's linear-attention layers
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"] * len(layers)
    assert recurrent == {index for index, kind in enumerate(kinds) if kind == "linear_attention"}
    assert adapter.hybrid_decoder == bool(recurrent)  # the capability the tests and docs select families by
    for index, layer in enumerate(layers):
        mixer = adapter.token_mixer(layer)
        assert mixer is (layer.linear_attn if index in recurrent else layer.self_attn)
    assert adapter.final_norm(model) is adapter.decoder(model).norm
    blocks = adapter.vision_blocks(model)
    if adapter.is_vision_language:
        tower_modules = list(adapter.vision_tower(model).modules())
        assert len(blocks) == 2 and all(any(block is module for module in tower_modules) for block in blocks)
    else:
        assert blocks is None and adapter.vision_tower(model) is None


def test_presets_come_from_the_families():
    names = [preset.name for model_type in supported_model_types() for preset in adapter_for(model_type).presets]
    assert set(PRESETS) == set(names) >= {"qwen2-vl-7b", "qwen2.5-vl-7b", "llava-1.5-7b", "llava-next-7b", "tiny"}


def test_unsupported_model_types_and_tiny_checkpoints():
    with pytest.raises(ValueError, match="supported model types: .*qwen2_vl"):
        adapter_for("gpt2")
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_checkpoint("llama")


def test_lmms_prompt_rules():
    image = Image.new("RGB", (8, 8))
    conversation, prompt = adapter_for("qwen2_vl").lmms_conversation(
        "<image>What?", [image], None, system_prompt="Be brief."
    )
    assert prompt is None
    assert conversation == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
    ]
    conversation, prompt = adapter_for("llava").lmms_conversation("What?", [image], tiny_llava_processor())
    assert prompt.startswith("A chat between") and prompt.endswith("USER: <image>\nWhat? ASSISTANT:")
    assert conversation == [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "<image>\nWhat?"}]}
    ]
