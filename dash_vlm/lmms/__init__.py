"""lmms-eval plugin: the ``dash_*`` models (registered through the ``lmms_eval.models`` entry-point group) and the
task classes behind the repository's ``tasks/`` folder (``dash-vlm tasks`` prints it for ``--include_path``)."""

from __future__ import annotations

MODELS = {
    "dash_qwen2vl": "dash_vlm.lmms.models.DashQwen2VL",
    "dash_qwen2_5_vl": "dash_vlm.lmms.models.DashQwen2_5_VL",
    "dash_qwen3_vl": "dash_vlm.lmms.models.DashQwen3VL",
    "dash_qwen3_5": "dash_vlm.lmms.models.DashQwen3_5",
    "dash_llava": "dash_vlm.lmms.models.DashLlava",
}


def manifests():
    """The model manifests lmms-eval loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODELS.items()]
