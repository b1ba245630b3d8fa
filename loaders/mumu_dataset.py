"""MUMU dataset files: the captioned pictures a build reads, and the dataset folder it writes in ComfyUI's input
folder, which the MUMU trainers read as it is.

Sources (as the trainers read captioned pictures): a folder with pictures and same-name .txt captions (searched
recursively; folders that are themselves datasets are skipped), or a .tsv with 'picture<TAB>caption' lines (paths
beside the .tsv). Pictures without a caption, captions without a picture, empty captions and bad lines are listed,
not fatal.

A dataset folder input/<name>/:
  dataset.json          settings, detector, counts, skipped pictures and source problems
  manifest.jsonl        one line per picture (sorted): prompt, every image with its box, score, phrase and the rule
                        that produced it, the boxes that were dropped and why. You may edit it (change a prompt,
                        remove an image): the next build keeps your line and rewrites the trainer files from it.
                        Delete a line to have that picture built again.
  stage1_captions.txt   for 'Train Connector (MUMU)': 'prompt<TAB>name=<dataset>/crops/x.png...'
  stage2_pairs.tsv      for 'Train MUMU, stage 2': 'picture<TAB>prompt<TAB>name=crops/x.png' (paths beside the .tsv)
  crops/                the conditioning images, padded square with black (PNG)
  .build/               work files: each process's part of the manifest while a build runs, and the pictures' file
                        stamps (size, time, sha256) so an unchanged picture is not read again. Safe to delete.
Prompts use named placeholders ('a <man> man and his <dog> dog'); each crop is given as name=path.
"""
import contextlib
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import folder_paths

from ..bridges.mumu import PromptError, bind_placeholders, check_image_name
from ..bridges.mumu_dataset import clean_caption, only_placeholder
from .errors import InputError
from .images import IMAGE_EXTENSIONS

FORMAT = "beyond_clip.mumu_dataset"
FORMAT_VERSION = 1
INFO, MANIFEST, STAGE1, STAGE2, CROPS, WORK = ("dataset.json", "manifest.jsonl", "stage1_captions.txt",
                                               "stage2_pairs.tsv", "crops", ".build")
