"""The pack's own weight files: one safetensors file per bridge, self-describing through its metadata.

metadata = {"format": "beyond_clip.bridge", "format_version": "1", "kind": <kind>, "config": <json>}
Tensors are read memory-mapped, straight into the dtype they were saved in.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import LoadError

FORMAT = "beyond_clip.bridge"
FORMAT_VERSION = "1"

# kind -> what a person calls it, for messages. Each family's loader module registers its kinds here.
KINDS = {}


def register_kind(kind: str, label: str) -> str:
    KINDS[kind] = label
    return kind


def save_bridge(path, kind: str, config: dict, state_dict: dict):
    if kind not in KINDS:
        raise ValueError(f"unknown bridge kind {kind!r}")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "config": json.dumps(config)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_bridge(path, kind: str):
    """(config dict, state dict) of a bridge file of `kind`, or LoadError saying what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file. Put the {KINDS[kind]} file in models/bridges/.")
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
                raise LoadError(f"{path} holds a {KINDS.get(found, repr(found))}, not a {KINDS[kind]}. "
                                f"Load it with the matching node, or choose a {KINDS[kind]} file here.")
            try:
                config = json.loads(metadata["config"])
            except (KeyError, ValueError) as e:
                raise LoadError(f"{path}: its config metadata is missing or not JSON ({e}). The file is "
                                f"damaged; write it again.") from None
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise LoadError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt. "
                        f"Copy or train it again.") from None
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    return config, state_dict


def load_state_into(module: torch.nn.Module, state_dict: dict, path, what: str):
    """Strict load that explains missing, unexpected and wrongly shaped tensors by name. A module built on the
    meta device takes the file's tensors as its parameters (no second copy in memory)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs expected {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"wrong shapes: {wrong[:3]}")
        raise LoadError(f"{path} does not match the {what} its config describes: " + "; ".join(parts) +
                        ". The file is damaged or was edited; write it again.")
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)
