"""MUMU nodes: prompts that interleave words and reference images, read by Idefics2 (no perceiver), mapped by
the MUMU connector into SDXL conditioning. The MUMU UNet LoRA goes through ComfyUI's stock LoraLoaderModelOnly."""
import logging

from ..bridges import contract
from ..bridges import mumu as mumu_bridge
from ..bridges.errors import InputError
from ..bridges.pixels import check_pixels
from ..engine import mumu as mumu_engine
from ..engine.conditioning import check_fits_model, guard_family, zero_conditioning_like
from ..loaders import folders
from ..loaders import mumu as mumu_files
from ..loaders.llm import DTYPES
from .common import CACHE_TO_DISK, CATEGORY, CONNECTOR_TYPE, MUMU_IMAGES_TYPE, VLM_TYPE, Progress

CATEGORY = CATEGORY + "/MUMU"
log = logging.getLogger(__name__)
NEGATIVE_MODES = ("encode negative text", "zeros")
TRAINED_MAX_IMAGES = 4  # MUMU inserted at most 4 images per prompt in training
SIZE_INPUTS = ("width", "height", "target_width", "target_height")


def _lora_dirs():
    return folders.list_model_dirs(folders.LLM, marker=mumu_files.PEFT_CONFIG)


class LoadIdefics2:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "idefics2_name": (folders.list_model_dirs(folders.LLM),
                              {"tooltip": "An Idefics2 folder (e.g. idefics2-8b) in models/LLM, "
                                          "with its processor files"}),
            "dtype": (DTYPES, {"default": "auto"}),
        }}

    RETURN_TYPES = (VLM_TYPE,)
    RETURN_NAMES = ("idefics2",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads Idefics2 offline without its perceiver (one token per image patch), as MUMU uses it."

    @classmethod
    def VALIDATE_INPUTS(cls, idefics2_name):
        choices = folders.list_model_dirs(folders.LLM)
        if idefics2_name not in choices:
            return folders.not_found_message("Idefics2 folder", idefics2_name, choices, f"models/{folders.LLM}")
        return True

    def load(self, idefics2_name, dtype):
        progress = Progress(4)
        path = folders.resolve_model_dir(idefics2_name, folders.LLM)
        return (mumu_files.load_idefics2(idefics2_name, path, dtype, progress=progress.step),)


class Idefics2LoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "idefics2": (VLM_TYPE,),
            "lora_name": (_lora_dirs(), {"tooltip": "A peft LoRA folder (adapter_config.json + adapter_model."
                                                    "safetensors) in models/LLM"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
            "mode": (mumu_files.LORA_MODES, {"default": "merged",
                                        "tooltip": "merged: folded into the weights as ComfyUI patches (no extra "
                                                   "cost); unmerged: runs beside the layers, as in training"}),
        }}

    RETURN_TYPES = (VLM_TYPE,)
    RETURN_NAMES = ("idefics2",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies MUMU's Idefics2 LoRA (peft format). The plain Idefics2 stays usable beside it."

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        choices = _lora_dirs()
        if lora_name not in choices:
            return folders.not_found_message("Idefics2 LoRA folder", lora_name, choices, f"models/{folders.LLM}")
        return True

    def apply(self, idefics2, lora_name, strength, mode):
        lora = mumu_files.load_idefics2_lora(folders.resolve_model_dir(lora_name, folders.LLM), idefics2)
        return (mumu_files.apply_idefics2_lora(idefics2, lora, strength, mode),)


class LoadConnector:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"connector_name": (folders.list_bridge_files(kind=mumu_files.KIND),
                                                {"tooltip": "A MUMU connector file in models/bridges"})}}

    RETURN_TYPES = (CONNECTOR_TYPE,)
    RETURN_NAMES = ("connector",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a MUMU connector (Idefics2 hidden states -> SDXL tokens + pooled vector)."

    @classmethod
    def VALIDATE_INPUTS(cls, connector_name):
        return folders.check_bridge_choice(connector_name, mumu_files.KIND, "connector file")

    def load(self, connector_name):
        return (mumu_files.load_connector(folders.resolve_bridge_file(connector_name)),)


class ReferenceImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "name": ("STRING", {"default": "", "tooltip": "Bind to <name> in the prompt; leave empty to bind "
                                                              "to the next <image> in order"}),
            },
            "optional": {"images": (MUMU_IMAGES_TYPE, {"tooltip": "Images added before this one (chain any number)"})},
        }

    RETURN_TYPES = (MUMU_IMAGES_TYPE,)
    RETURN_NAMES = ("images",)
    FUNCTION = "add"
    CATEGORY = CATEGORY
    DESCRIPTION = "Adds a reference image for the MUMU prompt, by name (<man>) or by position (<image>)."

    def add(self, image, name, images=None):
        name = mumu_bridge.check_image_name(name)
        label = f"'{name}'" if name else f"#{len(images or []) + 1} (unnamed)"
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(f"reference image {label} holds a batch of {image.shape[0] if image.ndim == 4 else '?'} "
                             f"images; each placeholder stands for one image. Split the batch (e.g. ImageFromBatch) "
                             f"and add each image with its own node.")
        check_pixels(image, f"reference image {label}")  # refused here, at the node that got it
        return (list(images or []) + [(name, image[0])],)


