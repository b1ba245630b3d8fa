"""SEED-LLM nodes: a causal LM taught (Train SEED-LLM) to read and write SEED's 32 codes draws from words (text ->
exactly 32 codes -> SEED De-tokenize -> KSampler) and describes pictures (picture -> codes -> caption or answer)."""
from ..bridges import seed as seed_bridge
from ..bridges.errors import InputError
from ..engine import seed as seed_engine
from ..engine import seed_llm as seed_llm_engine
from ..loaders import folders
from ..loaders import seed_llm as seed_llm_files
from .common import CATEGORY, LLM_TYPE, SEED_LLM_TYPE, SEED_MODEL_TYPE, SEED_TOKENS_TYPE, Progress, ui_text

CATEGORY = CATEGORY + "/SEED"


class SeedLLMLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm": (LLM_TYPE, {"tooltip": "The plain LLM the SEED-LLM was trained on (Load LLM)"}),
            "seed_model": (SEED_MODEL_TYPE, {"tooltip": "The SEED tokenizer it was trained with"}),
            "seed_llm": (folders.list_bridge_files(kind=seed_llm_files.KIND), {
                "tooltip": "models/bridges/<name>.safetensors written by Train SEED-LLM (its LoRA folder "
                           "models/LLM/<name>-seed-llm-lora/ is found by the name stored in it)"}),
            "lora_mode": (seed_llm_files.MODES, {"default": "merged", "tooltip": "merged: ComfyUI patches the "
                          "LLM's weights while it runs (full speed; not for int8/nf4 LLMs); unmerged: the LoRA runs "
                          "beside the layers"}),
        }}

    RETURN_TYPES = (SEED_LLM_TYPE,)
    RETURN_NAMES = ("seed_llm",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a trained SEED-LLM onto its LLM and SEED tokenizer: the visual vocabulary (8192 code tokens "
                   "<img_00000>..<img_08191> and <img> </img>) and the LoRA. A file trained for another LLM or another "
                   "SEED tokenizer is refused, naming both.")

    @classmethod
    def VALIDATE_INPUTS(cls, seed_llm):
        return folders.check_bridge_choice(seed_llm, seed_llm_files.KIND, "SEED-LLM file")

    def load(self, llm, seed_model, seed_llm, lora_mode):
        path = folders.resolve_bridge_file(seed_llm)
        return (seed_llm_files.load_seed_llm(path, llm, seed_model, lora_mode),)


class SeedLLMDraw:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed_llm": (SEED_LLM_TYPE,),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "what to draw; the LLM reads "
                                  "'Generate an image: <prompt>' as in training"}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                      "tooltip": "0 = greedy (the most likely code each time); above 0 samples"}),
            "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                "tooltip": "when sampling: only codes within this much of the probability"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "the draws when sampling"}),
        }}

    RETURN_TYPES = (SEED_TOKENS_TYPE, "STRING")
    RETURN_NAMES = ("seed_tokens", "codes_text")
    OUTPUT_NODE = True  # shows the codes on the node
    FUNCTION = "draw"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Words -> exactly 32 SEED codes: the LLM writes them one by one after 'Generate an image: <prompt>' "
                   "<img>, each chosen among the 8192 code tokens only (greedy, or seeded sampling with temperature "
                   "and top-p). Connect to SEED De-tokenize (SD1.x) or the SDXL head, or mix with a picture's codes.")

    def draw(self, seed_llm, prompt, temperature, top_p, seed):
        progress = Progress(seed_llm.config.num_codes)
        tokens = seed_llm_engine.draw(seed_llm, prompt, temperature=temperature, top_p=top_p, seed=seed,
                                      on_code=lambda i: progress.step(i))
        text = tokens.text()
        return ui_text(text, tokens, text)


class SeedLLMDescribe:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed_llm": (SEED_LLM_TYPE,),
                "question": ("STRING", {"multiline": False, "default": "", "tooltip": "empty: a caption ('A photo "
                             "of' ...); else the short answer to 'Question: <question> Short answer.'"}),
                "max_new_tokens": ("INT", {"default": 32, "min": 1, "max": 1024}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "pictures to describe (tokenized by the SEED-LLM's SEED tokenizer)"}),
                "seed_tokens": (SEED_TOKENS_TYPE, {"tooltip": "or codes: from SEED Tokenize, typed, mixed or drawn"}),
            },
        }

    RETURN_TYPES = ("STRING", SEED_TOKENS_TYPE)
    RETURN_NAMES = ("text", "seed_tokens")
    OUTPUT_NODE = True  # shows the text on the node
    FUNCTION = "describe"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Picture (or codes) -> the LLM's caption after 'A photo of', or its short answer to a question: the "
                   "picture's 32 SEED codes go in as <img> codes </img>, the reply is greedy text. One line per "
                   "picture.")

    def describe(self, seed_llm, question, max_new_tokens, image=None, seed_tokens=None):
        if (image is None) == (seed_tokens is None):
            raise InputError("connect either an image or seed_tokens to Describe (SEED-LLM), not both")
        if image is not None:
            if image.shape[0] == 0:
                raise InputError("the image batch is empty: connect at least one image")
            tokens = seed_engine.tokenize_cached(seed_llm.seed, image)
        else:
            tokens = seed_tokens
            if tokens.codebook_size not in (None, seed_llm.seed.config.codebook_size):
                raise InputError(f"the codes come from a tokenizer with {tokens.codebook_size} codes; this SEED-LLM "
                                 f"reads {seed_llm.seed.config.codebook_size}")
        rows = tokens.codes.shape[0]
        progress = Progress(rows * max_new_tokens)
        done = [0]

        def on_token(i):
            progress.step(done[0] * max_new_tokens + i)

        texts = []
        for r in range(rows):
            texts += seed_llm_engine.describe(seed_llm, tokens.codes[r:r + 1], question, max_new_tokens=max_new_tokens,
                                              on_token=on_token)
            done[0] += 1
            progress.step(done[0] * max_new_tokens)
        text = "\n".join(texts)
        return ui_text(text, text, seed_bridge.SeedCodes(tokens.codes, seed_llm.seed.config.codebook_size))


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_SEEDLLMLoader": SeedLLMLoader,
    "BeyondCLIP_SEEDLLMDraw": SeedLLMDraw,
    "BeyondCLIP_SEEDLLMDescribe": SeedLLMDescribe,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_SEEDLLMLoader": "Load SEED-LLM (SEED)",
    "BeyondCLIP_SEEDLLMDraw": "SEED-LLM Draw: Words to Codes (SEED)",
    "BeyondCLIP_SEEDLLMDescribe": "SEED-LLM Describe: Picture to Words (SEED)",
}