PARTS, STAMPS = "parts", "stamps.jsonl"
_NAME = re.compile(r"^[\w.\- ]+$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CROP_FILE = re.compile(r"^crops/[\w.\-]+\.png$")


def input_dir() -> Path:
    return Path(folder_paths.get_input_directory()).resolve()


def _rel(path: Path) -> str:
    return path.relative_to(input_dir()).as_posix()


def is_dataset(folder: Path) -> bool:
    """Whether a folder is a dataset this builder wrote (its dataset.json says so, or a build is under way)."""
    try:
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
        if isinstance(info, dict) and info.get("format") == FORMAT:
            return True
    except (OSError, ValueError):
        pass
    return (folder / WORK / PARTS).is_dir()


# ------------------------------------------------------------------------------------------------- sources

@dataclass
class SourcePicture:
    key: str  # the picture's path relative to ComfyUI's input folder (posix): its identity in the dataset
    path: Path
    caption: str
    size: int
    mtime_ns: int


@dataclass
class Source:
    name: str
    pictures: list  # SourcePicture, sorted by key
    problems: list = field(default_factory=list)  # [{"item": ..., "problem": ...}]


def _has_captioned_picture(folder: Path, depth=3) -> bool:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    names = {e.name for e in entries}
    for e in entries:
        if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and Path(e.name).stem + ".txt" in names:
            return True
    return depth > 0 and any(e.is_dir() and not e.name.startswith(".")
                             and _has_captioned_picture(Path(e.path), depth - 1) for e in entries)


def list_sources():
    """Captioned-picture sets in ComfyUI's input folder (and one level down): folders holding pictures with
    same-name .txt captions (also in sub-folders), and .tsv files; datasets this builder wrote are left out."""
    base = input_dir()
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if len(rel.parts) > 2 or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_dir() and not is_dataset(path) and _has_captioned_picture(path):
            found.append(rel.as_posix() + "/")
        elif path.is_file() and path.suffix.lower() == ".tsv" and not is_dataset(path.parent):
            found.append(rel.as_posix())
    return found


def resolve_source(name: str) -> Path:
    base = input_dir()
    path = (base / str(name).rstrip("/")).resolve()
    if (base != path and base not in path.parents) or not path.exists():
        raise InputError(f"'{name}' is not in ComfyUI's input folder ({base}). Put a folder of pictures with "
                         f"same-name .txt captions, or a .tsv 'picture<TAB>caption' file, there and refresh the page.")
    return path


def _read_text(path: Path, problems) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append({"item": _rel(path), "problem": f"could not be read as UTF-8 text ({type(e).__name__})"})
        return None


def _picture(path: Path, caption: str, problems, item: str):
    caption = clean_caption(caption)
    if not caption:
        problems.append({"item": item, "problem": "empty caption"})
        return None
    st = path.stat()
    return SourcePicture(key=_rel(path), path=path, caption=caption, size=st.st_size, mtime_ns=st.st_mtime_ns)


def read_source(name: str) -> Source:
    """The captioned pictures of a source (see the module's doc), sorted by their key, and its problems."""
    root = resolve_source(name)
    pictures, problems = {}, []
    if root.is_dir():
        if is_dataset(root):
            raise InputError(f"'{name}' is a dataset this builder wrote; choose the folder of captioned pictures "
                             f"it was built from.")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not is_dataset(here / d))
            stems = {}
            for f in filenames:
                if not f.startswith("."):
                    stems.setdefault(Path(f).stem, []).append(f)
            for stem, group in sorted(stems.items()):
                images = sorted(f for f in group if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
                caption_file = stem + ".txt"
                if caption_file not in group:
                    for f in images:
                        problems.append({"item": _rel(here / f), "problem": "picture without a caption (no "
                                                                            f"{caption_file} beside it)"})
                    continue
                if not images:
                    problems.append({"item": _rel(here / caption_file), "problem": "caption without a picture"})
                    continue
                text = _read_text(here / caption_file, problems)
                for f in images if text is not None else []:
                    p = _picture(here / f, text, problems, _rel(here / f))
                    if p is not None:
                        pictures[p.key] = p
    elif root.suffix.lower() == ".tsv":
        text = _read_text(root, problems)
        base = input_dir()
        for i, line in enumerate((text or "").splitlines()):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{_rel(root)}, line {i + 1}"
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
                problems.append({"item": where, "problem": f"expected 'picture<TAB>caption', got {line[:60]!r}"})
                continue
            try:
                path = (root.parent / parts[0].strip()).resolve()
            except (OSError, ValueError, RuntimeError):
                path = None
            if path is None or base not in path.parents:
                problems.append({"item": where, "problem": f"'{parts[0].strip()[:60]}' is not inside the input folder"})
                continue
            if not path.is_file():
                problems.append({"item": where, "problem": f"caption without a picture ('{parts[0].strip()[:60]}' "
                                                           f"is not a file)"})
                continue
            p = _picture(path, parts[1], problems, where)
            if p is None:
                continue
            if p.key in pictures:
                problems.append({"item": where, "problem": f"'{p.key}' is listed again (the first caption is used)"})
                continue
            pictures[p.key] = p
    else:
        raise InputError(f"'{name}' is neither a folder nor a .tsv file; give a folder of pictures with same-name "
                         f".txt captions, or a .tsv 'picture<TAB>caption' file.")
    return Source(name=name, pictures=[pictures[k] for k in sorted(pictures)], problems=problems)


# ------------------------------------------------------------------------------------------------- dataset

@dataclass(eq=False)
class MUMUDataset:
    """What the dataset socket carries: where the dataset is and the trainer files in it."""
    name: str
    folder: Path
    stage1: str  # the stage-1 caption file, relative to the input folder (Train Connector's 'captions')
    stage2: str  # the stage-2 .tsv, relative to the input folder (Train MUMU's 'pairs')
    pictures: int = 0
    identity: str = ""  # changes with the manifest: keys downstream caches

    def describe(self) -> str:
        return f"MUMU dataset '{self.name}'"


def check_dataset_name(name: str) -> str:
    name = str(name).strip().strip("/")
    if not name or not _NAME.match(name) or name.startswith("."):
        raise InputError(f"dataset name {name!r}: use letters, digits, spaces, '.', '-' or '_' (a folder made in "
                         f"ComfyUI's input folder)")
    return name


def dataset_dir(name: str) -> Path:
    return input_dir() / check_dataset_name(name)


def prepare_dataset_dir(name: str, source_root: Path = None) -> Path:
    """input/<name>/, created; refuses a folder that holds other files than a dataset of this builder, and a
    dataset inside its own source or holding it."""
    folder = dataset_dir(name)
    if source_root is not None:
        source_root = source_root.resolve()
        source_dir = source_root if source_root.is_dir() else source_root.parent
        inside_source = source_root.is_dir() and source_dir in folder.parents
        if folder == source_dir or folder in source_dir.parents or inside_source:
            raise InputError(f"the dataset folder {folder} and the source {source_root} would overlap; choose another "
                             f"dataset name.")
    if folder.exists():
        if not folder.is_dir():
            raise InputError(f"{folder} exists and is not a folder; choose another dataset name.")
        if any(folder.iterdir()) and not is_dataset(folder):
            raise InputError(f"{folder} exists and was not made by this builder (no {INFO} of a MUMU dataset in it); "
                             f"its files are never replaced. Choose another dataset name, or empty the folder.")
    (folder / CROPS).mkdir(parents=True, exist_ok=True)
    (folder / WORK / PARTS).mkdir(parents=True, exist_ok=True)
    return folder


def open_dataset(name: str) -> MUMUDataset:
    """A dataset that was built (for the Preview node and the trainers' dataset input)."""
    folder = dataset_dir(name)
    if not (folder / MANIFEST).is_file() or not is_dataset(folder):
        raise InputError(f"{folder} holds no built MUMU dataset ({MANIFEST} and {INFO}); run Build MUMU Dataset.")
    return describe_dataset(folder)


def describe_dataset(folder: Path) -> MUMUDataset:
    manifest = folder / MANIFEST
    st = manifest.stat()
    with open(manifest, "rb") as f:
        pictures = sum(1 for line in f if line.strip())
    identity = hashlib.sha1(f"{manifest}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return MUMUDataset(name=folder.name, folder=folder, stage1=_rel(folder / STAGE1), stage2=_rel(folder / STAGE2),
                       pictures=pictures, identity=identity)


# ------------------------------------------------------------------------------------------------- entries

ENTRY_ORDER = ("picture", "sha256", "caption", "size", "prompt", "images", "stage2", "dropped", "note", "build")


def entry_line(entry: dict) -> str:
    """One manifest line: the fields in a fixed order, readable (non-ASCII kept), no line breaks."""
    ordered = {k: entry[k] for k in ENTRY_ORDER if k in entry}
    ordered.update({k: v for k, v in entry.items() if k not in ordered})
    return json.dumps(ordered, ensure_ascii=False)


def parse_entry(text: str, where: str) -> dict:
    """A manifest line, checked (it may have been edited by hand). InputError naming the line otherwise."""
    def bad(why):
        return InputError(f"{where}: {why}. Fix the line, or delete it to have the picture built again.")

    try:
        entry = json.loads(text)
    except ValueError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    for key, kind in (("picture", str), ("sha256", str), ("caption", str), ("prompt", str), ("build", str),
                      ("images", list)):
        if not isinstance(entry.get(key), kind):
            raise bad(f"'{key}' is missing or not a {kind.__name__}")
    if not _SHA.match(entry["sha256"]):
        raise bad("'sha256' is not 64 hexadecimal digits")
    size = entry.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                              for v in size)):
        raise bad("'size' is not [width, height]")
    if "\t" in entry["prompt"] or "\n" in entry["prompt"] or "\r" in entry["prompt"]:
        raise bad("the prompt holds a tab or a line break")
    names = []
    for i, image in enumerate(entry["images"]):
        if not isinstance(image, dict) or not all(isinstance(image.get(k), str) for k in ("name", "file", "rule")):
            raise bad(f"image #{i + 1} needs 'name', 'file' and 'rule' strings")
        try:
            name = check_image_name(image["name"])
        except PromptError as e:
            raise bad(str(e)) from None
        if not name:
            raise bad(f"image #{i + 1} has an empty name")
        if not _CROP_FILE.match(image["file"]):
            raise bad(f"image '{name}': file {image['file']!r} is not a crops/<name>.png file of the dataset")
        names.append(name)
    try:
        bind_placeholders(entry["prompt"], names)
    except PromptError as e:
        raise bad(f"the prompt does not match its images ({e})") from None
    if entry.get("stage2") is not None and entry.get("stage2") not in names:
        raise bad(f"'stage2' {entry.get('stage2')!r} is not one of the images {names}")
    if not isinstance(entry.get("dropped", []), list):
        raise bad("'dropped' is not a list")
    return entry


