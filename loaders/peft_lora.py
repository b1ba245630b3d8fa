"""peft LoRA folders (adapter_config.json + adapter_model.safetensors), read and written without peft, in peft's own
layout so that peft reads what the pack writes (PeftModel.from_pretrained) and the pack reads what peft writes.

Written folders carry the metadata beyond_clip_kind in their weights file: the pack replaces a folder only when it
wrote it (the same rule as bridge_files.writable_path for single files).
"""
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import pickles
from .bridge_files import kind_of, label
from .errors import LoadError
from .llm import read_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def read_peft_lora(folder: Path) -> tuple:
    """(adapter config, {peft module path: (A, B)}) of a peft LoRA folder, refusing what is not plain LoRA."""
    folder = Path(folder)
    cfg_path = folder / PEFT_CONFIG
    if not cfg_path.is_file():
        raise LoadError(f"{folder} has no {PEFT_CONFIG}: it is not a peft LoRA folder. Save the LoRA with "
                        f"peft's save_pretrained (or this pack's trainer) into models/LLM/<name>/.")
    config = read_json(cfg_path, "the adapter's folder")
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA is read)")
    if config.get("use_dora"):
        problems.append("use_dora (DoRA)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"trained biases (bias={config.get('bias')!r})")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (GPT-2 style Conv1D layers)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config.get('modules_to_save')} (fully trained copies of layers)")
    if problems:
        raise LoadError(f"{folder}: this peft adapter uses {', '.join(problems)}, which this pack does not "
                        f"apply. Use a plain LoRA (peft LoraConfig with default options).")
    check_alphas(config, cfg_path)
    weights = next((folder / w for w in PEFT_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise LoadError(f"{folder} has no {' or '.join(PEFT_WEIGHTS)}; copy the adapter weights into the folder.")
    if weights.suffix == ".safetensors":
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as e:  # safetensors raises several kinds
            raise LoadError(f"{weights} could not be read ({type(e).__name__}: {e}); it is truncated or corrupt. "
                            f"Copy the adapter again.") from None
    else:
        state = pickles.load(weights, "Copy the adapter again, or save it as adapter_model.safetensors.")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise LoadError(f"{weights} does not hold a state dict of tensors; it is not a peft adapter's weights.")
    pairs, other = {}, []
    for key, tensor in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        pairs.setdefault(m.group("path"), {})[m.group("ab")] = tensor
    if other:
        raise LoadError(f"{weights} holds {len(other)} tensor(s) that are not LoRA A/B matrices of linear layers, "
                        f"e.g. {other[:3]} (embedding LoRA or DoRA magnitudes are not read).")
    half = sorted(p for p, ab in pairs.items() if len(ab) != 2)
    if half:
        raise LoadError(f"{weights}: layer(s) {half[:3]} have only one of lora_A / lora_B; the file is damaged.")
    if not pairs:
        raise LoadError(f"{weights} holds no LoRA tensors.")
    return config, {p: (ab["A"], ab["B"]) for p, ab in pairs.items()}


def check_alphas(config: dict, path: Path):
    """lora_alpha and alpha_pattern as peft writes them (numbers, regular expressions), or LoadError naming them."""
    def number(value):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    patterns = config.get("alpha_pattern") or {}
    problem = None
    if not number(config.get("lora_alpha", 8)):
        problem = f"lora_alpha {config.get('lora_alpha')!r} is not a number"
    elif not isinstance(patterns, dict):
        problem = f"alpha_pattern is a {type(patterns).__name__}, not a {{pattern: alpha}} object"
    else:
        for pattern, alpha in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                problem = f"alpha_pattern {pattern!r} is not a regular expression ({e})"
                break
            if not number(alpha):
                problem = f"alpha_pattern {pattern!r} gives {alpha!r}, not a number"
                break
    if problem:
        raise LoadError(f"{path}: {problem}. Save the LoRA again with peft (or this pack's trainer).")


def alpha_for(config: dict, path: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):  # peft's own matching of pattern keys
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def scale_for(config: dict, path: str, rank: int) -> float:
    alpha = alpha_for(config, path)
    return alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank


def check_writable(folder: Path, kind: str):
    """A peft folder may be replaced only when it is absent or one this pack wrote as `kind`."""
    folder = Path(folder)
    if folder.exists() and kind_of(folder / PEFT_WEIGHTS[0]) != kind:
        raise LoadError(f"{folder} exists and is not a {label(kind)} written by this pack; choose another output "
                        f"name (the pack never replaces other files).")


def save_peft_lora(folder: Path, factors: dict, alpha: float, kind: str, base_model: str = "", target_modules=None):
    """A peft LoRA folder from factors {module path in the model peft wraps: (down A (r, in), up B (out, r))}.
    target_modules defaults to the layers' last names. Written to a temporary name first, so a failed write leaves
    no half folder; an existing folder is replaced only when the pack wrote it as `kind`."""
    folder = Path(folder)
    ranks = {int(down.shape[0]) for down, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"every layer needs the same rank, got {sorted(ranks)}")
    modules = target_modules if target_modules is not None else sorted({path.rsplit(".", 1)[-1] for path in factors})
    config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": float(alpha), "lora_dropout": 0.0,
              "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "task_type": None,
              "base_model_name_or_path": base_model, "inference_mode": True}
    tensors = {}
    for path, (down, up) in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = down.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{path}.lora_B.weight"] = up.detach().float().contiguous().cpu()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
        save_file(tensors, str(tmp / PEFT_WEIGHTS[0]), metadata={"format": "pt", "beyond_clip_kind": kind})
        if folder.exists():
            check_writable(folder, kind)
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
