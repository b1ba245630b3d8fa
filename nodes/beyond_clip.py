"""Beyond CLIP nodes: an LLM as the text encoder, a learnt mapper into SD1.x / SDXL text space, RepAdapters merged
into the LLM's weights, and the router that sends a request to chat or to drawing."""
import logging

from ..bridges import llm_text
from ..bridges.conversation import ASSISTANT, USER, Conversation, Picture, Turn
from ..bridges.errors import InputError
from ..engine import beyond_clip as beyond_clip_engine
from ..engine import llm as llm_engine
from ..engine.conditioning import guard_family, zero_conditioning_like
from ..loaders import folders, routers
from ..loaders.llm import LLM_DTYPES, load_llm
from ..loaders.mappers import KIND as MAPPER_KIND
from ..loaders.mappers import load_mapper
from ..loaders.repadapters import KIND as REPADAPTER_KIND
from ..loaders.repadapters import MODES, apply_repadapter, load_repadapter
from ..loaders.text_encoders import from_clip
from .common import (
    CACHE_TO_DISK,
    CATEGORY,
    CONVERSATION_TYPE,
    LLM_TYPE,
    MAPPER_TYPE,
    REPADAPTER_TYPE,
    Progress,
    execution_blocker,
    ui_text,
)

log = logging.getLogger(__name__)
NEGATIVE_MODES = ("encode negative text", "zeros")


class LLMLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm_name": (folders.list_llms(), {"tooltip": "A Hugging Face causal-LM folder, or a .gguf file, in "
                                                          "models/LLM"}),
            "dtype": (LLM_DTYPES, {"default": "auto", "tooltip": "auto: bf16/fp16 where the device runs them, else "
                                                             "fp32; int8/nf4 need bitsandbytes (on a CUDA GPU, or "
                                                             "on a CPU from bitsandbytes 0.46 on)"}),
        }}

    RETURN_TYPES = (LLM_TYPE,)
    RETURN_NAMES = ("llm",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Hugging Face causal LM (Llama, OPT, Mistral, ...) and its tokenizer from models/LLM, "
                   "offline, "
                   "or a single-file .gguf LLM (dequantized by transformers' GGUF support into the chosen dtype, its "
                   "tokenizer built from the file's own metadata; needs the gguf package), "
                   "under ComfyUI's memory manager (offloaded when the UNet needs the memory). auto: bf16/fp16 where "
                   "the device runs them, fp32 on CPU. int8/nf4: quantized by bitsandbytes while loading, about "
                   "1/2 or 1/4 of fp16's memory; such an LLM stays on its device. One instance is shared while "
                   "anything holds it.")

    @classmethod
    def VALIDATE_INPUTS(cls, llm_name):
        choices = folders.list_llms()
        if llm_name not in choices:
            return folders.not_found_message("LLM folder or .gguf file", llm_name, choices, f"models/{folders.LLM}")
        return True

    def load(self, llm_name, dtype):
        progress = Progress(4)
        path = folders.resolve_model_dir(llm_name, folders.LLM)
        return (load_llm(llm_name, path, dtype, progress=progress.step),)


class TextEncoderAsLLM:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP", {"tooltip": "From Load CLIP (type hidream, lumina2, omnigen2 or "
                                                          "qwen_image) on an LLM text encoder in models/text_encoders, "
                                                          "DualCLIPLoader, or another pack's CLIP loader (GGUF)"})}}

    RETURN_TYPES = (LLM_TYPE,)
    RETURN_NAMES = ("llm",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Uses the LLM inside a stock CLIP -- Llama 3.1 8B (HiDream), Gemma 2 2B (Lumina 2), Qwen2.5-VL "
                   "3B/7B (OmniGen2, Qwen-Image), as Load CLIP reads them from models/text_encoders, fp8 and GGUF "
                   "included -- as the LLM for LLM Text Encode, the router's drawing path, Train Mapper and GILL. "
                   "ComfyUI's own model, tokenizer and memory management run it; nothing is loaded twice. It "
                   "cannot chat (ComfyUI keeps no output head) or take a RepAdapter: those need Load LLM.")

    def convert(self, clip):
        return (from_clip(clip),)


class MapperLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mapper_name": (folders.list_bridge_files(kind=MAPPER_KIND),
                                             {"tooltip": "A Beyond CLIP mapper in models/bridges"})}}

    RETURN_TYPES = (MAPPER_TYPE,)
    RETURN_NAMES = ("mapper",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Beyond CLIP mapper (LLM hidden states -> SD1.x or SDXL text space) from models/bridges; "
                   "its shapes are checked against the config stored in the file.")

    @classmethod
    def VALIDATE_INPUTS(cls, mapper_name):
        return folders.check_bridge_choice(mapper_name, MAPPER_KIND, "mapper file")

    def load(self, mapper_name):
        return (load_mapper(folders.resolve_bridge_file(mapper_name)),)


class TextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE,),
                "mapper": (MAPPER_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "negative": (NEGATIVE_MODES, {"default": NEGATIVE_MODES[0],
                                              "tooltip": "encode the negative text through the LLM and mapper "
                                                         "(empty text = the LLM's encoding of nothing), or "
                                                         "output zeros"}),
                "hidden_layer": ("INT", {"default": -1, "min": -128, "max": 128,
                                         "tooltip": "-1 = last layer; 0 = embeddings"}),
                "template": (llm_text.TEMPLATES, {"default": "none"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Connect the MODEL you sample with to check the mapper fits it "
                                               "before encoding (unconnected, the sampler checks it on ComfyUI from "
                                               "December 2024 on)"}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Prompt -> LLM hidden states -> mapper -> SD1.x (1, 77, 768) or SDXL (1, 77, 2048 + pooled 1280) "
                   "conditioning for the stock KSampler. Weights in ComfyUI's syntax -- (word:1.3), (word), \\( for a "
                   "literal parenthesis -- move a word's tokens from the empty prompt's toward their own, as "
                   "CLIPTextEncode does. Connect `model` to have a mapper made for another model family refused "
                   "before sampling; a mapper trained on another text encoder is refused by name. Prompts longer "
                   "than the mapper's tokens or the LLM's context are cut, with a warning.")

    def encode(self, llm, mapper, prompt, negative_prompt, negative, hidden_layer, template, cache_to_disk=False,
               model=None):
        return encode_pair(llm, mapper, prompt, negative_prompt, negative, hidden_layer, template, cache_to_disk,
                           model)


def encode_pair(llm, mapper, prompt, negative_prompt, negative, hidden_layer, template, cache_to_disk=False,
                model=None):
    """(positive, negative) CONDITIONING: the prompt, and the negative text encoded or zeros."""
    beyond_clip_engine.check_mapper_fits(llm, mapper, model, template)
    if hidden_layer != mapper.config.hidden_layer:
        log.warning("Beyond CLIP: the mapper was trained on hidden layer %d, encoding with layer %d",
                    mapper.config.hidden_layer, hidden_layer)
    progress = Progress(2)
    positive = beyond_clip_engine.encode_conditioning(llm, mapper, prompt, hidden_layer=hidden_layer,
                                                      template=template, disk_cache=cache_to_disk)
    progress.step()
    if negative == "zeros":
        neg = zero_conditioning_like(positive)
    else:
        neg = beyond_clip_engine.encode_conditioning(llm, mapper, negative_prompt, hidden_layer=hidden_layer,
                                                     template=template, allow_empty=True, disk_cache=cache_to_disk)
    progress.step()
    what = f"{mapper.describe()} ({mapper.source})"
    return guard_family(positive, what), guard_family(neg, what)


def chat_reply(llm, prompt, max_new_tokens, template):
    """The plain LLM (no adapter) answers greedily, with a progress bar per token."""
    progress = Progress(max_new_tokens)
    return llm_engine.chat(llm, prompt, max_new_tokens=max_new_tokens, template=template, on_token=progress.step)


class Chat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm": (LLM_TYPE,),
            "prompt": ("STRING", {"multiline": True, "default": ""}),
            "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 4096}),
            "template": (llm_text.TEMPLATES, {"default": "none"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    OUTPUT_NODE = True  # shows the answer on the node
    FUNCTION = "chat"
    CATEGORY = CATEGORY
    DESCRIPTION = "The plain LLM (never its adapter) answers greedily; the answer shows on the node."

    def chat(self, llm, prompt, max_new_tokens, template):
        if not prompt.strip():
            raise InputError("the chat prompt is empty: write a question or instruction")
        answer = chat_reply(llm, prompt, max_new_tokens, template)
        return ui_text(answer, answer)


class RepAdapterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"adapter_name": (folders.list_bridge_files(kind=REPADAPTER_KIND),
                                              {"tooltip": "A RepAdapter file in models/bridges"})}}

    RETURN_TYPES = (REPADAPTER_TYPE,)
    RETURN_NAMES = ("repadapter",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads RepAdapter weights (one adapter per LLM linear layer, reference layout) from models/bridges."

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_name):
        return folders.check_bridge_choice(adapter_name, REPADAPTER_KIND, "RepAdapter file")

    def load(self, adapter_name):
        return (load_repadapter(folders.resolve_bridge_file(adapter_name)),)


class ApplyRepAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "llm": (LLM_TYPE,),
            "repadapter": (REPADAPTER_TYPE,),
            "mode": (MODES, {"default": "merged", "tooltip": "merged: folded into the weights, no extra cost; "
                                                             "unmerged: run beside the layers (as in training)"}),
        }}

    RETURN_TYPES = (LLM_TYPE,)
    RETURN_NAMES = ("llm",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies RepAdapter to the LLM for encoding. Chat nodes still use the plain LLM. Merged adapters "
                   "share the LLM's weights through ComfyUI's weight patches.")

    def apply(self, llm, repadapter, mode):
        return (apply_repadapter(llm, repadapter, mode),)


