"""GILL nodes: [IMG] tokens on OPT -> GILLMapper -> SD conditioning, images in the prompt, retrieval from the
user's own images, and the generate-or-retrieve decision with a lazy switch."""
import logging
import re
from contextlib import nullcontext
from pathlib import Path

import folder_paths
import torch
import torch.nn.functional as F

from ..bridges import llm_text
from ..bridges.gill import (GENERATE, PLACEHOLDER, RETRIEVE, GILLInputError, build_inputs, count_placeholders,
                            img_hidden_states, split_prompt)
from ..loaders import folders
from ..loaders import gill as gill_files
from ..loaders.errors import LoadError
from ..loaders.patcher import load_to_device
from .common import (CACHE_TO_DISK, CATEGORY, LLM_TYPE, Progress, check_width_against_model, conditioning,
                     reuse_encoding)

log = logging.getLogger(__name__)
GILL_TYPE = "BEYOND_CLIP_GILL"
IMG_STATES_TYPE = "BEYOND_CLIP_GILL_IMG_STATES"  # the (1, 8, llm_dim) [IMG] hidden states of one prompt
INDEX_TYPE = "BEYOND_CLIP_GILL_INDEX"
INDEX_SUBDIR = "gill_index"  # under ComfyUI's output folder: indexes are derived data, rebuilt at will
MODES = ("update", "rebuild")
_NAME = re.compile(r"^[\w.\- ]+$")


def _official_folders():
    return folders.list_model_dirs(folders.BRIDGES, marker=gill_files.CKPT)


def _gill_choices():
    files = []
    for name in folders.list_bridge_files():
        path = folder_paths.get_full_path(folders.BRIDGES, name)
        if path and gill_files.is_gill_file(path):
            files.append(name)
    return _official_folders() + files


def _input_folders():
    base = Path(folder_paths.get_input_directory())
    if not base.is_dir():
        return []
    found = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found.append(child.name)
            found += [f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if g.is_dir() and not g.name.startswith(".")]
    return found


def _index_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / INDEX_SUBDIR


def _not_found(what, name, choices, where):
    listed = ", ".join(choices[:5]) if choices else "none"
    return f"{what} '{name}' is not in {where} (found: {listed}). Put it there, or pick one that is, then refresh."


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
        return True if gill_name in choices else _not_found("GILL model", gill_name, choices, "models/bridges")

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
            "filename": ("STRING", {"default": "gill_opt", "tooltip": "Written as models/bridges/<filename>.safetensors"}),
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
        return True if gill_name in choices else _not_found("GILL release folder", gill_name, choices, "models/bridges")

    def convert(self, gill_name, filename, overwrite):
        name = filename.strip()
        if name.endswith(".safetensors"):
            name = name[: -len(".safetensors")]
        if not _NAME.match(name) or name.startswith("."):
            raise ValueError(f"filename {filename!r}: use letters, digits, spaces, '.', '-' or '_' only (no folders)")
        out = Path(folder_paths.get_folder_paths(folders.BRIDGES)[0]) / f"{name}.safetensors"
        if out.exists() and not overwrite:
            raise ValueError(f"{out} exists; choose another filename or switch 'overwrite' on")
        gill_files.convert_official(folders.resolve_model_dir(gill_name, folders.BRIDGES), out)
        return {"ui": {"text": [str(out)]}, "result": (str(out),)}


def _images_to_pooled(clip_vision, images, gill):
    if images is None:
        return None
    if clip_vision is None:
        raise ValueError("images are connected but no clip_vision: connect 'Load CLIP Vision' with "
                         "clip-vit-large-patch14 (GILL reads CLIP ViT-L/14 features)")
    gill_files.check_vision(gill, clip_vision)
    return torch.cat([gill_files.clip_pooled(clip_vision, images[i:i + 1]) for i in range(images.shape[0])])


