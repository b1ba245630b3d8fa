"""Identical encoding requests from any graph are served once: an in-memory LRU and an opt-in disk cache in
output/beyond_clip_encodings (loaders/encode_cache.py holds the storage)."""
import json
import logging

import comfy.model_management as mm
import folder_paths
import torch

from ..loaders import encode_cache

log = logging.getLogger(__name__)


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
