"""GILL nodes: [IMG] tokens on OPT -> GILLMapper -> SD conditioning, images in the prompt, retrieval from the
user's own images, the generate-or-retrieve decision with a lazy switch, and GILL's dialogue (the LLM writes a reply
and shows pictures where it writes [IMG0])."""
import logging
import re
from pathlib import Path

import folder_paths
import torch

from ..bridges.errors import InputError
from ..bridges.gill import GENERATE, PLACEHOLDER, RETRIEVE
from ..bridges.gill_dialogue import DecodeOptions
from ..engine import gill as gill_engine
from ..engine import gill_dialogue
from ..engine.conditioning import check_fits_model, conditioning, guard_family
from ..loaders import folders
from ..loaders import gill as gill_files
from ..loaders import training_inputs as inputs
from .common import (
    CACHE_TO_DISK,
    CATEGORY,
    CONVERSATION_TYPE,
    GILL_IMG_STATES_TYPE,
    GILL_INDEX_TYPE,
    GILL_TYPE,
    LLM_TYPE,
    LazyProgress,
    Progress,
    execution_blocker,
    placeholder_image,
    ui_text,
)

CATEGORY = CATEGORY + "/GILL"
log = logging.getLogger(__name__)
INDEX_SUBDIR = "gill_index"  # under ComfyUI's output folder: indexes are derived data, rebuilt at will
MODES = ("update", "rebuild")
_NAME = re.compile(r"^[\w.\- ]+$")


def _official_folders():
    return folders.list_model_dirs(folders.BRIDGES, marker=gill_files.CKPT)


def _gill_choices():
    return _official_folders() + folders.list_bridge_files(kind=gill_files.KIND)


def _index_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / INDEX_SUBDIR


class GILLLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gill_name": (_gill_choices(), {
            "tooltip": "A folder in models/bridges holding the jykoh/gill release (pretrained_ckpt.pth.tar, "
                       "decision_model.pth.tar, model_args.json), or a converted GILL .safetensors"})}}

    RETURN_TYPES = (GILL_TYPE,)
    RETURN_NAMES = ("gill",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads GILL's trained parts ([IMG] embeddings, GILLMapper, retrieval heads, image input layer, "
                   "decision model). Pickles are read weights-only; convert once for memory-mapped loads.")

    @classmethod
    def VALIDATE_INPUTS(cls, gill_name):
        choices = _gill_choices()
        return (True if gill_name in choices
                else folders.not_found_message("GILL model", gill_name, choices, "models/bridges"))

    def load(self, gill_name):
        if gill_name.endswith(".safetensors"):
            path = folders.resolve_bridge_file(gill_name)
        else:
            path = folders.resolve_model_dir(gill_name, folders.BRIDGES)
        return (gill_files.load_gill(path, gill_name),)


class GILLConvert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gill_name": (_official_folders(), {"tooltip": "An official release folder in models/bridges"}),
            "filename": ("STRING", {"default": "gill_opt",
                                    "tooltip": "Written as models/bridges/<filename>.safetensors"}),
            "overwrite": ("BOOLEAN", {"default": False}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Converts the official GILL release (pickles) into one safetensors file in models/bridges, which "
                   "later loads without unpickling and memory-mapped. Missing or unexpected tensors stop it.")

    @classmethod
    def VALIDATE_INPUTS(cls, gill_name):
        choices = _official_folders()
        return (True if gill_name in choices
                else folders.not_found_message("GILL release folder", gill_name, choices, "models/bridges"))

    def convert(self, gill_name, filename, overwrite):
        out = folders.bridge_output_path(filename, "filename")
        if out.exists() and not overwrite:
            raise InputError(f"{out} exists; choose another filename or switch 'overwrite' on")
        out = gill_files.convert_official(folders.resolve_model_dir(gill_name, folders.BRIDGES), out)
        return ui_text(str(out), str(out))


GILL_LLM_INPUT = (LLM_TYPE, {"tooltip": "OPT-6.7B (facebook/opt-6.7b) from models/LLM, as GILL was trained"})


class GILLEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": GILL_LLM_INPUT,
                "gill": (GILL_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": f"Text; write {PLACEHOLDER} where each connected image goes. "
                                                 f"Dialogue as 'Q: ...\\nA: ...' lines."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": f"One image per {PLACEHOLDER}, in order (a batch; combine several "
                                                f"with 'Batch Images')"}),
                "clip_vision": ("CLIP_VISION",
                                {"tooltip": "CLIP ViT-L/14 (clip-vit-large-patch14) from 'Load CLIP Vision'"}),
                "model": ("MODEL", {"tooltip": "Connect the MODEL you sample with to check the mapper fits it "
                                               "before encoding (unconnected, the sampler checks it on ComfyUI from "
                                               "December 2024 on)"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
        }

    RETURN_TYPES = ("CONDITIONING", GILL_IMG_STATES_TYPE)
    RETURN_NAMES = ("conditioning", "img_states")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("GILL: appends [IMG0]..[IMG7] to the prompt (text and images), reads the LLM's last-layer states "
                   "there and maps them with GILLMapper into SD text space (77 tokens; SDXL mappers add the pooled "
                   "vector). Pair with CLIPTextEncode of an empty text as the negative, as GILL does. "
                   "Prompt weights such as "
                   "(word:1.3) are ignored here (the prompt is read as written, with a warning): GILLMapper reads "
                   "eight learnt query states, not one state per word.")

    def encode(self, llm, gill, prompt, images=None, clip_vision=None, model=None, cache_to_disk=False):
        cfg = gill.config
        if model is not None:
            check_fits_model(model, cfg.out_dim, cfg.pooled_dim, gill.describe())
        progress = Progress(3)
        out = gill_engine.encode_conditioning(llm, gill, prompt, images, clip_vision, disk_cache=cache_to_disk,
                                              progress=progress.step)
        return (guard_family(out["conditioning"], gill.describe()), out["img_states"])


class GILLBuildIndex:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gill": (GILL_TYPE,),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14, the tower GILL's retrieval head reads"}),
            "folder": (inputs.input_folders(), {"tooltip": "A folder of your images inside ComfyUI's input folder "
                                                     "(a link to a folder elsewhere works)"}),
            "index_name": ("STRING", {"default": "", "tooltip": "Empty: the folder's name. Stored in "
                                                               f"output/{INDEX_SUBDIR}/<name>.safetensors + .json"}),
            "mode": (MODES, {"default": "update", "tooltip": "update: embed only new or changed images; "
                                                             "rebuild: embed everything again"}),
        }}

    RETURN_TYPES = (GILL_INDEX_TYPE, "STRING")
    RETURN_NAMES = ("index", "report")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Embeds a folder of your images for GILL retrieval (CLIP ViT-L/14 -> GILL's visual_fc). "
                   "Incremental: only new or changed files are embedded. Unreadable files are skipped and listed.")

    @classmethod
    def VALIDATE_INPUTS(cls, folder):
        choices = inputs.input_folders()
        return (True if folder in choices
                else folders.not_found_message("image folder", folder, choices, "ComfyUI's input folder"))

    @classmethod
    def IS_CHANGED(cls, folder, index_name, mode, **kwargs):
        root = Path(folder_paths.get_input_directory()) / folder
        return str((gill_files.folder_state(root) if root.is_dir() else None, index_name, mode))

    def build(self, gill, clip_vision, folder, index_name, mode):
        root = Path(folder_paths.get_input_directory()) / folder
        if not root.is_dir():
            raise InputError(f"image folder {root} does not exist")
        name = index_name.strip() or folder.replace("/", "_")
        if not _NAME.match(name) or name.startswith("."):
            raise InputError(f"index_name {index_name!r}: use letters, digits, spaces, '.', '-' or '_' only")
        index, report = gill_engine.build_index(gill, clip_vision, root, _index_dir(), name, rebuild=mode == "rebuild",
                                                progress=LazyProgress())
        text = (f"index '{name}': {report['total']} images ({report['added']} embedded, {report['kept']} kept, "
                f"{report['removed']} removed)")
        if report["skipped"]:
            text += f"; skipped {len(report['skipped'])} unreadable file(s):\n" + "\n".join(report["skipped"])
            log.warning("GILL: %s", text)
        return ui_text(text, index, text)


class GILLRetrieve:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gill": (GILL_TYPE,),
            "index": (GILL_INDEX_TYPE,),
            "img_states": (GILL_IMG_STATES_TYPE, {"tooltip": "From GILL Encode"}),
            "k": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("images", "scores", "best_score")
    FUNCTION = "retrieve"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The k images of the index closest to the prompt's [IMG0] retrieval embedding (cosine). Images "
                   "are cropped to the best match's size to form one batch.")

    def retrieve(self, gill, index, img_states, k):
        images, found = gill_engine.retrieve(gill, index, img_states, k)
        scores = "\n".join(f"{score:.4f}  {rel}" for _, rel, score in found)
        return ui_text(scores, images, scores, float(found[0][2]))


