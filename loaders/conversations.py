"""Conversation files: one JSON file per conversation, its pictures inside it as PNG (base64 data URIs), so a
conversation is one file to keep, send or load.

    {"format": "beyond_clip.conversation", "version": 1,
     "turns": [{"role": "user", "parts": [
                   {"text": "..."},
                   {"picture": {"origin": "user", "note": "", "image": "data:image/png;base64,..."}}]},
               {"role": "assistant", "parts": [
                   {"text": "..."},
                   {"picture": {"origin": "generated", "note": "...", "image": null}}]}]}

A generated picture that was never drawn back into the conversation has "image": null. Pictures are stored as 8-bit
PNG (the precision of a saved picture). Written atomically (tmp + rename); an existing file that is not a conversation
is never replaced. Read strictly: anything else is refused with a LoadError naming the file and what is wrong.
"""
import base64
import binascii
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..bridges.conversation import FORMAT, Conversation, ConversationError, from_data, to_data
from .errors import LoadError

FOLDER = "beyond_clip_conversations"  # under ComfyUI's output folder
SUFFIX = ".conversation.json"
PNG_URI = "data:image/png;base64,"
MAX_BYTES = 512 * 1024 * 1024  # a sanity bound: refuse before reading something that cannot be a conversation


def _png_uri(picture) -> str:
    pixels = (picture.image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return PNG_URI + base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_png(ref: str, where: str) -> torch.Tensor:
    if not ref.startswith(PNG_URI):
        raise ConversationError(f"{where}: the picture is not a PNG data URI ('{PNG_URI}...')")
    try:
        data = base64.b64decode(ref[len(PNG_URI):], validate=True)
    except (binascii.Error, ValueError):
        raise ConversationError(f"{where}: the picture's base64 text is damaged") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ConversationError(f"{where}: the picture is {img.format}, not PNG")
            img.load()
            rgb = img.convert("RGB")
    except ConversationError:
        raise
    except Exception as e:  # noqa: BLE001  PIL's decoders raise many kinds on damaged data; all mean the same here
        raise ConversationError(f"{where}: the picture cannot be decoded ({type(e).__name__}: "
                                f"{str(e)[:120]})") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def is_conversation_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return FORMAT.encode() in head


def save_conversation(path, conversation: Conversation) -> Path:
    path = Path(path)
    if path.is_dir() or path.exists() and not is_conversation_file(path):
        raise LoadError(f"{path} exists and is not a conversation file written by this pack; choose another name "
                        f"(the pack never replaces other files).")
    text = json.dumps(to_data(conversation, _png_uri), indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_conversation(path) -> Conversation:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise LoadError(f"{path} is {size / 2**20:.0f} MiB: too large to be a conversation file.")
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise LoadError(f"{path}: no such conversation file.") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LoadError(f"{path} is not a conversation file: it is truncated or not JSON ({type(e).__name__}: "
                        f"{str(e)[:160]}). Save the conversation again with 'Save Conversation'.") from None
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    try:
        return from_data(data, _read_png)
    except ConversationError as e:
        raise LoadError(f"{path} cannot be loaded: {e}. Save the conversation again with 'Save Conversation', or "
                        f"choose a file written by it.") from None
    except RecursionError:
        raise LoadError(f"{path} is not a conversation file (nested too deeply).") from None


def conversation_files(folders) -> list:
    """(label, path) of every *.conversation.json directly in each (label prefix, folder), sorted."""
    found = []
    for prefix, folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            for f in sorted(folder.glob("*" + SUFFIX)):
                if f.is_file():
                    found.append((f"{prefix}/{f.name}", f))
    return found
