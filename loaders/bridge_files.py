"""The pack's own weight files: one safetensors file per bridge, self-describing through its metadata.

metadata = {"format": "beyond_clip.bridge", "format_version": "1", "kind": <kind>, "config": <json>}
Tensors are read memory-mapped, straight into the dtype they were saved in. This module is the one place that
reads that metadata (read_metadata, kind_of), the one place that decides whether an output file may be written
(writable_path), and the one strict loader (load_state_into).
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import LoadError

FORMAT = "beyond_clip.bridge"
FORMAT_VERSION = "1"

# kind -> what a person calls it, for messages and for dropdowns that list one kind.
KINDS = {
    "beyond_clip_mapper": "Beyond CLIP mapper",
    "repadapter": "RepAdapter",
    "gill": "GILL model",
    "seed_v1": "SEED v1 tokenizer",
    "mumu_connector": "MUMU connector",
    "seed_llm": "SEED-LLM visual vocabulary",
    "seed_sdxl_head": "SEED de-tokenizer head for SDXL",
    # files the pack writes in another tool's format (kohya LoRA, peft), marked with metadata beyond_clip_kind
    "mumu_unet_lora": "MUMU UNet LoRA",
    "mumu_idefics2_lora": "MUMU Idefics2 LoRA (peft)",
    "seed_llm_lora": "SEED-LLM LoRA (peft)",
}


def label(kind: str) -> str:
    return KINDS.get(kind, repr(kind))


def read_metadata(path):
    """The safetensors metadata of `path` (a dict, {} when it has none), or None when the file is missing or not
    a readable safetensors file. Reads the header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return None


def kind_of(path):
    """The kind of a file the pack wrote ('beyond_clip_mapper', ..., or for files in another tool's format its
    beyond_clip_kind mark), or None for any other file."""
    meta = read_metadata(path)
    if not meta:
        return None
    return meta.get("kind") if meta.get("format") == FORMAT else meta.get("beyond_clip_kind")


def save_bridge(path, kind: str, config: dict, state_dict: dict):
    """Write a bridge file atomically: a crash mid-write leaves the previous file (or none), never half a file."""
    if kind not in KINDS:
        raise ValueError(f"unknown bridge kind {kind!r}")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "config": json.dumps(config)}
    bad = next((k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise LoadError(f"the {label(kind)} to be written to {path} holds NaN or infinite values (in '{bad}'): the "
                        f"training diverged. Nothing was written; train again with a lower learning rate (with "
                        f"'resume' off).")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def writable_path(path, kind: str) -> Path:
    """`path` when it may be written: absent, or a pack file of this `kind` (a re-run replaces its own result).
    Anything else there (another kind, another tool's file, a folder) is never replaced: LoadError."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{path} is a folder; choose another output name.")
    if path.exists() and kind_of(path) != kind:
        raise LoadError(f"{path} exists and is not a {label(kind)} written by this pack; choose another output "
                        f"name (the pack never replaces other files).")
    return path


def read_bridge(path, kind: str):
    """(config dict, state dict) of a bridge file of `kind`, or LoadError saying what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file. Put the {label(kind)} file in models/bridges/.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise LoadError(f"{path} is a safetensors file but not a Beyond CLIP bridge (its metadata has no "
                                f"'format': '{FORMAT}'); it may be a checkpoint or LoRA for another tool. "
                                f"Use a file written by this pack's training or conversion nodes.")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise LoadError(f"{path} has bridge format version {metadata.get('format_version')!r}; this "
                                f"version of the pack reads {FORMAT_VERSION!r}. Update the pack.")
            found = metadata.get("kind")
            if found != kind:
                raise LoadError(f"{path} holds a {label(found)}, not a {label(kind)}. "
                                f"Load it with the matching node, or choose a {label(kind)} file here.")
            try:
                config = json.loads(metadata["config"])
            except (KeyError, ValueError, RecursionError) as e:
                raise LoadError(f"{path}: its config metadata is missing or not JSON ({e}). The file is "
                                f"damaged; write it again.") from None
            if not isinstance(config, dict):
                raise LoadError(f"{path}: its config metadata is not a JSON object. The file is damaged; write it "
                                f"again.")
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not iterable
    except SafetensorError as e:
        raise LoadError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt. "
                        f"Copy or train it again.") from None
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    bad = next((k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:  # it would turn every picture into noise without a word
        raise LoadError(f"{path} holds NaN or infinite values (in '{bad}'): the training that wrote it diverged, or "
                        f"the file was damaged. Train it again (with a lower learning rate), or use another file.")
    return config, state_dict


REWRITE = "The file is damaged or was edited; write it again."


def _mismatch(own: dict, state_dict: dict) -> list:
    """What differs between a module's state dict and a file's tensors, as phrases (empty when they match)."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs expected {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
    if wrong:
        parts.append(f"wrong shapes: {wrong[:3]}")
    return parts


def load_state_into(module: torch.nn.Module, state_dict: dict, path, what: str, advice: str = REWRITE):
    """Strict load that explains missing, unexpected and wrongly shaped tensors by name (and `advice`: what to do).
    A module built on the meta device takes the file's tensors as its parameters (no second copy in memory)."""
    own = module.state_dict()
    parts = _mismatch(own, state_dict)
    if parts:
        raise LoadError(f"{path} does not match the {what} its config describes: " + "; ".join(parts) + f". {advice}")
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)


def layer_count(state_dict: dict, prefix: str) -> int:
    """How many numbered layers the tensors under `prefix` hold ('layers.0.', 'layers.1.', ... -> 2)."""
    found = set()
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return len(found)


def check_layer_counts(counts: dict, state_dict: dict, path, what: str, advice: str = REWRITE):
    """counts: {config field: (its value, tensor prefix of those layers)}. The numbers of layers a config asks for
    are checked against the layers the file's tensors hold before any module is built: a config that claims a
    million layers is refused, never built."""
    for field, (value, prefix) in counts.items():
        found = layer_count(state_dict, prefix)
        if isinstance(value, bool) or not isinstance(value, int) or value != found:
            raise LoadError(f"{path}: its {what} config gives {field}={value!r}, but the file holds {found} such "
                            f"layer(s) ('{prefix}N.*' tensors). {advice}")


def checked_build(build, state_dict: dict, path, what: str, advice: str = REWRITE) -> torch.nn.Module:
    """build() on the meta device (no memory is allocated, whatever sizes the config claims), its tensors compared
    with the file's by name and shape: LoadError naming what differs, or a config the module refuses. Returns the
    meta module; only a file that matches it is ever built for real."""
    try:
        with torch.device("meta"):
            module = build()
    except Exception as e:  # a config the module's constructor refuses (bad sizes, heads that do not divide, ...)
        raise LoadError(f"{path}: its {what} config is not valid ({type(e).__name__}: {str(e)[:200]}). "
                        f"{advice}") from None
    parts = _mismatch(module.state_dict(), state_dict)
    if parts:
        raise LoadError(f"{path} does not match the {what} its config describes: " + "; ".join(parts) + f". {advice}")
    return module
