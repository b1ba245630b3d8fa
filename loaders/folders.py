"""Where the pack's model files live, through ComfyUI's folder registry (so extra_model_paths.yaml works)."""
import os
import re
from pathlib import Path

import folder_paths

from .bridge_files import kind_of, writable_path
from .errors import InputError, LoadError

LLM = "LLM"  # Hugging Face model folders (config.json, weights, tokenizer files), the convention of LLM packs
GGUF = ".gguf"  # single-file LLMs in llama.cpp's format, in models/LLM too
BRIDGES = "bridges"  # the pack's own small weights: mappers, adapters, routers
BRIDGE_EXTENSIONS = {".safetensors", ".json"}


GROUNDING_DINO = "grounding-dino"  # Grounding DINO Hugging Face folders (MUMU's dataset builder); SAM packs share it


def register_model_folders():
    """Add models/LLM, models/bridges and models/grounding-dino unless ComfyUI or another pack already registered
    them (then the pack's extensions are added to theirs)."""
    for name, extensions in ((LLM, {".safetensors", ".bin", GGUF}), (BRIDGES, BRIDGE_EXTENSIONS),
                             (GROUNDING_DINO, {".safetensors", ".bin", ".json"})):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))
        else:  # another pack registered it with its own extensions: make sure ours are listed too
            paths, extensions_there = folder_paths.folder_names_and_paths[name]
            folder_paths.folder_names_and_paths[name] = (paths, set(extensions_there) | set(extensions))


def search_paths(folder_name):
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(folder_name)]
    except KeyError:
        return []


def list_model_dirs(folder_name=LLM, marker="config.json", depth=2):
    """Sub-folders (up to `depth` levels, e.g. 'org/model') that hold `marker`, as posix names."""
    found = set()
    for base in search_paths(folder_name):
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            rel = Path(dirpath).relative_to(base)
            if marker in filenames and rel != Path("."):
                found.add(rel.as_posix())
            if len(rel.parts) >= depth:
                dirnames.clear()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def list_llms():
    """What Load LLM offers: Hugging Face folders and .gguf files in models/LLM (up to two levels down)."""
    files = set()
    for base in search_paths(LLM):
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            rel = Path(dirpath).relative_to(base)
            files.update((rel / f).as_posix() for f in filenames if f.lower().endswith(GGUF) and not f.startswith("."))
            if len(rel.parts) >= 2:
                dirnames.clear()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return list_model_dirs(LLM) + sorted(files)


def resolve_model_dir(name, folder_name=LLM) -> Path:
    """The folder (or, for a name ending in .gguf, the file) `name` in the model folders."""
    searched = search_paths(folder_name)
    for base in searched:
        path = base / name
        if path.is_dir() or name.lower().endswith(GGUF) and path.is_file():
            return path
    where = ", ".join(str(p) for p in searched) or f"models/{folder_name}"
    raise LoadError(f"model folder '{name}' was not found in {where}. Put the Hugging Face model folder "
                    f"(config.json, weight files, tokenizer files) there, or add its parent to "
                    f"extra_model_paths.yaml under '{folder_name}', then refresh.")


_NAME = re.compile(r"^[\w.\- ]+$")


def check_output_name(name: str, what: str, extension: str = ".safetensors") -> str:
    """A file name the user typed for something the pack writes: letters, digits, spaces, '.', '-', '_', no folders;
    the extension is dropped if given."""
    name = name.strip()
    if name.endswith(extension):
        name = name[: -len(extension)]
    if not name or not _NAME.match(name) or name.startswith("."):
        raise InputError(f"{what} {name!r}: use letters, digits, spaces, '.', '-' or '_' only (no folders)")
    return name


def bridge_output_path(name: str, what: str = "output name", extension: str = ".safetensors", kind=None) -> Path:
    """models/bridges/<name><extension> (the first bridges folder); with `kind`, refused when a file of another kind
    (or another tool's) is there (bridge_files.writable_path)."""
    base = Path(folder_paths.get_folder_paths(BRIDGES)[0])
    path = base / f"{check_output_name(name, what, extension)}{extension}"
    return writable_path(path, kind) if kind else path


def list_bridge_files(extension=".safetensors", kind=None):
    """Files in models/bridges with this extension; with `kind`, only the pack's bridge files of that kind (read
    from each file's header, remembered while the file is unchanged)."""
    names = sorted(f for f in folder_paths.get_filename_list(BRIDGES) if f.endswith(extension))
    if kind is None:
        return names
    return [n for n in names if _kind_of_listed(n) == kind]


_KIND_SEEN = {}  # path -> ((size, mtime_ns), kind): dropdowns are listed often, headers change rarely


def _kind_of_listed(name):
    path = folder_paths.get_full_path(BRIDGES, name)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    seen = _KIND_SEEN.get(path)
    if seen is None or seen[0] != stamp:
        seen = _KIND_SEEN[path] = (stamp, kind_of(path))
    return seen[1]


def check_bridge_choice(name, kind, what):
    """True when `name` is a file in models/bridges (its loader says what is wrong with it, if anything), else the
    message a loader node shows, listing the files of `kind` there."""
    path = folder_paths.get_full_path(BRIDGES, name)
    if path is not None and os.path.isfile(path):
        return True
    return not_found_message(what, name, list_bridge_files(kind=kind), f"models/{BRIDGES}")


def not_found_message(what, name, choices, where):
    """The one way the pack says a chosen file or folder is missing: what it looked for, where, what is there."""
    listed = ", ".join(choices[:5]) + (f" (+{len(choices) - 5} more)" if len(choices) > 5 else "") if choices \
        else "none"
    return (f"{what} '{name}' is not in {where} (found: {listed}). Put it there, or pick one that is present, "
            f"then refresh the page.")


def resolve_bridge_file(name) -> Path:
    path = folder_paths.get_full_path(BRIDGES, name)
    if path is None or not os.path.isfile(path):
        where = ", ".join(str(p) for p in search_paths(BRIDGES))
        raise LoadError(f"bridge file '{name}' was not found in {where}. Put it in models/{BRIDGES}/ "
                        f"(or train one) and refresh the node list.")
    return Path(path)