def encode_img_states(llm, gill, prompt, images=None, clip_vision=None, progress=None):
    """Prompt (+ images) -> (1, 8, llm_dim) float32 [IMG] hidden states."""
    cfg = gill.config
    n_images = 0 if images is None else images.shape[0]
    n_marks = count_placeholders(prompt)
    if n_marks > n_images:
        raise GILLInputError(f"the prompt has {n_marks} {PLACEHOLDER} placeholders but {n_images} image(s) are "
                             f"connected; connect one image per placeholder (combine several with 'Batch Images')")
    if n_images > n_marks:
        raise GILLInputError(f"{n_images} image(s) are connected but the prompt has {n_marks} {PLACEHOLDER} "
                             f"placeholder(s); write {PLACEHOLDER} where each image belongs in the text")
    parts = split_prompt(prompt)
    if not parts:
        raise GILLInputError("the prompt is empty: write a caption, a story or a dialogue to draw from")
    pooled = _images_to_pooled(clip_vision, images, gill)
    step = progress or (lambda: None)
    step()
    g = gill.on_device()
    with torch.no_grad():
        image_embeds = (g.image_tokens(pooled.to(g.visual_fc.weight.device)) if pooled is not None
                        else torch.zeros(0, cfg.visual_tokens, cfg.llm_dim))
        img_embs = g.img_embeddings().detach().clone()
    model = load_to_device(llm.patcher)
    embed_tokens = model.get_input_embeddings()
    if embed_tokens.weight.shape[1] != cfg.llm_dim:
        raise LoadError(f"{gill.describe()} was trained on an LLM with {cfg.llm_dim}-wide embeddings "
                        f"({cfg.opt_version or 'OPT-6.7B'}), but {llm.describe()} has {embed_tokens.weight.shape[1]}. "
                        f"Load {cfg.opt_version or 'facebook/opt-6.7b'} from models/LLM.")
    if getattr(model.config, "model_type", "opt") != "opt":
        log.warning("GILL: %s is a '%s' model; GILL's [IMG] embeddings were trained on OPT",
                    llm.describe(), model.config.model_type)
    adapter = llm.adapter.attach(model) if llm.adapter is not None else nullcontext()
    with torch.no_grad(), adapter:
        inputs = build_inputs(embed_tokens, llm.tokenizer, parts, image_embeds, img_embs,
                              llm_text.context_length(model))
        if inputs.dropped:
            log.warning("GILL: the prompt is %d positions longer than %s's context; its oldest %d positions "
                        "are left out (%d of %d images kept)", inputs.dropped, llm.describe(), inputs.dropped,
                        inputs.images_used, n_images)
        hidden = img_hidden_states(model, inputs, cfg.num_img_tokens)
    step()
    return hidden


class GILLEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llm": (LLM_TYPE, {"tooltip": "OPT-6.7B (facebook/opt-6.7b) from models/LLM, as GILL was trained"}),
                "gill": (GILL_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": f"Text; write {PLACEHOLDER} where each connected image goes. "
                                                 f"Dialogue as 'Q: ...\\nA: ...' lines."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": f"One image per {PLACEHOLDER}, in order (a batch; combine several "
                                                f"with 'Batch Images')"}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 (clip-vit-large-patch14) from 'Load CLIP Vision'"}),
                "model": ("MODEL", {"tooltip": "Connect the MODEL you sample with to check the mapper fits it"}),
                "cache_to_disk": CACHE_TO_DISK,
            },
        }

    RETURN_TYPES = ("CONDITIONING", IMG_STATES_TYPE)
    RETURN_NAMES = ("conditioning", "img_states")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("GILL: appends [IMG0]..[IMG7] to the prompt (text and images), reads the LLM's last-layer states "
                   "there and maps them with GILLMapper into SD text space (77 tokens; SDXL mappers add the pooled "
                   "vector). Pair with CLIPTextEncode of an empty text as the negative, as GILL does.")

    def encode(self, llm, gill, prompt, images=None, clip_vision=None, model=None, cache_to_disk=False):
        cfg = gill.config
        if model is not None:
            check_width_against_model(model, cfg.out_dim, bool(cfg.pooled_dim), gill.describe())

        def compute():
            progress = Progress(3)
            hidden = encode_img_states(llm, gill, prompt, images, clip_vision, progress.step)
            g = gill.on_device()
            with torch.no_grad():
                tokens, pooled = g.generation_embedding(hidden.to(g.visual_fc.weight.device))
            progress.step()
            return {"conditioning": conditioning(tokens, pooled), "img_states": hidden.cpu()}

        # the vision tower counts only where it reads pictures
        vision = _vision_identity(clip_vision) if images is not None and clip_vision is not None else None
        out = reuse_encoding("gill", [llm.identity, gill.identity], [prompt, images, vision], compute,
                             disk=cache_to_disk, about={"llm": llm.describe(), "gill": gill.describe()})
        return (out["conditioning"], out["img_states"])


