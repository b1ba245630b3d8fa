"""The pack's ComfyUI nodes: every module in this folder is one family with its own NODE_CLASS_MAPPINGS."""
import importlib
import pkgutil

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _family = importlib.import_module(f"{__name__}.{_info.name}")
    NODE_CLASS_MAPPINGS.update(getattr(_family, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_family, "NODE_DISPLAY_NAME_MAPPINGS", {}))
