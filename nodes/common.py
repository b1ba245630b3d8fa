"""What every node family shares: socket types, progress, conditioning assembly, model checks."""
import json
import logging

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..loaders import encode_cache

CATEGORY = "Beyond CLIP"
LLM_TYPE = "BEYOND_CLIP_LLM"
MAPPER_TYPE = "BEYOND_CLIP_MAPPER"
REPADAPTER_TYPE = "BEYOND_CLIP_REPADAPTER"
ROUTER_TYPE = "BEYOND_CLIP_ROUTER"
MUMU_DATASET_TYPE = "BEYOND_CLIP_MUMU_DATASET"  # a built MUMU dataset folder (Build MUMU Dataset -> the MUMU trainers)
# Every encoder node's last input: ComfyUI's workflow files store widget values by position.
CACHE_TO_DISK = ("BOOLEAN", {"default": False, "tooltip": "also keep the encoding in output/"
                             f"{encode_cache.DISK_FOLDER} so it survives a restart"})
log = logging.getLogger(__name__)


class Progress:
    """A ComfyUI progress bar whose every step is also a place where the user's interrupt stops the work."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def step(self, value: int = None):
        mm.throw_exception_if_processing_interrupted()
        if value is None:
            self.bar.update(1)
        else:
            self.bar.update_absolute(min(value, self.total))


def conditioning(tokens: torch.Tensor, pooled: torch.Tensor = None):
    """ComfyUI's CONDITIONING: [[(1, N, width) float32 tensor, {pooled_output?}]] on the intermediate device."""
    device = mm.intermediate_device()
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = pooled.float().to(device)
    return [[tokens.float().to(device), extra]]


def zero_conditioning_like(cond):
    return [[torch.zeros_like(t), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in d.items()}]
            for t, d in cond]


def model_context_width(model):
    """The cross-attention width a MODEL expects (768 SD1.x, 1024 SD2, 2048 SDXL), or None if unknown."""
    try:
        return int(model.model.model_config.unet_config["context_dim"])
    except (AttributeError, KeyError, TypeError):
        return None


def model_needs_pooled(model) -> bool:
    try:
        return model.model.model_config.unet_config.get("adm_in_channels") is not None
    except AttributeError:
        return False


def check_width_against_model(model, width: int, pooled: bool, what: str):
    """Fail before sampling when a bridge was made for another model family."""
    expected = model_context_width(model)
    if expected is None or (expected == width and (pooled or not model_needs_pooled(model))):
        return
    family = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
    if expected != width:
        raise ValueError(f"{what} produces {width}-wide tokens ({family.get(width, 'unknown model family')}), but the "
                         f"MODEL expects {expected} ({family.get(expected, 'this model')}). Use a bridge made for "
                         f"{family.get(expected, 'this model')}, or the matching checkpoint.")
    raise ValueError(f"{what} has no pooled output, but the MODEL ({family.get(expected, 'this model')}) needs the "
                     f"1280-wide pooled vector. Use a bridge made for SDXL.")


def missing_file_message(kind, name, choices, folder):
    listed = ", ".join(choices[:5]) if choices else "none"
    return (f"{kind} '{name}' is not in models/{folder} (found: {listed}). Put it there, or pick one that is "
            f"present, then refresh the page.")


def _fresh(part):
    """A CONDITIONING with its own lists and dicts (the tensors are shared, as ComfyUI shares outputs): a node
    that updates its input's dict, as the stock ones do to copies, cannot change the cached encoding."""
    if torch.is_tensor(part):
        return part
    return [[tokens, dict(extra)] for tokens, extra in part]


def reuse_encoding(what: str, identities, inputs, compute, *, disk=False, about=None) -> dict:
    """compute() -> {name: CONDITIONING or tensor}, run once for identical requests from any graph.

    The key is `what`, the identities of every model and bridge involved (file identity, dtype, adapters; an
    empty one, e.g. a model built in memory, turns caching off) and `inputs` (text, settings, and image tensors
    by content). With `disk`, the encoding is also kept in output/beyond_clip_encodings; an unreadable file there
    is recomputed and written again."""
    if not all(identities):
        return compute()
    key = encode_cache.cache_key(what, list(identities), inputs)
    path = encode_cache.disk_path(folder_paths.get_output_directory(), key) if disk else None
    value, source = encode_cache.MEMORY.get(key), "memory"
    if value is None and path is not None:
        value, source = encode_cache.load_encoding(path, mm.intermediate_device()), "disk"
    if value is None:
        value, source = compute(), "computed"
    if path is not None and (source == "computed" or source == "memory" and not path.is_file()):
        try:
            encode_cache.save_encoding(path, value, {"what": what, "identities": list(identities),
                                                     "inputs": json.loads(encode_cache.describe(inputs)),
                                                     **(about or {})})
        except (OSError, TypeError, ValueError) as e:  # a full disk or an odd value costs the file, not the run
            log.warning("Beyond CLIP: could not keep the encoding in %s (%s: %s)", path, type(e).__name__, e)
    encode_cache.MEMORY.put(key, value)
    return {name: _fresh(part) for name, part in value.items()}
