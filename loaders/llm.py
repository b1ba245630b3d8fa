"""Hugging Face causal-LM folders from models/LLM, loaded offline, under ComfyUI's memory manager."""
import gc
import hashlib
import importlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import comfy.model_management as mm
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import direct_weights
from . import patcher as patching
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle, shared

DTYPES = ("auto", "fp32", "fp16", "bf16")
# bitsandbytes quantizes while transformers loads, on the device the LLM runs on: such an LLM stays there (moving
# quantized weights between devices is not something this pack relies on) and cannot take merged weight patches.
QUANTIZED = ("int8 (bitsandbytes)", "nf4 (bitsandbytes)")
LLM_DTYPES = DTYPES + QUANTIZED
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedLLM(Handle):
    """What the LLM socket carries. `base` is the same LLM without adapters (for chat)."""
    tokenizer: object = None
    path: Path = None
    dtype: torch.dtype = torch.float32
    hidden_size: int = 0
    quantized: str = ""  # one of QUANTIZED, or ""
    adapter: object = None  # an AppliedAdapter when one is applied
    base: "LoadedLLM" = field(default=None, repr=False)
    what = "LLM"

    def with_adapter(self, patcher, adapter) -> "LoadedLLM":
        return replace(self, patcher=patcher, adapter=adapter, base=self.base or self,
                       identity=f"{self.identity}+{adapter.identity}")

    def describe(self) -> str:
        extra = f" + {self.adapter.describe()}" if self.adapter else ""
        return f"LLM '{self.name}'{extra}"


def choose_dtype(choice: str, device) -> torch.dtype:
    if choice not in DTYPES:
        raise LoadError(f"unknown dtype {choice!r}; choose one of {DTYPES}")
    if choice == "fp32" or mm.is_device_cpu(device) and choice == "auto":
        return torch.float32  # CPUs run half precision slowly or not at all
    bf16_ok = mm.should_use_bf16(device, prioritize_performance=False)
    fp16_ok = mm.should_use_fp16(device, prioritize_performance=False)
    if choice == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16 if fp16_ok else torch.float32
    wanted = torch.bfloat16 if choice == "bf16" else torch.float16
    if (wanted == torch.bfloat16 and not bf16_ok or wanted == torch.float16 and not fp16_ok) and not mm.is_device_cpu(device):
        log.warning("%s is not supported on %s; loading the LLM in fp32", choice, device)
        return torch.float32
    return wanted


def check_folder(path: Path):
    if not (path / "config.json").is_file():
        raise LoadError(f"{path} has no config.json: it is not a Hugging Face model folder. Copy the whole model "
                        f"folder (config.json, *.safetensors, tokenizer files) into models/LLM/.")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...). Copy them from "
                        f"the model's original release into this folder; nothing is downloaded at run time.")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise LoadError(f"{path / 'config.json'} is not valid JSON ({e}); copy it again.") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LoadError(f"{path} has no weight files (*.safetensors or *.bin); copy them into the folder.")
    return config


_FINGERPRINTS = {}  # (folder, file identity) -> fingerprint
FINGERPRINT_SAMPLES = 64  # 4 KiB reads per weight file: a fine-tune that changed any sizeable part changes one


