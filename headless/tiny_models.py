"""Small Stable Diffusion models with seeded random weights, built from ComfyUI's own classes.

Tests and the offline demo need a MODEL, CLIP and VAE that the stock nodes (CLIPTextEncode, KSampler,
VAEDecode, the Conditioning* nodes) accept, without downloading a checkpoint. The stock checkpoint
loaders cannot build them: model detection only knows full-size UNets. Everything here is the host's
own code at a small width, so the pack's nodes meet the real conditioning, sampling and decoding paths.

Import this module only after a ComfyUI host has been booted: comfy is imported inside the functions.
Works with the March 2024 and the October 2025 ComfyUI releases.
"""
import functools
import json
import os
import tempfile

import torch

from .tiny_clip_vision import TinyCLIPVisionLoader
from .tiny_text_encoders import TinyTextEncoderLoader

ARCHES = ("sd15", "sdxl")

_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "use_spatial_transformer": True, "legacy": False, "transformer_depth_middle": 1,
    "use_temporal_attention": False, "use_temporal_resblock": False,
    # float32 on every device: the model is tiny, and the sampled images stay reproducible.
    "dtype": torch.float32,
}
# Same layout as the full models: SD1.5 attends at every level, SDXL only below the first one.
_UNET = {
    "sd15": {"context_dim": 768, "adm_in_channels": None, "use_linear_in_transformer": False,
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1]},
    "sdxl": {"context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential",
             "use_linear_in_transformer": True,
             "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1]},
}

_VAE_PARAMS = {
    "embed_dim": 4,
    # Four levels: 8x downscale and 4 latent channels, as in the SD VAE.
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                 "dropout": 0.0},
}


def _text_config(width, heads, activation):
    # Widths are fixed by the conditioning the UNets expect (768, 1280); depth and MLP size are not.
    # Three layers, because SDXL reads the penultimate layer and SDClipModel asserts |layer_idx| < layers.
    return {"num_hidden_layers": 3, "hidden_size": width, "num_attention_heads": heads,
            "intermediate_size": 128, "hidden_act": activation, "max_position_embeddings": 77,
            "vocab_size": 49408, "eos_token_id": 49407, "projection_dim": width}


_CLIP_L = _text_config(768, 12, "quick_gelu")
_CLIP_G = _text_config(1280, 20, "gelu")

_SEEDS = {"unet": 1, "clip": 2, "vae": 3}


def _check_arch(arch):
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}, expected one of {ARCHES}")


def _fill(module, seed):
    """Overwrite every parameter from a seeded generator (the host allocates them with torch.empty).

    Matrices and kernels get N(0, 1/fan_in), so activations keep their scale through the layers and
    attention logits are large enough for the text context to steer the result; norm scales are 1 and
    biases 0. Values are drawn in float32 and then cast, so they do not depend on the host's dtype choice.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                std = param[0].numel() ** -0.5
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def build_model(arch):
    """A small UNet of the given arch ("sd15" or "sdxl") as a ModelPatcher for the stock samplers."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    _check_arch(arch)
    base = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch]

    class TinyConfig(base):
        unet_config = {**_UNET_COMMON, **_UNET[arch]}
        # Fixed-width heads: the default 64 channels per head would leave a 32-channel level with none.
        unet_extra_config = {"num_heads": -1, "num_head_channels": 8}

    # The 2024 host keeps (and extends) the dict it is given, so hand it a copy.
    model = TinyConfig(dict(TinyConfig.unet_config)).get_model({})
    _fill(model.diffusion_model, _SEEDS["unet"])
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def build_vae():
    """A small AutoencoderKL (64x64 image <-> 4x8x8 latent) as a comfy.sd.VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    autoencoder = AutoencoderKL(**_VAE_PARAMS)
    _fill(autoencoder, _SEEDS["vae"])
    # Loaded through the host's own path, which picks the VAE's device and dtype.
    return comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": _VAE_PARAMS})


def _tiny_sdxl_clip_class(clip_l_json, clip_g_json):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """The host's SDXL text encoder pair; its __init__ reads the full sizes from bundled json
        files, so build the same two encoders here (penultimate layer, clip_g pooled) from small ones."""

        # model_options: passed by the 2025 host's CLIP(), not by the 2024 one; nothing to apply here.
        def __init__(self, device="cpu", dtype=None, model_options=None):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=clip_l_json,
                layer="hidden", layer_idx=-2, layer_norm_hidden_state=False)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=clip_g_json,
                layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True)
            self.dtypes = {dtype}

    return TinySDXLClipModel


def build_clip(arch):
    """A small CLIP text encoder for the arch, with ComfyUI's bundled tokenizer, as a comfy.sd.CLIP.

    Conditioning is (1, 77, 768) for sd15 and (1, 77, 2048) with a (1, 1280) pooled output for sdxl.
    """
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    _check_arch(arch)
    # The 2024 host only takes text-model configs as json files; they are read while CLIP is built.
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, config in (("clip_l", _CLIP_L), ("clip_g", _CLIP_G)):
            paths[name] = os.path.join(tmp, name + ".json")
            with open(paths[name], "w") as f:
                json.dump(config, f)

        if arch == "sd15":
            # Like the host's SD1CheckpointClipModel: no projection on the pooled output.
            text_encoder = functools.partial(
                comfy.sd1_clip.SDClipModel, textmodel_json_config=paths["clip_l"], return_projected_pooled=False)
            target = ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=text_encoder))
        else:
            target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer,
                                _tiny_sdxl_clip_class(paths["clip_l"], paths["clip_g"]))
        # The 2024 host writes an identity text projection in place, which needs grad mode off
        # (the executor runs nodes under inference mode; callers outside it may not).
        with torch.no_grad():
            clip = comfy.sd.CLIP(target)

    _fill(clip.cond_stage_model, _SEEDS["clip"])
    return clip


_CHECKPOINTS = {}


def tiny_checkpoint(arch):
    """(MODEL, CLIP, VAE) for the arch, built once per process: building takes a few seconds."""
    if arch not in _CHECKPOINTS:
        _CHECKPOINTS[arch] = (build_model(arch), build_clip(arch), build_vae())
    return _CHECKPOINTS[arch]


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple in tests and the offline demo: real SD1.5 / SDXL
    architectures at a small width with fixed random weights, so images are noise-like but the
    prompt still changes them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"arch": (list(ARCHES),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "Beyond CLIP/testing"

    def load(self, arch):
        return tiny_checkpoint(arch)


NODE_CLASS_MAPPINGS = {"BeyondCLIP_TinyCheckpoint": TinyCheckpointLoader,
                       "BeyondCLIP_TinyCLIPVision": TinyCLIPVisionLoader,
                       "BeyondCLIP_TinyTextEncoderLoader": TinyTextEncoderLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"BeyondCLIP_TinyCheckpoint": "Tiny Checkpoint (Beyond CLIP, random weights)",
                              "BeyondCLIP_TinyCLIPVision": "Tiny CLIP Vision (Beyond CLIP, random weights)",
                              "BeyondCLIP_TinyTextEncoderLoader": "Tiny Text Encoder (Beyond CLIP, random weights)"}