class GILLGenerateOrRetrieve:
    """The decision model picks the generated or the retrieved image. On ComfyUI with lazy inputs (Aug 2024 on)
    only the chosen branch runs: on 'retrieve' the sampler is never executed. Older hosts run both branches and
    still return the chosen image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "gill": (GILL_TYPE,),
                "img_states": (GILL_IMG_STATES_TYPE, {"tooltip": "From GILL Encode"}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Retrieve when P(retrieve) >= threshold. Lower: retrieve more "
                                                   "often; 0 always retrieves, 1 nearly never"}),
                "generated": ("IMAGE", {"lazy": True, "tooltip": "The sampler branch (VAE Decode)"}),
                "retrieved": ("IMAGE", {"lazy": True, "tooltip": "From Retrieve Images (GILL)"}),
            },
            "optional": {
                "index": (GILL_INDEX_TYPE, {"lazy": True, "tooltip": "Needed only by decision models that read the "
                                                                "best retrieval score"}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("image", "decision", "p_retrieve")
    FUNCTION = "choose"
    CATEGORY = CATEGORY
    DESCRIPTION = ("GILL's decision model chooses between generating and retrieving; with lazy inputs only the "
                   "chosen branch is executed. The threshold biases the choice.")

    def check_lazy_status(self, gill, img_states, threshold, **lazy):
        if gill.config.decision_in == gill.config.llm_dim + 1:  # the decision also reads the best retrieval score
            if "index" not in lazy:
                raise InputError(f"{gill.describe()}'s decision model also reads the best retrieval score: connect "
                                 f"the image index to 'index'")
            if lazy["index"] is None:
                return ["index"]
        decision, _ = gill_engine.decide(gill, img_states, threshold, lazy.get("index"))
        wanted = "retrieved" if decision == RETRIEVE else "generated"
        return [wanted] if lazy.get(wanted) is None else []

    def choose(self, gill, img_states, threshold, generated=None, retrieved=None, index=None):
        decision, p = gill_engine.decide(gill, img_states, threshold, index)
        image = retrieved if decision == RETRIEVE else generated
        if image is None:
            raise InputError(f"the decision is '{decision}' but its image input is not available")
        return ui_text(f"{decision} (p_retrieve={p:.3f}, threshold={threshold:.2f})", image, decision, p)


class GILLDialogue:
    """One turn of a conversation with GILL. Chain them (conversation -> conversation) for several turns."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": GILL_LLM_INPUT,
                "gill": (GILL_TYPE,),
                "message": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": f"Your turn. Write {PLACEHOLDER} where each connected picture goes "
                                                  f"(or none: the pictures come before the text). Sent to GILL as "
                                                  f"'Q: <message>\\nA:'"}),
                "max_new_tokens": ("INT", {"default": 32, "min": 1, "max": 2048,
                                           "tooltip": "Most steps of the reply (a picture's eight [IMG] tokens are one "
                                                      "step); it also ends at a newline"}),
                "min_word_tokens": ("INT", {"default": 0, "min": 0, "max": 2048,
                                            "tooltip": "No picture before this many steps"}),
                "ret_scale_factor": ("FLOAT", {"default": 1.3, "min": 0.0, "max": 1000.0, "step": 0.1,
                                               "tooltip": "Above 1: the [IMG0] logit becomes |logit| x factor, so "
                                                          "GILL shows pictures more often (1.3 in GILL's demo)"}),
                "gen_scale_factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                               "tooltip": "Applied after ret_scale_factor, the same way"}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                          "tooltip": "0: greedy (the same reply every time); above 0: sampled with "
                                                     "the seed"}),
                "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "With temperature > 0: sample among the most likely tokens that "
                                               "together reach this probability"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "max_pictures": ("INT", {"default": 1, "min": 0, "max": 16,
                                         "tooltip": "Most pictures in one reply; after them GILL writes words only "
                                                    "(0: words only)"}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "With an index: retrieve when the decision model's P(retrieve) "
                                                   ">= threshold, else generate. Without an index: generate"}),
            },
            "optional": {
                "conversation": (CONVERSATION_TYPE, {"tooltip": "The conversation so far (from the previous turn, "
                                                                "Reply Pictures, or Load Conversation)"}),
                "images": ("IMAGE", {"tooltip": "Your pictures for this turn (a batch; combine several with 'Batch "
                                                "Images')"}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 (clip-vit-large-patch14): needed as soon as "
                                                           "the conversation holds a picture"}),
                "index": (GILL_INDEX_TYPE, {"tooltip": "Your images to retrieve from (Build Image Index)"}),
                "model": ("MODEL", {"tooltip": "Connect the MODEL you sample with to check the mapper fits it"}),
            },
        }

    RETURN_TYPES = ("STRING", "CONDITIONING", "IMAGE", "FLOAT", "STRING", CONVERSATION_TYPE)
    RETURN_NAMES = ("reply", "conditioning", "retrieved", "score", "decision", "conversation")
    OUTPUT_IS_LIST = (False, True, True, True, True, False)
    FUNCTION = "reply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("GILL answers your message after the conversation so far: the frozen LLM writes its reply and, "
                   "where it writes [IMG0], shows a picture, retrieved from your index or generated "
                   "(conditioning for the "
                   "KSampler) as its decision model says. Lists per picture: conditioning (the generated ones), "
                   "retrieved image and score, decision. Where ComfyUI can skip a branch (Aug 2024 on), a reply "
                   "without a picture to generate runs no sampler. Feed the sampler's pictures back with Reply "
                   "Pictures so the next turn sees them.")

    def reply(self, llm, gill, message, max_new_tokens, min_word_tokens, ret_scale_factor, gen_scale_factor,
              temperature, top_p, seed, max_pictures, threshold, conversation=None, images=None, clip_vision=None,
              index=None, model=None):
        cfg = gill.config
        if model is not None:
            check_fits_model(model, cfg.out_dim, cfg.pooled_dim, gill.describe())
        opts = DecodeOptions(max_new_tokens=max_new_tokens, min_word_tokens=min_word_tokens,
                             ret_scale_factor=ret_scale_factor, gen_scale_factor=gen_scale_factor,
                             temperature=temperature, top_p=top_p, seed=seed, max_pictures=max_pictures)
        blocked = execution_blocker()
        progress = Progress(max_new_tokens)
        turn = gill_dialogue.reply(llm, gill, conversation, message, opts, images=images, clip_vision=clip_vision,
                                   index=index, threshold=threshold, progress=lambda done, total: progress.step(done))
        pictures = turn.pictures
        generate = [guard_family(p.conditioning, gill.describe()) for p in pictures if p.decision == GENERATE]
        retrieved = [p.retrieved for p in pictures if p.retrieved is not None]
        scores = [p.score for p in pictures if p.score is not None]
        decisions = [p.decision for p in pictures]
        if blocked is not None:  # nothing to sample or show: the branches after these outputs do not run
            generate, retrieved, scores, decisions = (v or [blocked] for v in (generate, retrieved, scores, decisions))
        else:  # this ComfyUI runs every branch: each output gets something valid that shows nothing
            if not generate:
                log.info("GILL dialogue: no picture to generate, but this ComfyUI cannot skip the sampler branch: "
                         "it samples zero conditioning, and Reply Pictures shows a black placeholder")
                generate = [conditioning(torch.zeros(1, cfg.out_tokens, cfg.out_dim),
                                         torch.zeros(1, cfg.pooled_dim) if cfg.pooled_dim else None)]
            retrieved, scores, decisions = retrieved or [placeholder_image()], scores or [0.0], decisions or ["none"]
        lines = [turn.reply or "(an empty reply)"]
        lines += [f"[picture {k + 1}] {p.describe()}" for k, p in enumerate(pictures)]
        if turn.dropped_turns:
            lines.append(f"(the oldest {turn.dropped_turns} turn(s) did not fit the LLM's context and were left out)")
        return {"ui": {"text": ["\n".join(lines)]},
                "result": (turn.reply, generate, retrieved, scores, decisions, turn.conversation)}


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_GILLLoader": GILLLoader,
    "BeyondCLIP_GILLConvert": GILLConvert,
    "BeyondCLIP_GILLEncode": GILLEncode,
    "BeyondCLIP_GILLBuildIndex": GILLBuildIndex,
    "BeyondCLIP_GILLRetrieve": GILLRetrieve,
    "BeyondCLIP_GILLGenerateOrRetrieve": GILLGenerateOrRetrieve,
    "BeyondCLIP_GILLDialogue": GILLDialogue,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_GILLLoader": "Load GILL (GILL)",
    "BeyondCLIP_GILLConvert": "Convert GILL to safetensors (GILL)",
    "BeyondCLIP_GILLEncode": "GILL Encode (GILL)",
    "BeyondCLIP_GILLBuildIndex": "Build Image Index (GILL)",
    "BeyondCLIP_GILLRetrieve": "Retrieve Images (GILL)",
    "BeyondCLIP_GILLGenerateOrRetrieve": "Generate or Retrieve (GILL)",
    "BeyondCLIP_GILLDialogue": "GILL Dialogue (GILL)",
}