def read_manifest(folder: Path) -> dict:
    """{picture key: entry} of the dataset's manifest ({} when there is none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    entries = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path} could not be read as UTF-8 text ({type(e).__name__}: {e}); delete it to build the "
                         f"dataset again.") from None
    for i, line in enumerate(lines):
        if line.strip():
            entry = parse_entry(line, f"{path}, line {i + 1}")
            entries[entry["picture"]] = entry
    return entries


def crop_files_present(folder: Path, entry: dict) -> bool:
    return all((folder / image["file"]).is_file() for image in entry["images"])


# ------------------------------------------------------------------------------------------- trainer files

def stage1_line(entry: dict, dataset_rel: str) -> str:
    crops = "".join(f"\t{image['name']}={dataset_rel}/{image['file']}" for image in entry["images"])
    return entry["prompt"] + crops


def stage2_line(entry: dict, folder: Path):
    name = entry.get("stage2")
    if not name:
        return None
    image = next(i for i in entry["images"] if i["name"] == name)
    picture = Path(os.path.relpath(input_dir() / entry["picture"], folder)).as_posix()
    return f"{picture}\t{only_placeholder(entry['prompt'], name)}\t{name}={image['file']}"


# ----------------------------------------------------------------------------------------------- writing

def atomic_write_bytes(path: Path, data: bytes):
    """tmp + replace: a crash leaves the old file or none, never half a file. Unique tmp names: several processes
    may write the same (identical) file at once. A file that already holds these bytes is left as it is (its time
    too: the trainers reading it see nothing changed)."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_png(path: Path, pixels):
    """(H, W, 3) uint8 tensor -> a PNG file, atomically. The same pixels always give the same bytes."""
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG", compress_level=6)
    atomic_write_bytes(path, buffer.getvalue())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ parts, stamps, merge

