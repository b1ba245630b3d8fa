"""GILL files: the official release (a folder in models/bridges), the pack's safetensors form, CLIP vision
features through ComfyUI's CLIP_VISION, and image indexes for retrieval.

Official release (`jykoh/gill`), as users download it, in a sub-folder of models/bridges (e.g. models/bridges/gill/):
  pretrained_ckpt.pth.tar   pickled {'state_dict': {'model.input_embeddings.weight' (8 [IMG] rows), ...}}
  decision_model.pth.tar    pickled {'state_dict': {'1.weight', '1.bias'}} (saved on CUDA)  - optional
  model_args.json           the training arguments                                           - optional, checked
Pickles are read only with torch.load(weights_only=True, map_location="cpu"). Converting gives one
models/bridges/<name>.safetensors (kind 'gill') that later loads memory-mapped, with no pickle at all.
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..bridges.gill import GILLConfig, GILLModel, squash_224
from ..bridges.retrieval import ImageIndex, fingerprint
from . import patcher as patching
from . import pickles
from .bridge_files import (
    check_layer_counts,
    checked_build,
    kind_of,
    load_state_into,
    read_bridge,
    save_bridge,
    writable_path,
)
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle
from .images import is_image_file, load_image
from .llm import read_json

KIND = "gill"
CKPT, DECISION, ARGS = "pretrained_ckpt.pth.tar", "decision_model.pth.tar", "model_args.json"
# Tensors that every GILL checkpoint has: without them a file is some other model's.
SIGNATURE = ("input_embeddings.weight", "gen_text_hidden_fcs.0.fc.weight", "gen_text_hidden_fcs.0.model.weight",
             "gen_text_hidden_fcs.0.query_embs", "gen_text_hidden_fcs.0.tfm.encoder.layers.0.linear1.weight",
             "ret_text_hidden_fcs.0.model.weight", "visual_embeddings.weight", "visual_fc.weight")
INDEX_FORMAT = "beyond_clip.gill_index"
log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedGILL(Handle):
    """What the GILL socket carries: the trained GILL parts under ComfyUI's memory manager."""
    what = "GILL"


# ---- the official release ---------------------------------------------------------------------------------

def _torch_load(path: Path):
    return pickles.load(path, f"Download it again from the jykoh/gill release ({CKPT}, {DECISION}, {ARGS}).")


def _state_dict_of(obj, path: Path) -> dict:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise LoadError(f"{path} is not a GILL checkpoint: it has no 'state_dict' of tensors (found {keys}). "
                        f"Use the files of the jykoh/gill release.")
    return sd


def _strip(key: str) -> str:
    for prefix in ("module.", "model."):  # DDP training, then GILL's wrapper (GILL.model = GILLModel)
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _check_signature(sd: dict, path: Path):
    missing = [k for k in SIGNATURE if k not in sd]
    if missing:
        found = ", ".join(sorted(sd)[:4]) or "no tensors"
        raise LoadError(f"{path} is not a GILL checkpoint: it lacks {len(missing)} of GILL's tensors, e.g. "
                        f"{['model.' + k for k in missing[:3]]} (it holds {found}, ...). Put the jykoh/gill "
                        f"release's {CKPT} there.")


def _read_args(folder: Path) -> dict:
    path = folder / ARGS
    if not path.is_file():
        return {}
    args = read_json(path, "the jykoh/gill release")
    if args.get("text_fc_mode", "gill_mapper") != "gill_mapper":
        raise LoadError(f"{path}: this model was trained with text_fc_mode={args['text_fc_mode']!r}; the pack "
                        f"reads GILLMapper models (text_fc_mode 'gill_mapper') only.")
    if args.get("text_emb_layers", [-1]) != [-1]:
        raise LoadError(f"{path}: text_emb_layers={args['text_emb_layers']} is not supported; the released "
                        f"model reads the last layer ([-1]).")
    return args


