"""Pickled weight files (.pth, .pth.tar, .pt, .bin): read one way, torch.load(weights_only=True, map_location="cpu"),
and when that fails, told for what the file is, from its own bytes: truncated, random or another format, a pickle
torch.save did not write, or one that holds Python objects. torch's own message is never passed on: it advises
weights_only=False, which would run whatever code such a file carries, and this pack never does that.
"""
import re
from pathlib import Path

import torch

from .errors import LoadError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _errors(error: BaseException):
    """The error and the ones it was raised from or while handling (torch wraps the unpickler's own error)."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def why_unreadable(path, error: BaseException) -> str:
    """Why torch.load(weights_only=True) failed on `path`: the rest of a sentence that starts with the file's name."""
    text = " ".join(str(e) for e in _errors(error))
    found = _GLOBAL.search(text)
    if found:
        return (f"holds Python objects besides tensors ({found.group(1)}), which this pack never unpickles: it reads "
                f"pickled weights only as plain tensors and containers")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = Path(path).stat().st_size
    except OSError as e:
        return f"could not be read ({e})"
    if size == 0:
        return "is empty"
    if head.startswith(ZIP_MAGIC):
        return "is truncated or corrupt (its zip archive cannot be read to the end)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        if any(isinstance(e, EOFError) for e in _errors(error)) or "EOF" in text or "truncated" in text:
            return "is truncated (it ends in the middle of its pickle)"
        if head[1] > 2:  # torch.save writes protocol 2
            return (f"is a Python pickle (protocol {head[1]}) that torch.save did not write, so its weights cannot be "
                    f"read as plain tensors; save them with torch.save or as .safetensors")
        return "is corrupt: its pickle cannot be read as plain tensors"
    return (f"is not a PyTorch weights file (it starts with bytes {head!r}, neither a torch.save archive nor a "
            f"pickle): it is corrupt, or a file of another kind")


def load(path, advice: str, mmap: bool = True):
    """The unpickled object of a weights file, read weights-only onto the CPU (memory-mapped when the file allows
    it). LoadError naming the file, saying what is wrong with it, and `advice` (what to do)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file. {advice}")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == ZIP_MAGIC
        # Only zip archives can be memory-mapped; the legacy format is read into memory.
        return torch.load(str(path), weights_only=True, map_location="cpu", mmap=mmap and zipped)
    except Exception as e:  # torch raises many kinds for damaged and unsafe files: each is told for what it is
        failure = e
    raise LoadError(f"{path} {why_unreadable(path, failure)}. {advice}") from None