def _parts_dir(folder: Path) -> Path:
    return folder / WORK / PARTS


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}"


def _read_lines_tolerant(path: Path):
    """JSON objects of a work file; a line cut short by a crash (the last one) is left out."""
    out = []
    try:
        data = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return out
    for line in data.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("picture"), str):
            out.append(value)
    return out


def read_stamps(folder: Path) -> dict:
    """{picture key: (size, mtime_ns, sha256)} remembered by the last build."""
    stamps = {}
    for line in _read_lines_tolerant(folder / WORK / STAMPS):
        s = line.get("stamp")
        if isinstance(s, list) and len(s) == 3:
            stamps[line["picture"]] = tuple(s)
    return stamps


def work_entries(folder: Path) -> list:
    """Every line of every part file (this build's and earlier interrupted ones'): finished pictures to reuse."""
    lines = []
    parts = _parts_dir(folder)
    if parts.is_dir():
        for path in sorted(parts.glob("part-*.jsonl")):
            lines += _read_lines_tolerant(path)
    return lines


class PartWriter:
    """This process's part of the manifest: whole lines appended (a crash can cut only the last one, which readers
    leave out), and a done marker holding the build's fingerprint once every picture of the shard is in it."""

    def __init__(self, folder: Path, rank: int, world: int):
        self.path = _parts_dir(folder) / f"{part_name(rank, world)}.jsonl"
        self.done = _parts_dir(folder) / f"{part_name(rank, world)}.done"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.done.exists():
            self.done.unlink()
        self.lines = {line["picture"]: line for line in _read_lines_tolerant(self.path)}
        if self.path.exists():  # cut a line a crash left unfinished, so appended lines start on their own
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open for the whole build; close())

    def append(self, line: dict):
        if self.lines.get(line["picture"]) == line:
            return
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()
        self.lines[line["picture"]] = line

    def finish(self, fingerprint: str):
        self.close()
        atomic_write_bytes(self.done, fingerprint.encode())

    def close(self):
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def fingerprint(build_key: str, source: Source) -> str:
    """What every process of one build agrees on: the build settings and the pictures (names, captions, file
    sizes and times). A finished part with another fingerprint belongs to another build."""
    h = hashlib.sha256(build_key.encode())
    for p in source.pictures:
        h.update(f"\n{p.key}\t{p.caption}\t{p.size}\t{p.mtime_ns}".encode())
    return h.hexdigest()[:32]


