"""Encodings reused across graphs: an in-memory LRU, and an opt-in disk cache in ComfyUI's output folder.

ComfyUI's own cache already skips a node whose inputs did not change in the same graph; this one also serves
identical (model, bridge, text) requests from other graphs, and with the disk cache, across restarts.
"""
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

DISK_FOLDER = "beyond_clip_encodings"


def file_identity(path) -> str:
    """Changes when the file (or any file of a folder) is replaced or edited."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()


class EncodingCache:
    def __init__(self, max_items: int = 64):
        self.max_items = max_items
        self.items = OrderedDict()
        self.hits = 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        return None

    def put(self, key, value):
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)


MEMORY = EncodingCache()


def disk_path(output_dir, key) -> Path:
    return Path(output_dir) / DISK_FOLDER / f"{key}.safetensors"


def save_conditioning(path, cond, metadata: dict):
    """CONDITIONING ([[tensor, {name: tensor}], ...]) as safetensors; `metadata` says what was encoded."""
    tensors = {}
    for i, (tokens, extra) in enumerate(cond):
        tensors[f"{i}.tokens"] = tokens.detach().float().cpu().contiguous()
        for name, value in extra.items():
            if torch.is_tensor(value):
                tensors[f"{i}.{name}"] = value.detach().float().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "beyond_clip.conditioning", "about": json.dumps(metadata)})
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_conditioning(path, device):
    """The CONDITIONING saved at `path`, or None if it is absent or unreadable (it is then recomputed)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != "beyond_clip.conditioning":
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError):
        return None
    cond = []
    for i in range(len([k for k in tensors if k.endswith(".tokens")])):
        extra = {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items()
                 if k.startswith(f"{i}.") and not k.endswith(".tokens")}
        cond.append([tensors[f"{i}.tokens"].to(device), extra])
    return cond
