"""What the Train nodes read from ComfyUI's input folder: caption files, labelled files, image-caption sets (a
folder of pictures with same-name .txt captions, or a .tsv), MUMU caption lines with crops, and the pictures."""
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
            found += [f"{child.name}/{g.name}" for g in sorted(child.iterdir()) if g.is_dir() and not g.name.startswith(".")]
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

def parse_mumu_caption(line: str, where: str = "") -> tuple:
    """'prompt' or 'prompt<TAB>crop.png<TAB>...' -> (prompt, [crop names]). The crops are files in ComfyUI's
    input folder, bound in order to the prompt's <image> placeholders (written before the words they show)."""
    parts = [p.strip() for p in line.split("\t")]
    text, crops = parts[0], [p for p in parts[1:] if p]
    try:
        mumu_bridge.bind_placeholders(text, [""] * len(crops))
    except mumu_bridge.PromptError as e:
        raise LoadError(f"{where}caption {text!r} with {len(crops)} crop(s): {e}") from None
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


def _pairs_of_folder(path: Path) -> list:
    pairs = []
    for image in sorted(path.iterdir()):
        if is_image_file(image) and _caption_beside(image):
            text = " ".join(read_text(_caption_beside(image)).split())
            if text:
                pairs.append((image, text))
    return pairs


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
        for part in [parts[0]] + [c for c in parts[2:] if c]:
            file = (path.parent / part).resolve()
            if base not in file.parents or not file.is_file():
                raise LoadError(f"{path}, line {i + 1}: '{part}' is not a file beside the .tsv in ComfyUI's "
                                f"input folder")
            files.append(file)
        caption = "\t".join([parts[1]] + [f.relative_to(base).as_posix() for f in files[1:]])
        pairs.append((files[0], caption))
    return pairs


def read_pairs(name, crops=False) -> list:
    """[(image path, caption)] from a pair source (see pair_sources); at least two pairs. crops=True (MUMU):
    .tsv lines may go on with crops, 'image<TAB>caption<TAB>crop.png...', paths beside the .tsv; the caption
    is then given as a MUMU caption line, 'caption<TAB>crop...' with the crops named from the input folder."""
    base = _input_dir().resolve()
    path = (base / name.rstrip("/")).resolve()
    if base not in path.parents or not path.exists():
        raise LoadError(f"'{name}' is not in ComfyUI's input folder ({base}). Put a folder of images with same-name "
                        f".txt captions, or a .tsv 'image<TAB>caption' file, there and refresh the page.")
    pairs = _pairs_of_folder(path) if path.is_dir() else _pairs_of_table(path, base, crops)
    if len(pairs) < 2:
        raise LoadError(f"'{name}' gives {len(pairs)} image-caption pair(s); give at least two (images with a "
                        f"same-name .txt caption, or 'image<TAB>caption' lines).")
    return pairs


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

