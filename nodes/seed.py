"""SEED nodes: an image becomes 32 discrete causal codes; codes (from an image, typed, or mixed) become SD1.x
conditioning through SEED's de-tokenizer."""
import torch

from ..bridges import seed as seed_bridge
from ..loaders import folders
from ..loaders import seed as seed_files
from ..loaders.errors import LoadError
from ..loaders.llm import DTYPES, choose_dtype
from ..loaders.patcher import load_to_device
from .common import (CACHE_TO_DISK, CATEGORY, Progress, check_width_against_model, conditioning, reuse_encoding,
                     zero_conditioning_like)

SEED_MODEL_TYPE = "BEYOND_CLIP_SEED"
SEED_TOKENS_TYPE = "SEED_TOKENS"
NEGATIVE_MODES = ("CLIP empty text", "zeros")
BATCH = 8  # images per vision-tower pass


def _roots():
    return folders.search_paths(folders.BRIDGES)


def seed_choices():
    """Converted SEED files in models/bridges, and official seed_tokenizer.pth files below it."""
    converted = []
    for name in folders.list_bridge_files():
        try:
            seed_files.read_bridge_config(folders.resolve_bridge_file(name))
            converted.append(name)
        except LoadError:
            continue
    return converted + [label for label, _, _ in seed_files.find_official(_roots())]


def resolve_choice(name):
    """(path of the file to load, official tokenizer path or None, its bridges root or None)."""
    if name.endswith(".safetensors"):
        return folders.resolve_bridge_file(name), None, None
    for label, path, root in seed_files.find_official(_roots()):
        if label == name:
            return None, path, root
    where = ", ".join(str(r) for r in _roots())
    raise LoadError(f"SEED tokenizer '{name}' was not found under {where}. Put {seed_files.TOKENIZER_FILE}, "
                    f"{seed_files.QFORMER_FILE} and {seed_files.VIT_FILE} in models/bridges/seed/ and refresh.")


class SeedLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed_model": (seed_choices(), {"tooltip": "models/bridges/seed/seed_tokenizer.pth (with causal_qformer.pth "
                                                       "and eva_vit_g.pth beside it; converted once to "
                                                       "models/bridges/seed-v1.safetensors), or a converted file"}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "precision of the EVA ViT-g vision tower (the Q-Former, "
                                                             "codebook and de-tokenizer stay fp32, as in SEED)"}),
        }}

    RETURN_TYPES = (SEED_MODEL_TYPE,)
    RETURN_NAMES = ("seed_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the SEED v1 image tokenizer and de-tokenizer (official files converted once to safetensors)."

    @classmethod
    def VALIDATE_INPUTS(cls, seed_model):
        choices = seed_choices()
        if seed_model not in choices:
            listed = ", ".join(choices[:5]) or "none"
            return (f"SEED tokenizer '{seed_model}' is not in models/bridges (found: {listed}). Put "
                    f"{seed_files.TOKENIZER_FILE}, {seed_files.QFORMER_FILE} and {seed_files.VIT_FILE} in "
                    f"models/bridges/seed/, then refresh the page.")
        return True

    def load(self, seed_model, dtype):
        import comfy.model_management as mm
        progress = Progress(5)
        path, official, root = resolve_choice(seed_model)
        if official is not None:
            path = seed_files.prepare(official, root, progress=progress.step)
        vision_dtype = choose_dtype(dtype, mm.text_encoder_device())
        return (seed_files.load_seed(path, vision_dtype, name=seed_model, progress=progress.step),)


def tokenize(seed, images, progress=None):
    model = load_to_device(seed.patcher)
    pixels = seed_bridge.preprocess(images, seed.config.image_size)
    codes = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], BATCH):
            codes.append(model.encode(pixels[start:start + BATCH]).cpu())
            progress and progress()
    return seed_bridge.SeedCodes(torch.cat(codes), seed.config.codebook_size)


