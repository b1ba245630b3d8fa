"""The only code that touches files: HF folders, the pack's bridge files, ComfyUI's model management."""
