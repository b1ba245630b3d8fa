"""SEED nodes: an image becomes 32 discrete causal codes; codes (from an image, typed, or mixed) become SD1.x
conditioning through SEED's de-tokenizer."""
import comfy.model_management as mm

from ..bridges import seed as seed_bridge
from ..bridges.errors import InputError
from ..engine import seed as seed_engine
from ..engine.conditioning import check_fits_model, conditioning, guard_family, zero_conditioning_like
from ..loaders import folders
from ..loaders import seed as seed_files
from ..loaders import seed_llm as seed_llm_files
from ..loaders import seed_sdxl as seed_sdxl_files
from ..loaders.errors import LoadError
from ..loaders.llm import DTYPES, choose_dtype
from .common import CACHE_TO_DISK, CATEGORY, SEED_MODEL_TYPE, SEED_SDXL_HEAD_TYPE, SEED_TOKENS_TYPE, Progress, ui_text

CATEGORY = CATEGORY + "/SEED"
NEGATIVE_MODES = ("CLIP empty text", "zeros")


def _roots():
    return folders.search_paths(folders.BRIDGES)


def seed_choices():
    """Converted SEED files in models/bridges, and official seed_tokenizer.pth files below it."""
    converted = folders.list_bridge_files(kind=seed_files.KIND)
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
            "seed_model": (seed_choices(), {"tooltip": "models/bridges/seed/seed_tokenizer.pth "
                                                       "(with causal_qformer.pth "
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
            return (folders.not_found_message("SEED tokenizer", seed_model, choices, "models/bridges") +
                    f" The official files go side by side in models/bridges/seed/: {seed_files.TOKENIZER_FILE}, "
                    f"{seed_files.QFORMER_FILE} and {seed_files.VIT_FILE}.")
        return True

    def load(self, seed_model, dtype):
        progress = Progress(5)
        path, official, root = resolve_choice(seed_model)
        if official is not None:
            path = seed_files.prepare(official, root, progress=progress.step)
        vision_dtype = choose_dtype(dtype, mm.text_encoder_device())
        return (seed_files.load_seed(path, vision_dtype, name=seed_model, progress=progress.step),)


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
                   "the reference). The codes also come out as text, one line per image, as SEED-LLaMA writes them "
                   "(<img><img_00042>...</img>).")

    def tokenize(self, seed_model, image, cache_to_disk=False):
        if image.shape[0] == 0:
            raise InputError("the image batch is empty: connect at least one image")
        progress = Progress(-(-image.shape[0] // seed_engine.BATCH))
        tokens = seed_engine.tokenize_cached(seed_model, image, disk_cache=cache_to_disk, progress=progress.step)
        text = tokens.text()
        return ui_text(text, tokens, text)


def _negative(mode, clip, positive, width, family="SD1.x"):
    if mode == "zeros":
        return zero_conditioning_like(positive)
    if clip is None:
        raise InputError(f"negative = 'CLIP empty text' needs the CLIP of your {family} checkpoint: connect the "
                         f"checkpoint loader's CLIP output, or choose negative = 'zeros'")
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    if cond.shape[-1] != width:
        raise InputError(f"the connected CLIP gives {cond.shape[-1]}-wide tokens, but SEED makes {width}-wide {family} "
                         f"conditioning: connect the CLIP of an {family} checkpoint")
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
                                               "refused before encoding (unconnected, the sampler refuses it on "
                                               "ComfyUI from December 2024 on)"}),
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
            check_fits_model(model, config.out_dim, 0, "the SEED de-tokenizer")
        seed_bridge.check_codes(seed_tokens.codes, config)
        progress = Progress(2)
        # the negative is the checkpoint's own CLIP (or zeros): ComfyUI's CLIP objects carry no file identity
        positive = seed_engine.detokenize_conditioning(seed_model, seed_tokens.codes, disk_cache=cache_to_disk)
        positive = guard_family(positive, f"the SEED de-tokenizer ({seed_model.describe()})")
        progress.step()
        neg = _negative(negative, clip, positive, config.out_dim)
        progress.step()
        return (positive, neg)


class SeedCodesFromText:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"codes": ("STRING", {"multiline": True, "default": "",
                                                  "tooltip": f"one image per line: <img><img_00042>...</img> "
                                                             f"({seed_bridge.NUM_CODES} code tokens) or "
                                                             f"{seed_bridge.NUM_CODES} whole numbers (0 to 8191) "
                                                             f"separated by spaces, commas or semicolons; digits "
                                                             f"of any script count by their value (１２ = 12)"})}}

    RETURN_TYPES = (SEED_TOKENS_TYPE,)
    RETURN_NAMES = ("seed_tokens",)
    FUNCTION = "parse"
    CATEGORY = CATEGORY
    DESCRIPTION = ("SEED codes written as text, one image per line: <img><img_00042>...</img> as SEED Tokenize, "
                   "SEED-LLM Draw and SEED-LLaMA write them, or 32 whole numbers (the form earlier versions wrote), so "
                   "they can be edited, pasted and shared.")

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
            raise InputError(f"the two code sets come from tokenizers with different codebooks ({sorted(sizes)} "
                             f"entries)")
        mixed = seed_bridge.mix_codes(seed_tokens_a.codes, seed_tokens_b.codes, codes_from_a)
        tokens = seed_bridge.SeedCodes(mixed, next(iter(sizes), None))
        return (tokens, tokens.text())


class SeedSDXLHeadLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"head_name": (folders.list_bridge_files(kind=seed_sdxl_files.KIND),
                                           {"tooltip": "A SEED SDXL head in models/bridges (Train SEED SDXL Head)"})}}

    RETURN_TYPES = (SEED_SDXL_HEAD_TYPE,)
    RETURN_NAMES = ("sdxl_head",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a de-tokenizer head that turns SEED codes into SDXL conditioning (trained for one checkpoint)."

    @classmethod
    def VALIDATE_INPUTS(cls, head_name):
        return folders.check_bridge_choice(head_name, seed_sdxl_files.KIND, "SEED SDXL head")

    def load(self, head_name):
        return (seed_sdxl_files.load_head(folders.resolve_bridge_file(head_name)),)


class SeedDetokenizeSDXL:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed_model": (SEED_MODEL_TYPE,),
                "sdxl_head": (SEED_SDXL_HEAD_TYPE,),
                "seed_tokens": (SEED_TOKENS_TYPE,),
                "negative": (NEGATIVE_MODES, {"default": NEGATIVE_MODES[0],
                                              "tooltip": "the SDXL CLIP's encoding of empty text (connect clip), or "
                                                         "zeros"}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "the SDXL checkpoint's CLIP, for the empty-text negative"}),
                "model": ("MODEL", {"tooltip": "connect the MODEL you sample with to have a non-SDXL model refused "
                                               "before sampling"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "detokenize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("SEED codes -> SDXL conditioning (77 x 2048 tokens + the 1280 pooled vector): SEED's own "
                   "de-tokenizer, then a head trained on the SDXL checkpoint's CLIP, so codes from pictures or from "
                   "SEED-LLM Draw drive SDXL fine-tunes.")

    def detokenize(self, seed_model, sdxl_head, seed_tokens, negative, clip=None, model=None, cache_to_disk=False):
        seed_sdxl_files.check_head_fits(sdxl_head, seed_model, seed_llm_files.seed_identity(seed_model))
        if model is not None:
            check_fits_model(model, sdxl_head.config.out_dim, sdxl_head.config.pooled_dim, sdxl_head.describe())
        seed_bridge.check_codes(seed_tokens.codes, seed_model.config)
        progress = Progress(2)
        positive = seed_engine.detokenize_sdxl(seed_model, sdxl_head, seed_tokens.codes, disk_cache=cache_to_disk)
        positive = guard_family(positive, sdxl_head.describe())
        progress.step()
        neg = _negative(negative, clip, positive, sdxl_head.config.out_dim, "SDXL")
        progress.step()
        return (positive, neg)


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_SEEDLoader": SeedLoader,
    "BeyondCLIP_SEEDTokenize": SeedTokenize,
    "BeyondCLIP_SEEDDetokenize": SeedDetokenize,
    "BeyondCLIP_SEEDCodesFromText": SeedCodesFromText,
    "BeyondCLIP_SEEDMixCodes": SeedMixCodes,
    "BeyondCLIP_SEEDSDXLHeadLoader": SeedSDXLHeadLoader,
    "BeyondCLIP_SEEDDetokenizeSDXL": SeedDetokenizeSDXL,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_SEEDLoader": "Load SEED Tokenizer (SEED)",
    "BeyondCLIP_SEEDTokenize": "SEED Tokenize Image (SEED)",
    "BeyondCLIP_SEEDDetokenize": "SEED De-tokenize to Conditioning (SEED)",
    "BeyondCLIP_SEEDCodesFromText": "SEED Codes from Text (SEED)",
    "BeyondCLIP_SEEDMixCodes": "SEED Mix Codes (SEED)",
    "BeyondCLIP_SEEDSDXLHeadLoader": "Load SEED SDXL Head (SEED)",
    "BeyondCLIP_SEEDDetokenizeSDXL": "SEED De-tokenize to SDXL Conditioning (SEED)",
}