def try_merge(folder: Path, world: int, fp: str, source: Source, info: dict):
    """When every part of this build is done: the merged manifest, the trainer files, dataset.json and the stamps
    (each written atomically), unused crops removed, the work files removed. Returns the summary, or None when
    parts are missing (another process merges when it finishes) or were removed by a process that merged first."""
    parts = _parts_dir(folder)
    owner = {}
    for i, p in enumerate(source.pictures):
        owner[p.key] = i % world
    lines = {}
    try:
        for rank in range(world):
            name = part_name(rank, world)
            if (parts / f"{name}.done").read_text() != fp:
                return None
            for line in _read_lines_tolerant(parts / f"{name}.jsonl"):
                if owner.get(line["picture"]) == rank:
                    lines[line["picture"]] = line
    except OSError:
        return None
    if set(lines) != set(owner):
        return None
    entries, skipped, stamps = [], [], []
    for key in sorted(lines):
        line = dict(lines[key])
        stamp = line.pop("_stamp", None)
        if "skipped" in line:
            skipped.append({"picture": key, "problem": line["skipped"]})
            continue
        entries.append(line)
        if stamp:
            stamps.append({"picture": key, "stamp": stamp})
    dataset_rel = _rel(folder)
    stage1 = [stage1_line(e, dataset_rel) for e in entries]
    stage2 = [s for s in (stage2_line(e, folder) for e in entries) if s]
    rules = {}
    for e in entries:
        for image in e["images"]:
            rules[image["rule"]] = rules.get(image["rule"], 0) + 1
    summary = {"pictures": len(entries), "prompts_with_images": sum(1 for e in entries if e["images"]),
               "images_by_rule": dict(sorted(rules.items())), "stage1_lines": len(stage1),
               "stage2_lines": len(stage2), "skipped_pictures": len(skipped),
               "source_problems": len(source.problems)}
    about = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source.name, **info,
             "files": {"manifest": MANIFEST, "stage1": STAGE1, "stage2": STAGE2, "crops": CROPS + "/"},
             "summary": summary, "skipped": skipped, "problems": source.problems}
    text = "".join(entry_line(e) + "\n" for e in entries)
    atomic_write_bytes(folder / MANIFEST, text.encode("utf-8"))
    atomic_write_bytes(folder / STAGE1, "".join(s + "\n" for s in stage1).encode("utf-8"))
    atomic_write_bytes(folder / STAGE2, ("# picture<TAB>prompt<TAB>crop (built by Build MUMU Dataset)\n"
                                         + "".join(s + "\n" for s in stage2)).encode("utf-8"))
    atomic_write_bytes(folder / INFO, (json.dumps(about, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    atomic_write_bytes(folder / WORK / STAMPS, "".join(json.dumps(s) + "\n" for s in stamps).encode("utf-8"))
    used = {image["file"].split("/", 1)[1] for e in entries for image in e["images"]}
    for path in (folder / CROPS).iterdir():
        if path.name not in used:
            _remove(path)
    for path in parts.iterdir() if parts.is_dir() else []:
        _remove(path)
    with contextlib.suppress(OSError):
        parts.rmdir()
    return summary


def _remove(path: Path):
    with contextlib.suppress(OSError):
        path.unlink()