class SeedTokenize:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed_model": (SEED_MODEL_TYPE,), "image": ("IMAGE",)},
                "optional": {"cache_to_disk": CACHE_TO_DISK}}

    RETURN_TYPES = (SEED_TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("seed_tokens", "codes_text")
    OUTPUT_NODE = True  # shows the codes on the node
    FUNCTION = "tokenize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Image batch -> 32 discrete SEED codes per image (resized to 224x224 bicubic, CLIP-normalised, as "
                   "the reference). The codes also come out as text, one line per image.")

    def tokenize(self, seed_model, image, cache_to_disk=False):
        if image.shape[0] == 0:
            raise ValueError("the image batch is empty: connect at least one image")

        def compute():
            return {"codes": tokenize(seed_model, image, Progress(-(-image.shape[0] // BATCH)).step).codes}

        codes = reuse_encoding("seed_codes", [seed_model.identity], [image], compute, disk=cache_to_disk,
                               about={"seed": seed_model.describe()})["codes"]
        tokens = seed_bridge.SeedCodes(codes, seed_model.config.codebook_size)
        text = tokens.text()
        return {"ui": {"text": [text]}, "result": (tokens, text)}


def _negative(mode, clip, positive, width):
    if mode == "zeros":
        return zero_conditioning_like(positive)
    if clip is None:
        raise ValueError("negative = 'CLIP empty text' needs the CLIP of your SD1.x checkpoint: connect the "
                         "checkpoint loader's CLIP output, or choose negative = 'zeros'")
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    if cond.shape[-1] != width:
        raise ValueError(f"the connected CLIP gives {cond.shape[-1]}-wide tokens, but SEED makes {width}-wide SD1.x "
                         f"conditioning: connect the CLIP of an SD1.x checkpoint")
    return conditioning(cond, pooled)


class SeedDetokenize:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed_model": (SEED_MODEL_TYPE,),
                "seed_tokens": (SEED_TOKENS_TYPE,),
                "negative": (NEGATIVE_MODES, {"default": NEGATIVE_MODES[0],
                                              "tooltip": "as SEED does: the CLIP encoding of empty text (connect "
                                                         "clip), or zeros"}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "the SD1.x checkpoint's CLIP, for the empty-text negative"}),
                "model": ("MODEL", {"tooltip": "connect the MODEL you sample with to have a non-SD1.x model "
                                               "refused before sampling"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "detokenize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("SEED codes -> SD1.x conditioning (77 x 768 generation embeddings per image). A batch of N code "
                   "sets gives a conditioning batch of N, for a latent batch of N.")

    def detokenize(self, seed_model, seed_tokens, negative, clip=None, model=None, cache_to_disk=False):
        config = seed_model.config
        if model is not None:
            check_width_against_model(model, config.out_dim, False, "the SEED de-tokenizer")
        seed_bridge.check_codes(seed_tokens.codes, config)
        progress = Progress(2)

        def compute():
            net = load_to_device(seed_model.patcher)
            with torch.no_grad():
                return {"positive": conditioning(net.decode(seed_tokens.codes))}

        # the negative is the checkpoint's own CLIP (or zeros): ComfyUI's CLIP objects carry no file identity
        positive = reuse_encoding("seed_conditioning", [seed_model.identity], [seed_tokens.codes], compute,
                                  disk=cache_to_disk, about={"seed": seed_model.describe()})["positive"]
        progress.step()
        neg = _negative(negative, clip, positive, config.out_dim)
        progress.step()
        return (positive, neg)


class SeedCodesFromText:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"codes": ("STRING", {"multiline": True, "default": "",
                                                  "tooltip": f"{seed_bridge.NUM_CODES} whole numbers per image (0 to "
                                                             f"8191), one image per line"})}}

    RETURN_TYPES = (SEED_TOKENS_TYPE,)
    RETURN_NAMES = ("seed_tokens",)
    FUNCTION = "parse"
    CATEGORY = CATEGORY
    DESCRIPTION = "SEED codes written as text (as SEED Tokenize shows them), so they can be edited and shared."

    def parse(self, codes):
        return (seed_bridge.SeedCodes(seed_bridge.parse_codes(codes)),)


class SeedMixCodes:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed_tokens_a": (SEED_TOKENS_TYPE,),
            "seed_tokens_b": (SEED_TOKENS_TYPE,),
            "codes_from_a": ("INT", {"default": 16, "min": 0, "max": seed_bridge.NUM_CODES,
                                     "tooltip": "how many leading codes come from A; the rest come from B"}),
        }}

    RETURN_TYPES = (SEED_TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("seed_tokens", "codes_text")
    FUNCTION = "mix"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The first k codes of A, the rest of B. SEED's codes are causal, so a prefix carries the image's "
                   "coarse content and the suffix refines it.")

    def mix(self, seed_tokens_a, seed_tokens_b, codes_from_a):
        sizes = {seed_tokens_a.codebook_size, seed_tokens_b.codebook_size} - {None}
        if len(sizes) > 1:
            raise ValueError(f"the two code sets come from tokenizers with different codebooks ({sorted(sizes)} "
                             f"entries)")
        mixed = seed_bridge.mix_codes(seed_tokens_a.codes, seed_tokens_b.codes, codes_from_a)
        tokens = seed_bridge.SeedCodes(mixed, next(iter(sizes), None))
        return (tokens, tokens.text())


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_SEEDLoader": SeedLoader,
    "BeyondCLIP_SEEDTokenize": SeedTokenize,
    "BeyondCLIP_SEEDDetokenize": SeedDetokenize,
    "BeyondCLIP_SEEDCodesFromText": SeedCodesFromText,
    "BeyondCLIP_SEEDMixCodes": SeedMixCodes,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_SEEDLoader": "Load SEED Tokenizer (SEED)",
    "BeyondCLIP_SEEDTokenize": "SEED Tokenize Image (SEED)",
    "BeyondCLIP_SEEDDetokenize": "SEED De-tokenize to Conditioning (SEED)",
    "BeyondCLIP_SEEDCodesFromText": "SEED Codes from Text (SEED)",
    "BeyondCLIP_SEEDMixCodes": "SEED Mix Codes (SEED)",
}
