"""A small CLIP vision tower with seeded random weights, as ComfyUI's CLIP_VISION and as transformers'
CLIPVisionModelWithProjection (the same weights in both).

ComfyUI's stock "Load CLIP Vision" picks its architecture from the layer count in the file (ViT-L/H/G only) and
cannot build a small tower, so the tests and the workflow runner use the node below in its place: the host's own
ClipVisionModel class at a small width, so GILL meets the real encode_image path. Imports nothing of the pack; comfy
is imported inside the functions (after a host has booted).
"""
import json
import os
import tempfile

import torch

WIDTH = 64  # hidden size: GILL's visual_embeddings read this many features
CONFIG = {"hidden_size": WIDTH, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 224, "patch_size": 32, "projection_dim": 32, "hidden_act": "quick_gelu"}


def hf_tower(seed=0):
    """transformers' CLIPVisionModelWithProjection at the small size, seeded."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(100 + seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CONFIG)).eval()
    with torch.no_grad():  # values exact in fp16, so ComfyUI's half-precision copy holds the very same weights
        for name, p in model.named_parameters():
            # attention 4x stronger (a power of two: still exact in fp16): at the default init the class token
            # is mostly its own embedding, and two different pictures give nearly the same pooled output
            p.copy_((p * 4 if ".out_proj." in name else p).half().float())
    return model


_TOWERS = {}


def comfy_tower(seed=0):
    """The same weights as hf_tower(seed) in ComfyUI's ClipVisionModel, built once per process."""
    if seed not in _TOWERS:
        import comfy.clip_vision
        hf = hf_tower(seed)
        config = dict(CONFIG, num_channels=3, model_type="clip_vision_model", layer_norm_eps=1e-5)
        # The host reads its config from a json file while the model is built.
        with tempfile.TemporaryDirectory(prefix="beyond-clip-vision-") as tmp:
            path = os.path.join(tmp, "tiny_clip_vision.json")
            with open(path, "w") as f:
                json.dump(config, f)
            tower = comfy.clip_vision.ClipVisionModel(path)
        missing, _ = tower.load_sd({k: v for k, v in hf.state_dict().items() if "position_ids" not in k})
        if missing:
            raise RuntimeError(f"the small CLIP vision tower left weights unset: {missing[:5]}")
        _TOWERS[seed] = tower
    return _TOWERS[seed]


class TinyCLIPVisionLoader:
    """Stands in for the stock 'Load CLIP Vision' in tests and in the runner when no tower file is present."""
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "Beyond CLIP/testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 10})}}

    def load(self, seed):
        return (comfy_tower(seed),)
