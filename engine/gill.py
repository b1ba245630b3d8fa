"""GILL: a prompt with pictures -> the frozen LLM's [IMG] hidden states -> GILLMapper conditioning, retrieval from
an image index, and the generate-or-retrieve decision."""
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bridges import llm_text
from ..bridges.errors import InputError, LoadError
from ..bridges.gill import (
    GENERATE,
    PLACEHOLDER,
    RETRIEVE,
    GILLInputError,
    build_inputs,
    img_hidden_states,
    split_prompt,
)
from ..bridges.pixels import check_pixels
from ..bridges.retrieval import ImageIndex
from ..loaders import gill as gill_files
from ..loaders import images as picture_files
from . import llm as llm_engine
from .cache import reuse_encoding
from .conditioning import conditioning
from .prompt_weights import warn_ignored

log = logging.getLogger(__name__)


def clip_features(gill, clip_vision, images) -> torch.Tensor:
    """CLIP pooler_output (N, vision width) of an IMAGE batch, one image at a time, with the tower checked."""
    if clip_vision is None:
        raise InputError("images are connected but no clip_vision: connect 'Load CLIP Vision' with "
                         "clip-vit-large-patch14 (GILL reads CLIP ViT-L/14 features)")
    gill_files.check_vision(gill, clip_vision)
    return torch.cat([gill_files.clip_pooled(clip_vision, images[i:i + 1]) for i in range(images.shape[0])])


def _check_placeholders(prompt, n_images):
    n_marks = prompt.count(PLACEHOLDER)
    if n_marks > n_images:
        raise GILLInputError(f"the prompt has {n_marks} {PLACEHOLDER} placeholders but {n_images} image(s) are "
                             f"connected; connect one image per placeholder (combine several with 'Batch Images')")
    if n_images > n_marks:
        raise GILLInputError(f"{n_images} image(s) are connected but the prompt has {n_marks} {PLACEHOLDER} "
                             f"placeholder(s); write {PLACEHOLDER} where each image belongs in the text")


def check_llm(llm, gill, model):
    cfg = gill.config
    width = model.get_input_embeddings().weight.shape[1]
    if width != cfg.llm_dim:
        raise LoadError(f"{gill.describe()} was trained on an LLM with {cfg.llm_dim}-wide embeddings "
                        f"({cfg.opt_version or 'OPT-6.7B'}), but {llm.describe()} has {width}. "
                        f"Load {cfg.opt_version or 'facebook/opt-6.7b'} from models/LLM.")
    if getattr(model.config, "model_type", "opt") != "opt":
        log.warning("GILL: %s is a '%s' model; GILL's [IMG] embeddings were trained on OPT",
                    llm.describe(), model.config.model_type)


def img_states(llm, gill, prompt: str, images=None, clip_vision=None, progress=None) -> torch.Tensor:
    """Prompt (+ images, one per <image>) -> (1, 8, llm_dim) float32 [IMG] hidden states. progress() after the
    pictures and after the LLM."""
    cfg = gill.config
    if images is not None:
        images = check_pixels(images, "the images connected to GILL Encode")
    _check_placeholders(prompt, 0 if images is None else images.shape[0])
    parts = split_prompt(prompt)
    if not parts:
        raise GILLInputError("the prompt is empty: write a caption, a story or a dialogue to draw from")
    pooled = clip_features(gill, clip_vision, images) if images is not None else None
    step = progress or (lambda: None)
    step()
    g = gill.module()
    with torch.no_grad():
        image_embeds = (g.image_tokens(pooled.to(g.visual_fc.weight.device)) if pooled is not None
                        else torch.zeros(0, cfg.visual_tokens, cfg.llm_dim))
        img_embs = g.img_embeddings().detach().clone()
    model = llm.module()
    check_llm(llm, gill, model)
    with torch.no_grad(), llm_engine.adapter_context(llm, model):
        inputs = build_inputs(model.get_input_embeddings(), llm.tokenizer, parts, image_embeds, img_embs,
                              llm_text.context_length(model))
        if inputs.dropped:
            log.warning("GILL: the prompt is %d positions longer than %s's context; its oldest %d positions "
                        "are left out (%d of %d images kept)", inputs.dropped, llm.describe(), inputs.dropped,
                        inputs.images_used, 0 if images is None else images.shape[0])
        hidden = img_hidden_states(model, inputs, cfg.num_img_tokens)
    step()
    return hidden


def generation(gill, states: torch.Tensor):
    """[IMG] states (B, 8, llm_dim) -> GILLMapper (tokens (B, 77, width), pooled or None)."""
    g = gill.module()
    with torch.no_grad():
        return g.generation_embedding(states.to(g.visual_fc.weight.device))


def vision_identity(clip_vision) -> str:
    """ComfyUI's CLIP_VISION does not keep its file's name: its weights' fingerprint and precision name it."""
    return f"{gill_files.vision_fingerprint(clip_vision)}:{getattr(clip_vision, 'dtype', '')}"


