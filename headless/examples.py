"""The pack's example inputs (data/examples/: pictures, caption files, a picture set) and putting the ones a
workflow names into ComfyUI's input folder.

A file or folder of the same name already there is the user's: it is never replaced or added to, and the run
uses it (and says so). Imports nothing of the pack (the frontend's server uses it too).
"""
import os
import shutil
import tempfile
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "examples"
LIST_SUFFIXES = {".tsv", ".txt"}  # caption and pair files: the pictures they name are examples too
NOT_INPUTS = {"README.md"}


def example_path(name):
    """data/examples/<name> when `name` is one of the pack's example inputs (a file, or a folder with a trailing
    '/' or without), else None."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or any(c in name for c in "\\\n\t<>"):
        return None  # prompts and other text are not file names
    parts = Path(name.rstrip("/")).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or Path(name).is_absolute() or parts[0] in NOT_INPUTS:
        return None
    path = EXAMPLES_DIR.joinpath(*parts)
    try:
        return path if path.exists() and EXAMPLES_DIR in path.resolve().parents else None
    except OSError:  # a name the file system cannot hold
        return None


def named_by(prompt: dict) -> list:
    """Example inputs the (API-format) prompt names, with the files their caption and pair lists name."""
    found = []

    def add(rel):
        if rel not in found:
            found.append(rel)
            path = EXAMPLES_DIR / rel
            if path.is_file() and path.suffix in LIST_SUFFIXES:
                for line in path.read_text(encoding="utf-8").splitlines():
                    for field in line.split("\t"):
                        if example_path(field.strip()) is not None:
                            add(field.strip().rstrip("/"))

    for node in prompt.values():
        for value in node.get("inputs", {}).values():
            if example_path(value) is not None:
                add(value.rstrip("/"))
    return found


def _same(src: Path, dst: Path) -> bool:
    if src.is_dir():
        return dst.is_dir() and all(_same(f, dst / f.relative_to(src)) for f in src.rglob("*") if f.is_file())
    return dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes()


def _copy(src: Path, dst: Path):
    """Copy a file or folder so that `dst` appears whole or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        staged = tmp / dst.name
        if src.is_dir():
            shutil.copytree(src, staged)
        else:
            shutil.copyfile(src, staged)
        if dst.exists():  # appeared meanwhile: it is someone's own, keep it
            return False
        os.replace(staged, dst)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place(prompt: dict, input_dir: Path) -> list:
    """Put the example inputs the prompt names into `input_dir`; returns what was done, one line each."""
    said = []
    for rel in named_by(prompt):
        src, dst = EXAMPLES_DIR / rel, Path(input_dir) / rel
        shown = rel + ("/" if src.is_dir() else "")
        if not dst.exists() and _copy(src, dst):
            said.append(f"{shown}: the pack's example, copied into {input_dir}")
            continue
        if not _same(src, dst):
            said.append(f"{shown}: yours in {input_dir} (not the pack's example, which is left out): the run uses it")
    return said
