"""Beyond CLIP: condition Stable Diffusion 1.x and SDXL on LLMs and vision-language models in ComfyUI."""
from .loaders.folders import register_model_folders

register_model_folders()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402  (folders first: dropdowns read them)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