def encode_conditioning(llm, gill, prompt, images=None, clip_vision=None, *, disk_cache=False, progress=None):
    """{"conditioning", "img_states"} of a prompt with pictures; identical requests are served from the caches."""
    warn_ignored(prompt, "GILL")

    def compute():
        hidden = img_states(llm, gill, prompt, images, clip_vision, progress)
        tokens, pooled = generation(gill, hidden)
        if progress is not None:
            progress()
        return {"conditioning": conditioning(tokens, pooled), "img_states": hidden.cpu()}

    # the vision tower counts only where it reads pictures
    vision = vision_identity(clip_vision) if images is not None and clip_vision is not None else None
    return reuse_encoding("gill", [llm.identity, gill.identity], [prompt, images, vision], compute,
                          disk=disk_cache, about={"llm": llm.describe(), "gill": gill.describe()})


def check_states(gill, states):
    if states.ndim != 3 or states.shape[-1] != gill.config.llm_dim or states.shape[1] != gill.config.num_img_tokens:
        raise InputError(f"img_states {tuple(states.shape)} do not come from {gill.describe()} "
                         f"(expected (1, {gill.config.num_img_tokens}, {gill.config.llm_dim})); connect the same GILL")


def retrieval_query(gill, states) -> torch.Tensor:
    """The unit-length text retrieval embedding (ret_dim,) of one prompt's [IMG] states, on the CPU."""
    check_states(gill, states)
    g = gill.module()
    with torch.no_grad():
        return g.text_retrieval_embedding(states.to(g.visual_fc.weight.device))[0].float().cpu()


def _cover(image, height, width):
    """(1, H, W, 3) -> (1, height, width, 3): scaled to cover, centre-cropped (a batch needs one size)."""
    if image.shape[1:3] == (height, width):
        return image
    x = image.movedim(-1, 1)
    scale = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * scale)), max(width, round(x.shape[3] * scale)))
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].movedim(1, -1)


def retrieve(gill, index: ImageIndex, states, k: int, shown=()):
    """(IMAGE batch of the k best readable matches, cropped to the best one's size, [(image, path, cosine)]);
    paths already `shown` come last (loaders.gill.retrieve_images)."""
    gill_files.check_index(gill, index)
    found = gill_files.retrieve_images(index, retrieval_query(gill, states), k, shown)
    height, width = found[0][0].shape[1:3]
    return torch.cat([_cover(img, height, width) for img, _, _ in found]), found


def decide(gill, states, threshold: float, index=None):
    """(decision, P(retrieve)). Retrieve when P(retrieve) >= threshold (0.5 = the decision model's argmax)."""
    check_states(gill, states)
    g = gill.module()
    device = g.visual_fc.weight.device
    best = None
    with torch.no_grad():
        if g.needs_retrieval_score():
            if index is None:
                raise InputError(f"{gill.describe()}'s decision model also reads the best retrieval score: connect "
                                 f"the image index to 'index'")
            gill_files.check_index(gill, index)
            best = index.best_score(retrieval_query(gill, states))
        p = g.retrieve_probability(states.to(device), best)
    return (RETRIEVE if p >= threshold else GENERATE), p


def build_index(gill, clip_vision, root: Path, index_dir: Path, name: str, *, rebuild=False, progress=None,
                batch_size: int = 8):
    """Embed the pictures of `root` into the index `name` (CLIP ViT-L/14 -> GILL's visual_fc), reusing the rows
    of unchanged files. progress(done, total) after each picture (it may raise to stop; nothing is written then).
    Returns (ImageIndex, report dict with added/kept/removed/skipped/total). Unreadable files are skipped and
    listed, never fatal."""
    gill_files.check_vision(gill, clip_vision)
    fingerprint = gill_files.index_fingerprint(gill, clip_vision)
    old, state, kept = gill_files.reusable_rows(index_dir, name, root, fingerprint, rebuild)
    todo = [rel for rel, _, _ in state if rel not in kept]
    model = gill.module()
    new, skipped, batch = {}, [], []

    def embed():
        if not batch:
            return
        pooled = torch.cat([gill_files.clip_pooled(clip_vision, img[None]) for _, img in batch])
        with torch.no_grad():
            rows = model.image_retrieval_embedding(pooled.to(model.visual_fc.weight.device)).float().cpu()
        new.update((rel, row) for (rel, _), row in zip(batch, rows))
        batch.clear()

    for i, rel in enumerate(todo):
        try:
            batch.append((rel, picture_files.load_image(root / rel)))
        except LoadError as e:
            skipped.append(f"{rel}: {str(e).split(' could not be read as a picture ')[-1][:160]}")
        if len(batch) >= batch_size:
            embed()
        if progress is not None:
            progress(i + 1, len(todo))
    embed()
    return gill_files.write_built_index(index_dir, name, root, fingerprint, state, kept, new, skipped, old,
                                        gill.config.ret_dim)
