"""The pack's ComfyUI nodes, one module per family."""
from . import beyond_clip

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _family in (beyond_clip,):
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