def _vision_identity(clip_vision) -> str:
    """ComfyUI's CLIP_VISION does not keep its file's name: its weights' fingerprint and precision name it."""
    return f"{gill_files.vision_fingerprint(clip_vision)}:{getattr(clip_vision, 'dtype', '')}"


def _check_states(gill, img_states):
    if img_states.shape[-1] != gill.config.llm_dim or img_states.shape[1] != gill.config.num_img_tokens:
        raise ValueError(f"img_states {tuple(img_states.shape)} do not come from {gill.describe()} "
                         f"(expected (1, {gill.config.num_img_tokens}, {gill.config.llm_dim})); connect the same GILL")


class GILLBuildIndex:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gill": (GILL_TYPE,),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14, the tower GILL's retrieval head reads"}),
            "folder": (_input_folders(), {"tooltip": "A folder of your images inside ComfyUI's input folder (a link "
                                                     "to a folder elsewhere works)"}),
            "index_name": ("STRING", {"default": "", "tooltip": "Empty: the folder's name. Stored in "
                                                               f"output/{INDEX_SUBDIR}/<name>.safetensors + .json"}),
            "mode": (MODES, {"default": "update", "tooltip": "update: embed only new or changed images; "
                                                             "rebuild: embed everything again"}),
        }}

    RETURN_TYPES = (INDEX_TYPE, "STRING")
    RETURN_NAMES = ("index", "report")
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Embeds a folder of your images for GILL retrieval (CLIP ViT-L/14 -> GILL's visual_fc). "
                   "Incremental: only new or changed files are embedded. Unreadable files are skipped and listed.")

    @classmethod
    def VALIDATE_INPUTS(cls, folder):
        choices = _input_folders()
        return True if folder in choices else _not_found("image folder", folder, choices, "ComfyUI's input folder")

    @classmethod
    def IS_CHANGED(cls, folder, index_name, mode, **kwargs):
        root = Path(folder_paths.get_input_directory()) / folder
        return str((gill_files.folder_state(root) if root.is_dir() else None, index_name, mode))

    def build(self, gill, clip_vision, folder, index_name, mode):
        root = Path(folder_paths.get_input_directory()) / folder
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist")
        name = index_name.strip() or folder.replace("/", "_")
        if not _NAME.match(name) or name.startswith("."):
            raise ValueError(f"index_name {index_name!r}: use letters, digits, spaces, '.', '-' or '_' only")
        bar = []

        def progress(done, total):
            if not bar:
                bar.append(Progress(total))
            bar[0].step(done)

        index, report = gill_files.build_index(gill, clip_vision, root, _index_dir(), name, rebuild=mode == "rebuild",
                                               progress=progress)
        text = (f"index '{name}': {report['total']} images ({report['added']} embedded, {report['kept']} kept, "
                f"{report['removed']} removed)")
        if report["skipped"]:
            text += f"; skipped {len(report['skipped'])} unreadable file(s):\n" + "\n".join(report["skipped"])
            log.warning("GILL: %s", text)
        return {"ui": {"text": [text]}, "result": (index, text)}


def _fit(image, height, width):
    """(1, H, W, 3) -> (1, height, width, 3): scaled to cover, centre-cropped (a batch needs one size)."""
    if image.shape[1:3] == (height, width):
        return image
    x = image.movedim(-1, 1)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].movedim(1, -1)


def retrieve(gill, index, img_states, k):
    _check_states(gill, img_states)
    gill_files.check_index(gill, index)
    g = gill.on_device()
    with torch.no_grad():
        query = g.text_retrieval_embedding(img_states.to(g.visual_fc.weight.device))[0].float().cpu()
    found = gill_files.retrieve_images(index, query, k)
    height, width = found[0][0].shape[1:3]
    images = torch.cat([_fit(img, height, width) for img, _, _ in found])
    return images, found


