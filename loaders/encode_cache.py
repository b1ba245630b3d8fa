"""Encodings reused across graphs: an in-memory LRU, and an opt-in disk cache in ComfyUI's output folder.

ComfyUI's own cache already skips a node whose inputs did not change in the same graph; this one also serves
identical (models, inputs) requests from other graphs, and with the disk cache, across restarts. An encoding
is a dict of named parts, each a CONDITIONING ([[tokens, {name: tensor}], ...]) or a plain tensor (GILL's
[IMG] states, SEED codes).
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
FORMAT = "beyond_clip.encoding.v2"  # in every key too: a layout change never reads an older file


def file_identity(path) -> str:
    """Changes when the file (or any file of a folder) is replaced or edited."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:16]


def content_hash(t: torch.Tensor) -> str:
    """What a tensor holds (dtype, shape, bytes): the same picture from two LoadImage nodes hashes the same."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _plain(obj):
    if torch.is_tensor(obj):
        return f"tensor:{content_hash(obj)}"
    if isinstance(obj, (torch.dtype, Path)):
        return str(obj)
    # str() of other objects may name their id or elide values: two different requests could share a key
    raise TypeError(f"encoding cache keys take strings, numbers, tensors and lists of them, not {type(obj).__name__}")


def describe(value) -> str:
    """`value` as JSON, tensors replaced by their content hash."""
    return json.dumps(value, default=_plain)


def cache_key(*parts) -> str:
    return hashlib.sha1(describe([FORMAT, *parts]).encode()).hexdigest()


def _nbytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class EncodingCache:
    """Least recently used first out, bounded by count and by tensor bytes (MUMU's image tokens are large)."""

    def __init__(self, max_items: int = 64, max_bytes: int = 1 << 30):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items = OrderedDict()  # key -> (value, bytes)
        self.hits = 0
        self.misses = 0

    def clear(self):
        self.items.clear()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key][0]
        self.misses += 1
        return None

    def put(self, key, value):
        self.items[key] = (value, _nbytes(value))
        self.items.move_to_end(key)
        while len(self.items) > 1 and (len(self.items) > self.max_items or
                                       sum(size for _, size in self.items.values()) > self.max_bytes):
            self.items.popitem(last=False)


MEMORY = EncodingCache()


def disk_path(output_dir, key) -> Path:
    return Path(output_dir) / DISK_FOLDER / f"{key}.safetensors"


def save_encoding(path, value: dict, metadata: dict):
    """`value` ({name: CONDITIONING or tensor}) as safetensors; `metadata` says what was encoded. Conditioning
    entries' non-tensor values (JSON-able) go into the header."""
    tensors, layout = {}, {}
    for name, part in value.items():
        if torch.is_tensor(part):
            tensors[name] = part.detach().cpu().contiguous()
            layout[name] = "tensor"
            continue
        entries = []
        for i, (tokens, extra) in enumerate(part):
            tensors[f"{name}.{i}.tokens"] = tokens.detach().float().cpu().contiguous()
            plain = {}
            for key, v in extra.items():
                if torch.is_tensor(v):
                    tensors[f"{name}.{i}.{key}"] = v.detach().float().cpu().contiguous()
                else:
                    plain[key] = v
            entries.append(plain)
        layout[name] = entries
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "layout": json.dumps(layout),
                                           "about": json.dumps(metadata, default=str)})
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_encoding(path, device):
    """The encoding saved at `path` (conditioning on `device`, other tensors on the CPU), or None if it is
    absent, unreadable or incomplete (it is then recomputed)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None
            layout = json.loads(meta["layout"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not iterable
        value = {}
        for name, spec in layout.items():
            if spec == "tensor":
                value[name] = tensors[name]
                continue
            cond = []
            for i, plain in enumerate(spec):
                prefix = f"{name}.{i}."
                extra = {k[len(prefix):]: v.to(device) for k, v in tensors.items()
                         if k.startswith(prefix) and k != prefix + "tokens"}
                extra.update(plain)
                cond.append([tensors[prefix + "tokens"].to(device), extra])
            value[name] = cond
        return value
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, AttributeError):
        return None
