"""Grounding DINO (open-vocabulary detection) for MUMU's dataset builder: a Hugging Face folder in
models/grounding-dino/ (e.g. IDEA-Research/grounding-dino-tiny: config.json with model_type 'grounding-dino',
model.safetensors, the processor and BERT tokenizer files), loaded offline as transformers'
GroundingDinoForObjectDetection + GroundingDinoProcessor, under ComfyUI's memory manager.

Why models/grounding-dino and not models/LLM: it is not a language model, and other ComfyUI packs (Segment
Anything ones) already keep Grounding DINO there. Those keep the original release's .pth + .cfg.py files at the
top of the folder; this loader reads Hugging Face sub-folders only and says so when it finds only those files.
"""
import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from . import folders
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle, hosted, shared
from .llm import from_pretrained, quiet_loggers

FOLDER = folders.GROUNDING_DINO
MODEL_TYPE = "grounding-dino"
DTYPES = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Grounding DINO splits its text into phrases at these BERT-uncased ids ([CLS], [SEP], '.', '?'): transformers
# hard-codes them in the model, so any other tokenizer silently breaks the phrases.
SPECIAL_TOKENS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
log = logging.getLogger(__name__)


def list_detectors():
    return folders.list_model_dirs(FOLDER)


def missing_message(name: str) -> str:
    """The pack's not-found message, plus a hint when only the original release's files are there."""
    choices = list_detectors()
    where = ", ".join(str(p) for p in folders.search_paths(FOLDER)) or f"models/{FOLDER}"
    text = folders.not_found_message("Grounding DINO folder", name, choices, where)
    originals = [p.name for base in folders.search_paths(FOLDER) if base.is_dir() for p in base.iterdir()
                 if p.suffix in (".pth", ".py")]
    if originals and not choices:
        text += (f" ({', '.join(originals[:2])} there are the original GroundingDINO release's files, which this "
                 f"pack does not read: use the Hugging Face folder IDEA-Research/grounding-dino-tiny or -base.)")
    return text


def resolve(name) -> Path:
    path = Path(name)
    if path.is_absolute():
        if path.is_dir():
            return path
        raise LoadError(f"{path} is not a folder: give a Grounding DINO Hugging Face folder.")
    for base in folders.search_paths(FOLDER):
        if (base / name).is_dir():
            return base / name
    raise LoadError(missing_message(str(name)))


@dataclass(eq=False)
class GroundingDINO(Handle):
    """What the detector socket carries: the model under ComfyUI's memory manager, its processor and tokenizer."""
    processor: object = None
    tokenizer: object = None
    dtype: torch.dtype = torch.float32
    max_text_len: int = 256
    shortest_edge: int = 800  # what the image processor resizes to
    longest_edge: int = 1333
    build_identity: str = ""  # the folder's content (config, file names and sizes), not where or when it was copied
    what = "Grounding DINO"


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{path} has no config.json: it is not a Hugging Face model folder. Copy the whole "
                        f"Grounding DINO folder (config.json, model.safetensors, processor and tokenizer files) "
                        f"into models/{FOLDER}/.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_path} is not valid JSON ({e}); copy it again.") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        kind = config.get("model_type", "unknown") if isinstance(config, dict) else "unknown"
        raise LoadError(f"{path} holds a '{kind}' model, not Grounding DINO (model_type '{MODEL_TYPE}', e.g. "
                        f"IDEA-Research/grounding-dino-tiny). Choose a Grounding DINO folder.")
    return config