class GILLRetrieve:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gill": (GILL_TYPE,),
            "index": (INDEX_TYPE,),
            "img_states": (IMG_STATES_TYPE, {"tooltip": "From GILL Encode"}),
            "k": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("images", "scores", "best_score")
    FUNCTION = "retrieve"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The k images of the index closest to the prompt's [IMG0] retrieval embedding (cosine). Images "
                   "are cropped to the best match's size to form one batch.")

    def retrieve(self, gill, index, img_states, k):
        images, found = retrieve(gill, index, img_states, k)
        scores = "\n".join(f"{score:.4f}  {rel}" for _, rel, score in found)
        return {"ui": {"text": [scores]}, "result": (images, scores, float(found[0][2]))}


def decide(gill, img_states, threshold, index=None):
    """(decision, P(retrieve)). Retrieve when P(retrieve) >= threshold (0.5 = the decision model's argmax)."""
    _check_states(gill, img_states)
    g = gill.on_device()
    device = g.visual_fc.weight.device
    best = None
    with torch.no_grad():
        if g.needs_retrieval_score():
            if index is None:
                raise ValueError(f"{gill.describe()}'s decision model also reads the best retrieval score: connect "
                                 f"the image index to 'index'")
            gill_files.check_index(gill, index)
            best = index.best_score(g.text_retrieval_embedding(img_states.to(device))[0].float().cpu())
        p = g.retrieve_probability(img_states.to(device), best)
    return (RETRIEVE if p >= threshold else GENERATE), p


class GILLGenerateOrRetrieve:
    """The decision model picks the generated or the retrieved image. On ComfyUI with lazy inputs (Aug 2024 on)
    only the chosen branch runs: on 'retrieve' the sampler is never executed. Older hosts run both branches and
    still return the chosen image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "gill": (GILL_TYPE,),
                "img_states": (IMG_STATES_TYPE, {"tooltip": "From GILL Encode"}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Retrieve when P(retrieve) >= threshold. Lower: retrieve more "
                                                   "often; 0 always retrieves, 1 nearly never"}),
                "generated": ("IMAGE", {"lazy": True, "tooltip": "The sampler branch (VAE Decode)"}),
                "retrieved": ("IMAGE", {"lazy": True, "tooltip": "From Retrieve Images (GILL)"}),
            },
            "optional": {
                "index": (INDEX_TYPE, {"lazy": True, "tooltip": "Needed only by decision models that read the "
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
        if gill.module.needs_retrieval_score():
            if "index" not in lazy:
                raise ValueError(f"{gill.describe()}'s decision model also reads the best retrieval score: connect "
                                 f"the image index to 'index'")
            if lazy["index"] is None:
                return ["index"]
        decision, _ = decide(gill, img_states, threshold, lazy.get("index"))
        wanted = "retrieved" if decision == RETRIEVE else "generated"
        return [wanted] if lazy.get(wanted) is None else []

    def choose(self, gill, img_states, threshold, generated=None, retrieved=None, index=None):
        decision, p = decide(gill, img_states, threshold, index)
        image = retrieved if decision == RETRIEVE else generated
        if image is None:
            raise ValueError(f"the decision is '{decision}' but its image input is not available")
        return {"ui": {"text": [f"{decision} (p_retrieve={p:.3f}, threshold={threshold:.2f})"]},
                "result": (image, decision, p)}


NODE_CLASS_MAPPINGS = {
    "BeyondCLIP_GILLLoader": GILLLoader,
    "BeyondCLIP_GILLConvert": GILLConvert,
    "BeyondCLIP_GILLEncode": GILLEncode,
    "BeyondCLIP_GILLBuildIndex": GILLBuildIndex,
    "BeyondCLIP_GILLRetrieve": GILLRetrieve,
    "BeyondCLIP_GILLGenerateOrRetrieve": GILLGenerateOrRetrieve,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BeyondCLIP_GILLLoader": "Load GILL (GILL)",
    "BeyondCLIP_GILLConvert": "Convert GILL to safetensors (GILL)",
    "BeyondCLIP_GILLEncode": "GILL Encode (GILL)",
    "BeyondCLIP_GILLBuildIndex": "Build Image Index (GILL)",
    "BeyondCLIP_GILLRetrieve": "Retrieve Images (GILL)",
    "BeyondCLIP_GILLGenerateOrRetrieve": "Generate or Retrieve (GILL)",
}