def read_official(folder) -> tuple:
    """(GILLConfig, state dict with the pack's keys) of an official release folder."""
    folder = Path(folder)
    ckpt = folder / CKPT
    if not ckpt.is_file():
        raise LoadError(f"{folder} has no {CKPT}. Put the jykoh/gill release ({CKPT}, {DECISION}, {ARGS}) in "
                        f"this folder.")
    raw = _state_dict_of(_torch_load(ckpt), ckpt)
    sd = {}
    for key, value in raw.items():
        sd[_strip(key)] = value
    _check_signature(sd, ckpt)
    decision_path = folder / DECISION
    if decision_path.is_file():
        dsd = _state_dict_of(_torch_load(decision_path), decision_path)
        expected = {"1.weight", "1.bias"}  # nn.Sequential(Dropout(0.5), Linear(4096, 2))
        if set(dsd) != expected:
            raise LoadError(f"{decision_path} is not GILL's decision model: missing {sorted(expected - set(dsd))}, "
                            f"unexpected {sorted(set(dsd) - expected)[:3]}. Download it again.")
        sd.update({f"decision_model.{k}": v for k, v in dsd.items()})
    args = _read_args(folder)
    try:
        config = GILLConfig.from_state_dict(sd, opt_version=str(args.get("opt_version", "")),
                                            visual_encoder=str(args.get("visual_encoder", "")))
    except (KeyError, IndexError) as e:
        raise LoadError(f"{ckpt} is missing GILL tensor {e}; download it again.") from None
    for arg, value in (("n_visual_tokens", config.visual_tokens), ("num_clip_tokens", config.out_tokens),
                       ("num_tokens", config.num_img_tokens), ("num_gen_tokens", config.num_img_tokens)):
        if arg in args and str(args[arg]) != str(value):
            raise LoadError(f"{folder / ARGS} says {arg}={args[arg]} but {ckpt} holds {value}: the two files are "
                            f"from different models. Use the files of one release.")
    if config.decision_in not in (0, config.llm_dim, config.llm_dim + 1):
        raise LoadError(f"{decision_path} reads {config.decision_in} features, but this GILL's LLM width is "
                        f"{config.llm_dim}: it belongs to another model.")
    return config, sd


OFFICIAL_ADVICE = f"Download {CKPT} (and {DECISION}) again from the jykoh/gill release."
CONVERTED_ADVICE = "The file is damaged or was edited; convert the release (or train) again."


def _build(config: GILLConfig, sd: dict, source, name: str, where, advice: str) -> LoadedGILL:
    """The GILL module of `sd` under ComfyUI's memory manager. Every count and shape is checked against the tensors
    before anything is allocated; messages name `where` (the file) and give `advice`."""
    g = "gen_text_hidden_fcs.0.tfm."
    check_layer_counts({"encoder_layers": (config.encoder_layers, g + "encoder.layers."),
                        "decoder_layers": (config.decoder_layers, g + "decoder.layers.")}, sd, where, "GILL", advice)
    checked_build(lambda: GILLModel(config), sd, where, "GILL model", advice)
    model = GILLModel(config)
    load_state_into(model, sd, where, "GILL model", advice)
    model = model.float().eval().requires_grad_(False)
    return LoadedGILL(patcher=patching.wrap(model), config=config, source=str(source), name=name,
                      identity=f"{file_identity(source)}:float32")


def load_gill(path, name: str = None) -> LoadedGILL:
    """An official release folder, or a pack file of kind 'gill'."""
    path = Path(path)
    if path.is_dir():
        config, sd = read_official(path)
        return _build(config, sd, path, name or path.name, path / CKPT, OFFICIAL_ADVICE)
    config_dict, sd = read_bridge(path, KIND)
    try:
        config = GILLConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: its GILL config is not valid ({e}). {CONVERTED_ADVICE}") from None
    return _build(config, sd, path, name or path.name, path, CONVERTED_ADVICE)


def convert_official(folder, out_path) -> Path:
    """Write the release as one pack file (tensors kept in their saved dtype)."""
    out_path = writable_path(Path(out_path), KIND)
    folder = Path(folder)
    config, sd = read_official(folder)
    _build(config, sd, folder, "check", folder / CKPT, OFFICIAL_ADVICE)  # refuses anything that would not load back
    save_bridge(out_path, KIND, config.to_dict(), sd)
    return out_path


def is_gill_file(path) -> bool:
    return kind_of(path) == KIND


# ---- CLIP vision features ---------------------------------------------------------------------------------

def _vision_tower(clip_vision):
    try:
        return clip_vision.model.vision_model
    except AttributeError:
        raise LoadError("the CLIP_VISION input is not a CLIP vision tower (it has no vision_model); load "
                        "CLIP ViT-L/14 with the 'Load CLIP Vision' node.") from None