def check_folder(path: Path) -> dict:
    config = _read_config(path)
    for what, names in (("weight", WEIGHT_FILES), ("processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not any((path / n).is_file() for n in names):
            raise LoadError(f"{path} has no {what} file ({' or '.join(names[:2])}). Copy it from the model's "
                            f"release into this folder; nothing is downloaded at run time.")
    return config


def content_identity(path: Path) -> str:
    """Changes when the model's files change, not when the folder is copied elsewhere (a dataset built with it
    on another machine keeps its build key)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for p in sorted(path.iterdir()):
        if p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _check_tokenizer(path: Path, tokenizer):
    wrong = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    wrong = {t: i for t, i in wrong.items() if i != SPECIAL_TOKENS[t]}
    if wrong:
        raise LoadError(f"{path}: the tokenizer gives {wrong}, but Grounding DINO marks phrases with BERT-uncased's "
                        f"ids {SPECIAL_TOKENS}; its tokenizer files belong to another model. Copy the tokenizer "
                        f"files (vocab.txt, tokenizer.json, tokenizer_config.json) of this Grounding DINO release.")


MIN_TRANSFORMERS_MAJOR = 5  # the dataset builder is tested on 5 only; 4.x's tokenizer and grounding differ


def load_grounding_dino(name: str, path: Path = None, dtype_choice: str = "fp32", load_device=None,
                        progress=None) -> GroundingDINO:
    """The detector, offline; progress(step) after each of 3 steps. load_device: where ComfyUI runs it (default:
    the text encoders' device, like the stock CLIP vision model)."""
    if int(transformers.__version__.split(".")[0]) < MIN_TRANSFORMERS_MAJOR:
        raise LoadError(f"Grounding DINO (Build MUMU Dataset) needs transformers {MIN_TRANSFORMERS_MAJOR}.0 or newer; "
                        f"ComfyUI's Python has {transformers.__version__}, whose Grounding DINO grounds differently "
                        f"(its processor and post-processing changed). Upgrade it: pip install -U transformers")
    path = Path(path) if path is not None else resolve(name)
    if dtype_choice not in TORCH_DTYPES:
        raise LoadError(f"unknown dtype {dtype_choice!r}; choose one of {DTYPES}")
    dtype = TORCH_DTYPES[dtype_choice]
    config = check_folder(path)
    key = ("grounding_dino", str(path.resolve()), dtype, str(load_device), file_identity(path))
    return shared(key, lambda: _load(name, path, dtype, config, key, load_device, progress))


def _load(name, path, dtype, config, key, load_device, progress) -> GroundingDINO:
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise LoadError(f"the Grounding DINO processor in {path} could not be loaded ({type(e).__name__}: "
                        f"{str(e)[:300]}). Copy the processor and tokenizer files of the release into the "
                        f"folder.") from None
    tokenizer, image_processor = getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None or not getattr(tokenizer, "is_fast", False):
        raise LoadError(f"{path}: its processor has no fast BERT tokenizer and image processor (found "
                        f"{type(processor).__name__}); copy the processor files of the Grounding DINO release.")
    _check_tokenizer(path, tokenizer)
    size = getattr(image_processor, "size", None)
    shortest, longest = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
    if isinstance(size, dict):
        shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not shortest or not longest:
        raise LoadError(f"{path}: the image processor's size {size!r} has no shortest_edge/longest_edge; copy "
                        f"preprocessor_config.json of the Grounding DINO release.")
    progress and progress(1)
    model, info = None, {}
    try:
        # mismatched shapes come back in `info` (and are refused below, naming the tensors) rather than as
        # transformers' own error, which points at a report only its log shows
        with quiet_loggers("transformers.modeling_utils", "transformers.utils.loading_report",
                           "transformers.distributed.tensor_parallel"):
            model, info = from_pretrained(GroundingDinoForObjectDetection, path, dtype, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
    except Exception as e:  # transformers and safetensors raise many kinds here
        raise LoadError(f"the weights in {path} could not be loaded ({type(e).__name__}: {str(e)[:300]}): a weight "
                        f"file is truncated, corrupt or does not belong to this config.json. Copy the folder "
                        f"again.") from None
    finally:
        if model is None:
            gc.collect()
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(problems.values()):
        del model
        gc.collect()  # nothing half-loaded stays in memory
        what = "lack" if problems["missing_keys"] else "hold other shapes than config.json says for"
        keys = problems["missing_keys"] or problems["mismatched_keys"]
        raise LoadError(f"{path}: the weight files {what} {len(keys)} tensor(s) of the Grounding DINO model, e.g. "
                        f"{[str(k) for k in keys[:3]]}. The folder is incomplete or its weights belong to another "
                        f"configuration; copy it again.")
    model.eval().requires_grad_(False)
    progress and progress(2)
    patcher = hosted(model, load_device)
    handle = GroundingDINO(patcher=patcher, config=model.config, source=str(path), name=name or path.name,
                           identity=f"{key[4]}:{dtype}", processor=processor, tokenizer=tokenizer, dtype=dtype,
                           max_text_len=int(config.get("max_text_len", 256)), shortest_edge=int(shortest),
                           longest_edge=int(longest), build_identity=content_identity(path))
    progress and progress(3)
    return handle