def weights_fingerprint(path: Path) -> str:
    """What names an LLM folder's weights and tokenizer, whatever dtype or quantization it is loaded with (files
    saved for one LLM are refused on another): each weight file's name, size, safetensors header (tensor names,
    dtypes, shapes) and evenly spaced samples of its bytes, and the tokenizer files. Cheap for any size."""
    path = Path(path)
    key = (str(path.resolve()), file_identity(path))
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        for f in weights:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                if f.suffix == ".safetensors":
                    header = int.from_bytes(fh.read(8), "little")
                    h.update(fh.read(min(header, 100 << 20)))
                for i in range(FINGERPRINT_SAMPLES):
                    fh.seek(size * i // FINGERPRINT_SAMPLES)
                    h.update(fh.read(4096))
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                h.update(name.encode())
                h.update((path / name).read_bytes())
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def prefetch(path: Path):
    """Ask the kernel to read the weight files ahead, in file order: transformers maps them and touches tensors in
    module order, which on a cold cache turns one sequential read into many scattered ones."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def quantization(choice: str, device):
    """(transformers' BitsAndBytesConfig, compute dtype) for an int8/nf4 choice, or a LoadError saying what is
    missing. Compute runs in fp32 on a CPU, in bf16 or fp16 on a GPU."""
    missing = [name for name in ("bitsandbytes", "accelerate") if not _importable(name)]
    if missing:
        raise LoadError(f"'{choice}' needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: install "
                        f"into ComfyUI's Python (pip install {' '.join(missing)}) and restart ComfyUI, or choose "
                        f"auto, fp16, bf16 or fp32.")
    problem = bitsandbytes_problem(device)
    if problem:
        import bitsandbytes  # optional: the quantized extra
        raise LoadError(f"'{choice}': bitsandbytes {getattr(bitsandbytes, '__version__', '?')} cannot run on {device}, "
                        f"where this ComfyUI runs the LLM ({problem}). It needs an NVIDIA GPU with CUDA, or on a CPU "
                        f"bitsandbytes 0.46 or newer (pip install -U bitsandbytes). Or choose auto, fp16, bf16 or "
                        f"fp32.")
    if mm.is_device_cpu(device):
        compute = torch.float32
    else:
        compute = torch.bfloat16 if mm.should_use_bf16(device, prioritize_performance=False) else torch.float16
    if choice.startswith("int8"):
        return BitsAndBytesConfig(load_in_8bit=True), compute
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute), compute


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


_BNB_CHECKED = {}  # (bitsandbytes version, device) -> "" or why it cannot run there


def bitsandbytes_problem(device) -> str:
    """"" when bitsandbytes can quantize and run an 8-bit and a 4-bit layer on `device`, else what failed. Checked by
    doing it: which devices a bitsandbytes build supports has changed across releases (CPUs from 0.46 on)."""
    import bitsandbytes as bnb  # optional: the quantized extra
    key = (getattr(bnb, "__version__", "?"), str(device))
    if key not in _BNB_CHECKED:
        try:
            x = torch.randn(2, 64, device=device)
            for layer in (bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False),
                          bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)):
                layer.to(device)(x)
            _BNB_CHECKED[key] = ""
        except Exception as e:  # bitsandbytes raises many kinds for an unsupported device
            _BNB_CHECKED[key] = f"{type(e).__name__}: {e}"
    return _BNB_CHECKED[key]


def quantized_size(path: Path, choice: str, compute: torch.dtype) -> int:
    """Bytes the LLM in `path` will take once bitsandbytes quantized it, computed from its config before anything
    is loaded: int8 is a byte per weight and a float32 scale per row; nf4 half a byte per weight and a float32
    absmax per block of 64. Layers transformers leaves unquantized (the output embedding, tied weights) and every
    other tensor count at the compute dtype. ComfyUI frees this much on the device before the load."""
    from accelerate import init_empty_weights  # optional: the quantized extra
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    output = model.get_output_embeddings()
    tensors = model.state_dict(keep_vars=True)  # what ComfyUI's size counts; tied weights are one object
    uses = Counter(id(t) for t in tensors.values())
    total, counted = 0, set()
    for key, tensor in tensors.items():
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if not (isinstance(module, torch.nn.Linear) and name == "weight" and module is not output
                and uses[id(tensor)] == 1):
            total += tensor.numel() * (compute.itemsize if tensor.is_floating_point() else tensor.element_size())
        elif choice.startswith("int8"):
            total += tensor.numel() + tensor.shape[0] * 4
        else:
            total += (tensor.numel() + 1) // 2 + -(-tensor.numel() // 64) * 4
    return total


def from_pretrained(cls, path, dtype, **extra):
    """transformers' from_pretrained, offline and without remote code (the dtype keyword was renamed in 4.56)."""
    kwargs = {"local_files_only": True, "trust_remote_code": False, **extra}
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    return cls.from_pretrained(str(path), **kwargs)


def _keep_packing(model):
    """bitsandbytes' CPU backend (0.50) repacks nf4 weights for its AVX512-bf16 kernel at the first forward (their
    scales become bf16) and unpacks them whenever state_dict() is called, which ComfyUI does each time it loads a
    model: the outputs then change from one load to the next. Its plain kernel keeps the weights as loaded."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_llm(name: str, path: Path, dtype_choice: str = "auto", progress=None) -> LoadedLLM:
    """progress(step) is called after each of the 4 steps; it may raise to stop (interruption)."""
    config = check_folder(path)
    device = mm.text_encoder_device()
    extra, quantized = {}, ""
    if dtype_choice in QUANTIZED:
        quantized = dtype_choice
        qconfig, dtype = quantization(dtype_choice, device)
        extra = {"quantization_config": qconfig, "device_map": {"": device}}
    else:
        dtype = choose_dtype(dtype_choice, device)
    key = ("llm", str(path.resolve()), dtype, quantized, file_identity(path))
    return shared(key, lambda: _load(name, path, dtype, quantized, extra, config, device, progress))


def _load(name, path, dtype, quantized, extra, config, device, progress) -> LoadedLLM:
    progress and progress(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here (OSError, ValueError, TypeError)
        raise LoadError(f"the tokenizer in {path} could not be loaded ({type(e).__name__}: {e}). Copy the "
                        f"tokenizer files of this exact model into the folder.") from None
    progress and progress(2)
    model = None
    try:
        if quantized:  # bitsandbytes quantizes while loading: only from_pretrained does that
            # It puts the weights straight on the device: ComfyUI makes room first, as before loading its own models.
            mm.free_memory(quantized_size(path, quantized, dtype) + mm.minimum_inference_memory(), device)
            log.debug("%s: loading with transformers' from_pretrained (%s)", path, quantized)
        else:
            model = direct_weights.load_pretrained(AutoModelForCausalLM, path, dtype)
        if model is None:
            prefetch(path)
            model = from_pretrained(AutoModelForCausalLM, path, dtype, **extra)
    except LoadError:
        raise
    except Exception as e:  # transformers and safetensors raise many kinds here
        if "Unrecognized configuration class" in str(e):
            raise LoadError(f"{path} holds a '{config.get('model_type')}' model, which is not a causal language "
                            f"model this loader reads (Llama, OPT, Mistral, ... any AutoModelForCausalLM). "
                            f"Choose another folder.") from None
        raise LoadError(f"the weights in {path} could not be loaded ({type(e).__name__}: {e}). A weight file is "
                        f"truncated, corrupt or does not belong to this config.json; copy the folder again.") from None
    finally:
        if model is None:
            gc.collect()  # nothing half-loaded stays in memory
    model.eval().requires_grad_(False)
    if quantized:
        _keep_packing(model)
    progress and progress(3)
    # The patcher's size is the state dict's bytes: for a quantized model, its packed weights.
    hosted = patching.wrap(model, pinned=bool(quantized))
    if quantized:  # already on the device: ComfyUI counts it there from now on
        patching.load_to_device(hosted)
    width = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    llm = LoadedLLM(patcher=hosted, config=model.config, source=str(path), name=name, tokenizer=tokenizer, path=path,
                    dtype=dtype, quantized=quantized, identity=f"{file_identity(path)}:{dtype}:{quantized}",
                    hidden_size=int(width))
    progress and progress(4)
    return llm