def vision_width(clip_vision) -> int:
    return int(_vision_tower(clip_vision).post_layernorm.weight.shape[0])


def vision_fingerprint(clip_vision) -> str:
    return fingerprint(dict(_vision_tower(clip_vision).state_dict()))


def check_vision(gill: LoadedGILL, clip_vision):
    width = vision_width(clip_vision)
    if width != gill.config.vision_dim:
        raise LoadError(f"the CLIP vision tower gives {width}-wide features but {gill.describe()} reads "
                        f"{gill.config.vision_dim} ({gill.config.visual_encoder or 'CLIP ViT-L/14'}). Load "
                        f"clip-vit-large-patch14 in 'Load CLIP Vision'.")


def clip_pooled(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP pooler_output (B, width) float32, as transformers' CLIPVisionModel gives it: the post-layernorm of
    the class token. ComfyUI's encode_image returns the pre-layernorm last_hidden_state (and only the
    *projected* image_embeds), so the tower's own post_layernorm is applied here; images are squashed to 224
    first, as the reference resizes them, so ComfyUI's preprocessing neither resizes nor crops."""
    out = clip_vision.encode_image(squash_224(images))
    norm = _vision_tower(clip_vision).post_layernorm
    cls_token = out["last_hidden_state"][:, 0].float()
    with torch.no_grad():
        return norm(cls_token.to(norm.weight.device)).float()


# ---- image folders and indexes ----------------------------------------------------------------------------

def scan_images(root: Path) -> list:
    """Image files under root (recursive, hidden folders skipped) as sorted posix paths relative to root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if is_image_file(f):
                found.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(found)


def folder_state(root: Path) -> list:
    """(relative path, size, mtime_ns) of every image: what decides whether an index is up to date."""
    state = []
    for rel in scan_images(root):
        st = (root / rel).stat()
        state.append((rel, st.st_size, st.st_mtime_ns))
    return state


def index_files(index_dir: Path, name: str) -> tuple:
    return index_dir / f"{name}.safetensors", index_dir / f"{name}.json"


def read_index(index_dir: Path, name: str) -> ImageIndex:
    tensors_path, list_path = index_files(index_dir, name)
    if not tensors_path.is_file() or not list_path.is_file():
        raise LoadError(f"image index '{name}' was not found in {index_dir} (it needs {tensors_path.name} and "
                        f"{list_path.name}); build it with 'Build Image Index (GILL)'.")
    try:
        info = json.loads(list_path.read_text())
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != INDEX_FORMAT:
                raise LoadError(f"{tensors_path} is not a GILL image index; build the index again.")
            embeddings = f.get_tensor("embeddings").float()
        index = ImageIndex(name=name, root=info["root"], paths=list(info["paths"]), embeddings=embeddings,
                           fingerprint=info["fingerprint"], stamps=[tuple(s) for s in info["stamps"]],
                           skipped=list(info.get("skipped", [])))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, SafetensorError, OSError) as e:
        raise LoadError(f"the image index '{name}' in {index_dir} is damaged ({type(e).__name__}: {e}); build "
                        f"it again with mode 'rebuild'.") from None
    if len(index.paths) != index.embeddings.shape[0] or len(index.stamps) != len(index.paths):
        raise LoadError(f"the image index '{name}' lists {len(index.paths)} images but holds "
                        f"{index.embeddings.shape[0]} embeddings; build it again with mode 'rebuild'.")
    return index


def write_index(index_dir: Path, index: ImageIndex):
    tensors_path, list_path = index_files(index_dir, index.name)
    index_dir.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": index.embeddings.float().contiguous()}, str(tensors_path),
              metadata={"format": INDEX_FORMAT, "fingerprint": index.fingerprint})
    list_path.write_text(json.dumps({"root": index.root, "fingerprint": index.fingerprint, "paths": index.paths,
                                     "stamps": [list(s) for s in index.stamps], "skipped": index.skipped},
                                    indent=1))


def index_fingerprint(gill: LoadedGILL, clip_vision) -> str:
    """Which vision tower and which retrieval head made an index's rows."""
    head = gill.inner.visual_fc
    return f"tower={vision_fingerprint(clip_vision)};head={fingerprint(dict(head.state_dict()))}"


