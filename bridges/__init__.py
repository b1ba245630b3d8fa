"""Pure torch: the bridges' modules and math. Nothing in here imports ComfyUI or touches files."""