class Encode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "idefics2": (VLM_TYPE,),
                "connector": (CONNECTOR_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": "a <image> man and his <image> dog",
                                      "tooltip": "Words, with <image> (the next unnamed reference image) or <name> "
                                                 "before the word each image shows. A '<' right before a letter or "
                                                 "digit starts a placeholder; beside a space it stays text. "
                                                 "ComfyUI's weights, (word:1.3), act on the words; pictures keep "
                                                 "weight 1"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "negative": (NEGATIVE_MODES, {"default": NEGATIVE_MODES[0],
                                              "tooltip": "encode the negative text (empty = MUMU's 'no negative "
                                                         "prompt'), or zeros"}),
                "image_resolution": ("INT", {"default": 252, "min": 1, "max": 4096, "step": 1,
                                             "tooltip": "Pixels per side each image is resized to (padded square). "
                                                        "Tokens per image = (resolution / patch)^2: with idefics2-8b "
                                                        "(14 px patches) 112 -> 64, 252 -> 324 (MUMU stage 1), "
                                                        "504 -> 1296 (stage 2)"}),
                "token_budget": ("INT", {"default": 0, "min": 0, "max": 65536,
                                         "tooltip": "0 = keep every token. Otherwise image tokens are average-pooled "
                                                    "(smaller patch grid) until the conditioning fits: every UNet "
                                                    "step attends to every token"}),
                "width": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 8,
                                  "tooltip": "SDXL size conditioning (original size); 0 = the latent's size"}),
                "height": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 8}),
                "target_width": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 8}),
                "target_height": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 8}),
            },
            "optional": {
                "images": (MUMU_IMAGES_TYPE,),
                "model": ("MODEL", {"tooltip": "Connect the MODEL you sample with to check it is SDXL before encoding "
                                               "(unconnected, the sampler checks it "
                                               "on ComfyUI from December 2024 on)"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with words and reference images (Idefics2 without perceiver -> MUMU connector) "
                   "into SDXL conditioning.")

    def encode(self, idefics2, connector, prompt, negative_prompt, negative, image_resolution, token_budget,
               width, height, target_width, target_height, images=None, model=None, cache_to_disk=False):
        mumu_files.check_connector_fits(idefics2, connector)
        if model is not None:
            check_fits_model(model, connector.config.out_dim, connector.config.pooled_dim, connector.describe())
        if not prompt.strip():
            raise InputError("the MUMU prompt is empty: write words, with <image> or <name> where each image goes")
        images = list(images or [])
        if len(images) > TRAINED_MAX_IMAGES:
            log.warning("MUMU: %d reference images; MUMU was trained with at most %d per prompt",
                        len(images), TRAINED_MAX_IMAGES)
        grid, resolution = mumu_files.grid_for(idefics2, image_resolution)
        progress = Progress(2)
        positive = mumu_engine.encode_conditioning(idefics2, connector, prompt, images, grid, resolution, token_budget,
                                                   disk_cache=cache_to_disk)
        progress.step()
        if negative == "zeros":
            neg = zero_conditioning_like(positive)
        else:
            neg = mumu_engine.encode_conditioning(idefics2, connector, negative_prompt, [], grid, resolution, 0,
                                                  disk_cache=cache_to_disk)
        progress.step()
        positive, neg = guard_family(positive, connector.describe()), guard_family(neg, connector.describe())
        size = dict(zip(SIZE_INPUTS, (width, height, target_width, target_height)))
        if all(size.values()):  # else ComfyUI uses the latent's size
            size.update(crop_w=0, crop_h=0)  # MUMU pads to square and never crops
            size = {key: size[key] for key in contract.SIZE_KEYS}
            positive, neg = ([[tokens, {**extra, **size}] for tokens, extra in cond] for cond in (positive, neg))
        return (positive, neg)


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_MUMULoadIdefics2": LoadIdefics2,
    "BeyondCLIP_MUMUIdefics2LoRA": Idefics2LoRA,
    "BeyondCLIP_MUMULoadConnector": LoadConnector,
    "BeyondCLIP_MUMUReferenceImage": ReferenceImage,
    "BeyondCLIP_MUMUEncode": Encode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_MUMULoadIdefics2": "Load Idefics2 (MUMU)",
    "BeyondCLIP_MUMUIdefics2LoRA": "Apply Idefics2 LoRA (MUMU)",
    "BeyondCLIP_MUMULoadConnector": "Load Connector (MUMU)",
    "BeyondCLIP_MUMUReferenceImage": "Reference Image (MUMU)",
    "BeyondCLIP_MUMUEncode": "Multimodal Prompt Encode (MUMU)",
}
