"""dash-vlm: training-free DASH token halting for faster vision-language model prefill."""

from dash_vlm.models import supported_model_types
from dash_vlm.press import DeltaPress, PrefillStats
from dash_vlm.vlm import DashVLM, GenerationResult

__all__ = ["DashVLM", "DeltaPress", "GenerationResult", "PrefillStats", "supported_model_types"]
__version__ = "0.1.0"