def _router_choices():
    return [routers.BUILTIN] + folders.list_bridge_files(routers.EXTENSION)


def _load_router(name):
    if name == routers.BUILTIN:
        return routers.builtin_router()
    return routers.load_router(folders.resolve_bridge_file(name))


class ChatOrDrawRouter:
    """The Beyond CLIP router in front of the two paths: chat (plain LLM answers) or draw (conditioning)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "The LLM for drawing (with its adapter, if any); chat uses it plain"}),
                "mapper": (MAPPER_TYPE,),
                "router": (_router_choices(),),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 4096}),
                "template": (llm_text.TEMPLATES, {"default": "none"}),
            },
            "optional": {
                "model": ("MODEL",),
                "conversation": (CONVERSATION_TYPE, {
                    "tooltip": "The conversation so far: chat answers read its earlier turns, and a drawing request "
                               "is encoded with the user's earlier turns before it (as many as fit the mapper's "
                               "tokens)"}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING", "STRING", "FLOAT", CONVERSATION_TYPE)
    RETURN_NAMES = ("positive", "negative", "answer", "route", "p_draw", "conversation")
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Routes the prompt: 'draw' encodes it (negative: the encoding of empty text); "
                   "'chat' answers it in text and, where "
                   "ComfyUI supports it, stops the image branch so no sampling time is spent.")

    @classmethod
    def VALIDATE_INPUTS(cls, router):
        choices = _router_choices()
        if router not in choices:
            return folders.not_found_message("router file", router, choices, f"models/{folders.BRIDGES}")
        return True

    def run(self, llm, mapper, router, prompt, max_new_tokens, template, model=None, conversation=None):
        if not prompt.strip():
            raise InputError("the prompt is empty: write a question or a picture description")
        history = conversation if conversation is not None else Conversation()
        route, p = _load_router(router).predict(prompt)
        p_draw = p if route == "draw" else 1.0 - p
        notes, answer = [], ""
        if route == "chat":
            progress = Progress(max_new_tokens)
            answer, dropped = llm_engine.chat_after(llm, history, prompt, max_new_tokens=max_new_tokens,
                                                    template=template, on_token=progress.step)
            if dropped:
                notes.append(f"the oldest {dropped} exchange(s) did not fit the LLM's context and were left out")
                log.warning("Beyond CLIP chat: %s", notes[-1])
            reply = Turn(ASSISTANT, (answer,))
        else:
            reply = Turn(ASSISTANT, (Picture(None, "generated", "drawn by Beyond CLIP"),))
        updated = Conversation(turns=history.turns + (Turn(USER, (prompt.strip(),)), reply), notes=tuple(notes))
        if route == "chat":
            blocked = execution_blocker()
            if blocked is not None:
                return {"ui": {"text": [answer]}, "result": (blocked, blocked, answer, route, p_draw, updated)}
            log.info("Beyond CLIP: routed to chat; this ComfyUI cannot skip the image branch, so it is encoded too")
        text, used = beyond_clip_engine.drawing_request(llm, mapper, history, prompt, template)
        positive, negative = encode_pair(llm, mapper, text, "", NEGATIVE_MODES[0], mapper.config.hidden_layer,
                                         template, model=model)
        shown = answer if route == "chat" else (
            f"(route: draw, p_draw={p_draw:.2f}" + (f"; with {used} earlier turn(s) of the conversation)" if used
                                                   else ")"))
        return {"ui": {"text": [shown]},
                "result": (positive, negative, answer, route, p_draw, updated)}


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_LLMLoader": LLMLoader,
    "BeyondCLIP_TextEncoderAsLLM": TextEncoderAsLLM,
    "BeyondCLIP_MapperLoader": MapperLoader,
    "BeyondCLIP_TextEncode": TextEncode,
    "BeyondCLIP_Chat": Chat,
    "BeyondCLIP_RepAdapterLoader": RepAdapterLoader,
    "BeyondCLIP_ApplyRepAdapter": ApplyRepAdapter,
    "BeyondCLIP_Assistant": ChatOrDrawRouter,  # the id saved workflows name
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_LLMLoader": "Load LLM (Beyond CLIP)",
    "BeyondCLIP_TextEncoderAsLLM": "Text Encoder as LLM (Beyond CLIP)",
    "BeyondCLIP_MapperLoader": "Load Mapper (Beyond CLIP)",
    "BeyondCLIP_TextEncode": "LLM Text Encode (Beyond CLIP)",
    "BeyondCLIP_Chat": "LLM Chat (Beyond CLIP)",
    "BeyondCLIP_RepAdapterLoader": "Load RepAdapter (Beyond CLIP)",
    "BeyondCLIP_ApplyRepAdapter": "Apply RepAdapter (Beyond CLIP)",
    "BeyondCLIP_Assistant": "Chat or Draw Router (Beyond CLIP)",
}
