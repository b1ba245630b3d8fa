"""Running workflows without a browser: a real ComfyUI in-process, small built-in models, a workflow runner."""