def _mismatch(found: str, expected: str) -> str:
    parts = dict(p.split("=", 1) for p in found.split(";") if "=" in p)
    mine = dict(p.split("=", 1) for p in expected.split(";") if "=" in p)
    if parts.get("tower") != mine.get("tower"):
        return "another CLIP vision tower"
    return "another GILL model (another retrieval head)"


def reusable_rows(index_dir: Path, name: str, root: Path, fingerprint: str, rebuild: bool):
    """(the existing index or None, the folder's state, {path: embedding row} of files unchanged since)."""
    old = None
    if not rebuild and index_files(index_dir, name)[0].is_file():
        old = read_index(index_dir, name)
        if old.fingerprint != fingerprint:
            raise LoadError(f"the image index '{name}' was built with {_mismatch(old.fingerprint, fingerprint)}; "
                            f"its embeddings cannot be mixed with new ones. Set mode to 'rebuild', or choose another "
                            f"index name.")
        if Path(old.root) != root:
            log.info("GILL: index '%s' moves from %s to %s", name, old.root, root)
    state = folder_state(root)
    kept = {}
    if old is not None:
        stamps = {p: tuple(s) for p, s in zip(old.paths, old.stamps)}
        rows = {p: i for i, p in enumerate(old.paths)}
        kept = {rel: old.embeddings[rows[rel]] for rel, size, mtime in state if stamps.get(rel) == (size, mtime)}
    return old, state, kept


def write_built_index(index_dir, name, root, fingerprint, state, kept, new, skipped, old, dim):
    """Write the index of the kept and newly embedded rows; (ImageIndex, report)."""
    stamps = {rel: (size, mtime) for rel, size, mtime in state}
    paths = [rel for rel, _, _ in state if rel in kept or rel in new]
    if not paths:
        raise LoadError(f"no readable images in {root}" + (f" (skipped: {'; '.join(skipped[:5])})" if skipped else
                        "; put .png/.jpg/.webp files there") + ".")
    embeddings = torch.stack([kept[p] if p in kept else new[p] for p in paths]).reshape(len(paths), dim)
    index = ImageIndex(name=name, root=str(root), paths=paths, embeddings=embeddings.float(), fingerprint=fingerprint,
                       stamps=[stamps[p] for p in paths], skipped=skipped)
    write_index(index_dir, index)
    removed = len(old.paths) - sum(1 for p in old.paths if p in stamps) if old is not None else 0
    report = {"added": len(new), "kept": len(kept), "removed": removed, "skipped": skipped, "total": len(paths)}
    return index, report


def check_index(gill: LoadedGILL, index: ImageIndex):
    """An index searched with [IMG0] queries of this GILL must have been made with this GILL's retrieval head."""
    head = "head=" + fingerprint(dict(gill.inner.visual_fc.state_dict()))
    if head not in index.fingerprint.split(";"):
        raise LoadError(f"the image index '{index.name}' was built with another GILL model (another retrieval "
                        f"head); rebuild it with {gill.describe()}.")
    if len(index) == 0:
        raise LoadError(f"the image index '{index.name}' is empty; add images to {index.root} and build it again.")


def retrieve_images(index: ImageIndex, query: torch.Tensor, k: int, shown=()):
    """Top-k readable images: list of ((1, H, W, 3) tensor, relative path, cosine). Files gone or unreadable
    since the index was built are passed over, as the reference passes over images it cannot fetch. Paths in `shown`
    (repeats count) come after the others, the least shown first, as the reference lowers an image's score by 1000
    each time a reply has shown it."""
    counts = {}
    for rel in shown:
        counts[rel] = counts.get(rel, 0) + 1
    indices, scores = index.search(query, min(len(index), k * 4 + 8 + len(counts)))
    ranked = sorted(zip(indices, scores), key=lambda pair: counts.get(index.paths[pair[0]], 0))  # stable: by score
    found, missing = [], []
    for i, score in ranked:
        rel = index.paths[i]
        try:
            found.append((load_image(Path(index.root) / rel)[None], rel, score))
        except LoadError:
            missing.append(rel)
            continue
        if len(found) == k:
            break
    if missing:
        log.warning("GILL: %d indexed image(s) could not be read any more (e.g. %s); rebuild the index",
                    len(missing), missing[0])
    if not found:
        raise LoadError(f"none of the best matches in the image index '{index.name}' can be read from "
                        f"{index.root} any more; build the index again.")
    return found
