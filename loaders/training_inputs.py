"""What the Train nodes read from ComfyUI's input folder: caption files, labelled files, image-caption sets (a
folder of pictures with same-name .txt captions, or a .tsv), MUMU caption lines with crops, and the pictures."""
import re
from pathlib import Path

import folder_paths
import torch
from PIL import Image

from ..bridges import mumu as mumu_bridge
from .errors import LoadError
from .images import is_image_file, load_image, open_rgb, to_tensor

TEXT_EXTENSIONS = (".txt",)
TABLE_EXTENSIONS = (".tsv", ".txt")
PAIRS_EXTENSIONS = (".tsv",)
QUESTIONS_EXTENSIONS = (".tsv",)
NO_QUESTIONS = "none"


def _input_dir() -> Path:
    return Path(folder_paths.get_input_directory())


def _visible(rel: Path) -> bool:
    return not any(p.startswith(".") for p in rel.parts)


def input_files(extensions=TEXT_EXTENSIONS):
    """Files in ComfyUI's input folder (and one level of sub-folders) with these extensions, posix names."""
    base = _input_dir()
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_file() and path.suffix.lower() in extensions and len(rel.parts) <= 2 and _visible(rel):
            found.append(rel.as_posix())
    return found


def input_folders():
    """Sub-folders of ComfyUI's input folder, two levels deep (picture folders for indexes), posix names."""
    base = _input_dir()
    if not base.is_dir():
        return []
    found = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found.append(child.name)
            found += [f"{child.name}/{g.name}" for g in sorted(child.iterdir())
                      if g.is_dir() and not g.name.startswith(".")]
    return found


def resolve_input_file(name) -> Path:
    base = _input_dir()
    path = (base / name).resolve()
    if base.resolve() not in path.parents or not path.is_file():
        raise LoadError(f"'{name}' is not a file in ComfyUI's input folder ({base}). Put the file there and "
                        f"refresh the page.")
    return path


def file_stamp(name) -> str:
    """What changes when a file of the input folder is edited (the Train nodes run again then)."""
    try:
        st = resolve_input_file(name).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except LoadError:
        return name


def read_text(path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} could not be read as UTF-8 text ({e}).") from None


def read_captions(path) -> list:
    """One caption per line; blank lines and lines starting with '#' are skipped."""
    lines = read_text(path).splitlines()
    captions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(captions) < 2:
        raise LoadError(f"{path} has {len(captions)} caption(s); write at least two, one per line (more is "
                        f"better: thousands for a usable bridge).")
    return captions


# ---- MUMU caption lines ------------------------------------------------------------------------------------

_NAMED_CROP = re.compile(r"^([A-Za-z0-9_\-]+)=(.+)$")


def split_named_crops(text: str, crops: list) -> tuple:
    """([names], [paths]) of a caption's crops: with named placeholders in the prompt ('a <man> man'), a crop may
    be given as 'man=path' (bound to <man>); other crops bind to <image> in order (name ""). A prompt with only
    <image> placeholders reads every crop as a path, as before."""
    if all(m.group(1) == mumu_bridge.POSITIONAL for m in mumu_bridge.PLACEHOLDER.finditer(text)):
        return [""] * len(crops), list(crops)
    pairs = [(m.group(1), m.group(2).strip()) if m else ("", c) for c, m in ((c, _NAMED_CROP.match(c)) for c in crops)]
    return [n for n, _ in pairs], [c for _, c in pairs]


def parse_mumu_caption(line: str, where: str = "") -> tuple:
    """'prompt' or 'prompt<TAB>crop.png<TAB>...' -> (prompt, [crop names]). The crops are files in ComfyUI's
    input folder, bound in order to the prompt's <image> placeholders (written before the words they show), or
    by name: 'a <man> man<TAB>man=crops/man.png'. Named placeholders come back as <image> with the crops in
    placeholder order (a name used twice gives its crop twice), so everything downstream binds by position."""
    parts = [p.strip() for p in line.split("\t")]
    text, crops = parts[0], [p for p in parts[1:] if p]
    names, crops = split_named_crops(text, crops)
    try:
        segments = mumu_bridge.bind_placeholders(text, names)
    except mumu_bridge.PromptError as e:
        raise LoadError(f"{where}caption {text!r} with {len(crops)} crop(s): {e}") from None
    if any(names):
        text = "".join(s if isinstance(s, str) else mumu_bridge.IMAGE_TOKEN for s in segments)
        crops = [crops[s] for s in segments if not isinstance(s, str)]
    return text, crops


def teacher_text(prompt: str) -> str:
    """What CLIP reads of a MUMU prompt: the words, without the image placeholders."""
    return " ".join(mumu_bridge.PLACEHOLDER.sub(" ", prompt).split())


def load_input_image(name) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] from a picture in ComfyUI's input folder."""
    return load_image(resolve_input_file(name))


# ---- image-caption sets ------------------------------------------------------------------------------------

def _caption_beside(image: Path):
    text = image.with_suffix(".txt")
    return text if text.is_file() else None


def pair_sources():
    """Image-caption sets in ComfyUI's input folder: folders (and sub-folders one level down) holding images
    with same-stem .txt captions, and .tsv files 'image<TAB>caption'."""
    base = _input_dir()
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if len(rel.parts) > 2 or not _visible(rel):
            continue
        if path.is_dir() and any(is_image_file(p) and _caption_beside(p) for p in path.iterdir()):
            found.append(rel.as_posix() + "/")
        elif path.is_file() and path.suffix.lower() in PAIRS_EXTENSIONS:
            found.append(rel.as_posix())
    return found


