"""A training run's folder, output/beyond_clip_training/<run>/:
  cache/<key>.safetensors   student inputs + teacher targets per caption (the key says what made them)
  cache/latents-<key>.safetensors   VAE latents of the run's pictures
  cache/codes-<key>.safetensors     SEED codes of the run's pictures
  checkpoint.pt             the trainer's state (weights, optimizer, step, losses), read with weights_only=True
  history.json              losses per step, the held-out loss, where the result was written
Every file is written atomically (a temporary file, then renamed): a crash leaves the previous one intact.
"""
import hashlib
import json
import os
from pathlib import Path

import folder_paths
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..bridges.training.data import DistillData, TokenData
from . import pickles
from .errors import LoadError
from .folders import check_output_name

RUNS_FOLDER = "beyond_clip_training"
CACHE_FORMAT = "beyond_clip.distill_cache"
LATENTS_FORMAT = "beyond_clip.latents"
CODES_FORMAT = "beyond_clip.seed_codes"
CHECKPOINT = "checkpoint.pt"
RESUME_ADVICE = "Delete it to start the run again, use another run name, or switch 'resume' off."
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_dir(run_name: str, output_dir=None) -> Path:
    base = Path(output_dir or folder_paths.get_output_directory())
    return base / RUNS_FOLDER / check_output_name(run_name, "run name")


def captions_identity(captions) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def write_tensors(path: Path, tensors: dict, metadata: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_tensors(path: Path, fmt: str):
    """{name: tensor} of a cache file of format `fmt`, or None when it is absent, unreadable or another format.
    Tensors are cloned outside inference mode: ones read under ComfyUI's inference mode could not take part in
    autograd."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != fmt:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not iterable
    except (OSError, SafetensorError):
        return None
    with torch.inference_mode(False):
        return {k: v.clone() for k, v in tensors.items()}


def build_cache(run: Path, captions, input_fn, teacher, identity: dict, cache_dtype="fp32", progress=None):
    """(data, path) for the captions, read from run/cache/ when an identical cache is there, else computed and
    written. input_fn(text) -> (the student's input (1, T[, D]): float hidden states or long token ids, last real
    token); teacher(text) -> (tokens (1, 77, W), pooled (1, P) or None). progress(done, total) after each caption;
    it may raise to stop (nothing half-written stays). data is DistillData (hidden states) or TokenData (ids)."""
    key = _key({**identity, "captions": captions_identity(captions), "dtype": cache_dtype})
    path = run / "cache" / f"{key}.safetensors"
    data = read_cache(path) if path.is_file() else None
    if data is not None and len(data) == len(captions):
        return data, path
    dtype = CACHE_DTYPES[cache_dtype]
    inputs, last, targets, pooled = [], [], [], []
    for i, text in enumerate(captions):
        x, last_token = input_fn(text)
        tokens, pool = teacher(text)
        inputs.append(x[0].to(dtype) if x.is_floating_point() else x[0])
        last.append(last_token)
        targets.append(tokens[0])
        if pool is not None:
            pooled.append(pool[0])
        if progress is not None:
            progress(i + 1, len(captions))
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1:
        raise LoadError(f"the student gave inputs of different shapes {sorted(shapes)[:3]}; every caption must "
                        f"give the same number of tokens")
    name = "inputs" if inputs[0].is_floating_point() else "ids"
    tensors = {name: torch.stack(inputs), "last_token": torch.tensor(last, dtype=torch.long),
               "targets": torch.stack(targets)}
    if pooled:
        tensors["pooled"] = torch.stack(pooled)
    write_tensors(path, tensors, {"format": CACHE_FORMAT, "about": json.dumps(identity),
                                  "captions": str(len(captions))})
    return read_cache(path), path


def read_cache(path):
    """DistillData or TokenData from a cache file, or None when it is absent or not a cache (it is then rebuilt)."""
    t = read_tensors(path, CACHE_FORMAT)
    if t is None or "targets" not in t or "last_token" not in t:
        return None
    if "ids" in t:
        return TokenData(ids=t["ids"], last_token=t["last_token"], targets=t["targets"], pooled=t.get("pooled"))
    if "inputs" not in t:
        return None
    return DistillData(inputs=t["inputs"], last_token=t["last_token"], targets=t["targets"], pooled=t.get("pooled"))


def cache_about(path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {}).get("about", "{}"))


def find_cache(run: Path) -> Path:
    """The newest cache of a run (the command line trains on a cache the node or an earlier run built)."""
    caches = sorted((p for p in (run / "cache").glob("*.safetensors") if not p.name.startswith(("latents-", "codes-"))),
                    key=lambda p: p.stat().st_mtime)
    if not caches:
        raise LoadError(f"{run} has no target cache (cache/*.safetensors). Build one first: give --llm and "
                        f"--checkpoint, or run the Train node once with this run name.")
    return caches[-1]


def latents_path(run: Path, identity: dict) -> Path:
    return run / "cache" / f"latents-{_key(identity)}.safetensors"


def codes_path(run: Path, identity: dict) -> Path:
    """SEED codes of a run's pictures (SEED-LLM training)."""
    return run / "cache" / f"codes-{_key(identity)}.safetensors"


# ---- checkpoints and history --------------------------------------------------------------------------------

def save_checkpoint(run: Path, state: dict):
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / (CHECKPOINT + ".tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, run / CHECKPOINT)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(run: Path):
    path = run / CHECKPOINT
    if not path.is_file():
        return None
    state = pickles.load(path, RESUME_ADVICE, mmap=False)  # not mapped: the file is replaced at the next checkpoint
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise LoadError(f"{path} is not a checkpoint of this pack's trainer. {RESUME_ADVICE}")
    return state


def write_history(run: Path, info: dict):
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "history.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, run / "history.json")
