"""Training the bridges, pure torch: one Trainer (trainer.py) owns the run loop, the RNG, evaluation, checkpoints'
state and DDP; each family supplies a Task (tasks.py) that gives its batch loss on its data (data.py), with the
losses in losses.py, trainable LoRA factors in lora.py and the decision/router classifier helpers in classify.py.
The host side (caches, run folders, ComfyUI's models) is in loaders/ and engine/."""