def _pairs_of_folder(path: Path) -> tuple:
    """([(picture, caption)], [pictures left out, with why]) of a folder of pictures with same-name .txt captions."""
    pairs, left_out = [], []
    for image in sorted(path.iterdir()):
        if not is_image_file(image):
            continue
        caption = _caption_beside(image)
        text = " ".join(read_text(caption).split()) if caption else ""
        if text:
            pairs.append((image, text))
        else:
            left_out.append(f"{image.name} ({'its .txt is empty' if caption else 'no ' + image.stem + '.txt'})")
    return pairs, left_out


def _pairs_of_table(path: Path, base: Path, crops: bool) -> list:
    pairs = []
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2 or not parts[1] or len(parts) > 2 and not crops:
            raise LoadError(f"{path}, line {i + 1}: expected 'image<TAB>caption"
                            f"{'[<TAB>crop...]' if crops else ''}', got {line[:80]!r}")
        files = []
        names, crop_parts = split_named_crops(parts[1], [c for c in parts[2:] if c])
        for part in [parts[0]] + crop_parts:
            try:
                file = (path.parent / part).resolve()
                found = base in file.parents and file.is_file()
            except (OSError, ValueError):  # a name no file can have (a NUL character, too long)
                found = False
            if not found:
                raise LoadError(f"{path}, line {i + 1}: '{part}' is not a file beside the .tsv in ComfyUI's "
                                f"input folder")
            files.append(file)
        caption = "\t".join([parts[1]] + [f"{n}={f.relative_to(base).as_posix()}" if n else
                                           f.relative_to(base).as_posix() for n, f in zip(names, files[1:])])
        pairs.append((files[0], caption))
    return pairs


def read_pair_set(name, crops=False) -> tuple:
    """([(image path, caption)], [pictures of a folder left out for want of a caption, with why]) from a pair source
    (see pair_sources); at least two pairs. crops=True (MUMU): .tsv lines may go on with crops,
    'image<TAB>caption<TAB>crop.png...', paths beside the .tsv; the caption is then given as a MUMU caption line,
    'caption<TAB>crop...' with the crops named from the input folder."""
    base = _input_dir().resolve()
    path = (base / name.rstrip("/")).resolve()
    if base not in path.parents or not path.exists():
        raise LoadError(f"'{name}' is not in ComfyUI's input folder ({base}). Put a folder of images with same-name "
                        f".txt captions, or a .tsv 'image<TAB>caption' file, there and refresh the page.")
    pairs, left_out = _pairs_of_folder(path) if path.is_dir() else (_pairs_of_table(path, base, crops), [])
    if len(pairs) < 2:
        raise LoadError(f"'{name}' gives {len(pairs)} image-caption pair(s); give at least two (images with a "
                        f"same-name .txt caption, or 'image<TAB>caption' lines)" +
                        (f"; left out: {', '.join(left_out[:5])}" if left_out else "") + ".")
    return pairs, left_out


def read_pairs(name, crops=False) -> list:
    """[(image path, caption)] of a pair source (read_pair_set without what was left out)."""
    return read_pair_set(name, crops)[0]


def left_out_note(left_out) -> str:
    """What a training summary says about pictures trained without (none, or which were left out and why)."""
    if not left_out:
        return ""
    shown = ", ".join(left_out[:5]) + (f" (+{len(left_out) - 5} more)" if len(left_out) > 5 else "")
    return (f"{len(left_out)} picture(s) without a caption were left out: {shown}. Write a same-name .txt beside "
            f"each to train on it.")


def read_questions(name) -> list:
    """[(image path, question, answer)] from a .tsv in ComfyUI's input folder: 'image<TAB>question<TAB>answer' lines
    (blank lines and '#' comments skipped), image paths relative to the .tsv, as in a pairs .tsv."""
    base = _input_dir().resolve()
    path = resolve_input_file(name)
    if path.suffix.lower() not in QUESTIONS_EXTENSIONS:
        raise LoadError(f"'{name}' is not a .tsv file; write questions as 'image<TAB>question<TAB>answer' lines in "
                        f"a .tsv in ComfyUI's input folder.")
    rows = []
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 3 or not all(parts):
            raise LoadError(f"{path}, line {i + 1}: expected 'image<TAB>question<TAB>answer', got {line[:80]!r}")
        image = (path.parent / parts[0]).resolve()
        if base not in image.parents or not image.is_file():
            raise LoadError(f"{path}, line {i + 1}: '{parts[0]}' is not a file beside the .tsv in ComfyUI's input "
                            f"folder")
        rows.append((image, parts[1], parts[2]))
    if not rows:
        raise LoadError(f"{path} holds no questions; write 'image<TAB>question<TAB>answer' lines, or choose "
                        f"'{NO_QUESTIONS}'.")
    return rows


def load_square_image(path: Path, resolution: int) -> torch.Tensor:
    """(1, R, R, 3) float in [0, 1]: the picture's centre square, resized (what SD is trained on)."""
    img = open_rgb(path)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return to_tensor(img)[None]

