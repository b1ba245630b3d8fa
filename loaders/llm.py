"""Hugging Face causal-LM folders from models/LLM, loaded offline, under ComfyUI's memory manager."""
import gc
import hashlib
import importlib
import json
import logging
import os
import pickle
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import comfy.model_management as mm
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import direct_weights, gguf_weights, pickles
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
    if ((wanted == torch.bfloat16 and not bf16_ok or wanted == torch.float16 and not fp16_ok)
            and not mm.is_device_cpu(device)):
        log.warning("%s is not supported on %s; loading the LLM in fp32", choice, device)
        return torch.float32
    return wanted


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from a model folder's file; LoadError naming it when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise LoadError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); copy it again"
                        f"{' from ' + what if what else ''}.") from None
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path} holds a JSON {type(value).__name__}, not an object; copy it again"
                        f"{' from ' + what if what else ''}.")
    return value


def check_folder(path: Path):
    if not (path / "config.json").is_file():
        raise LoadError(f"{path} has no config.json: it is not a Hugging Face model folder. Copy the whole model "
                        f"folder (config.json, *.safetensors, tokenizer files) into models/LLM/.")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...). Copy them from "
                        f"the model's original release into this folder; nothing is downloaded at run time.")
    config = read_json(path / "config.json", "the model's release")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LoadError(f"{path} has no weight files (*.safetensors or *.bin); copy them into the folder.")
    check_remote_code(path, config)
    return config


# Files of a model folder whose "auto_map" can name Python code shipped in the folder ("remote code").
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def remote_code(path: Path) -> dict:
    """{file name: {Auto class: what it names}} for the folder's files that name code of their own (auto_map)."""
    found = {}
    for name in CODE_NAMING_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map")
        except (ValueError, RecursionError, OSError, AttributeError):
            continue  # an unreadable file is reported by whatever reads it
        if auto_map:
            found[name] = auto_map if isinstance(auto_map, dict) else {"auto_map": auto_map}
    return found


def _listed(found: dict) -> str:
    return "; ".join(f"{name}: " + ", ".join(f"{k} -> {str(v)[:80]!r}" for k, v in list(entries.items())[:4])
                     for name, entries in found.items())


def check_remote_code(path: Path, config: dict):
    """A folder whose auto_map names code of its own: the pack never runs it (trust_remote_code stays off). When
    transformers ships the model type, its own classes are used and the user is told the entries are ignored;
    otherwise the folder cannot be loaded, and the message says so."""
    found = remote_code(path)
    if not found:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise LoadError(f"{path} needs Python code of its own to load (model type {model_type!r}, which transformers "
                        f"does not ship; auto_map in {_listed(found)}). This pack never runs code from a model "
                        f"folder. Use a model whose architecture transformers ships (Llama, Mistral, OPT, Qwen2, "
                        f"...), or a conversion of this one to such an architecture.")
    log.warning("%s: auto_map entries name Python code in the model folder (%s). The pack never runs code from a "
                "model folder: they are ignored, and transformers' own '%s' classes load the model.", path,
                _listed(found), model_type)


def weights_failure(path: Path, config: dict, error: Exception, cls=None) -> str:
    """What went wrong while transformers loaded a model folder, as the pack's message: the file and what to do,
    never transformers' or torch's own advice (remote code, weights_only=False)."""
    text = str(error)
    if "Unrecognized configuration class" in text:
        return (f"{path} holds a '{config.get('model_type')}' model, which is not a causal language model this "
                f"loader reads (Llama, OPT, Mistral, ... any AutoModelForCausalLM). Choose another folder.")
    if "trust_remote_code" in text or "custom code" in text:
        named = _listed(remote_code(path)) or "its files ask for it"
        return (f"{path} needs Python code of its own to load ({named}). This pack never runs code from a model "
                f"folder. Use a model whose architecture transformers ships.")
    if "Weights only load failed" in text or any(isinstance(e, pickle.UnpicklingError) for e in _chain(error)):
        for file in sorted(path.glob("*.bin")):
            try:
                pickles.load(file, "")
            except LoadError as bad:
                return f"{str(bad).strip()} Use the release's .safetensors files, or copy this file again."
        return f"a weight file in {path} could not be read as plain tensors; copy the folder again."
    if "mismatched" in text or "size mismatch" in text:
        wrong = direct_weights.shape_mismatches(cls or AutoModelForCausalLM, path) or _size_mismatches(text)
        return direct_weights.shape_message(path, wrong or ["a tensor's shape differs from the one it gives"])
    detail = "" if "weights_only" in text or "trust_remote_code" in text else f": {text[:300]}"
    return (f"the weights in {path} could not be loaded ({type(error).__name__}{detail}). A weight file is "
            f"truncated, corrupt or does not belong to this config.json; copy the folder again.")


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _size_mismatches(text: str) -> list:
    """The wrongly shaped tensors as transformers 4 names them in its error (5 reads no such list: direct_weights
    compares the headers)."""
    return [f"a weight file holds '{name}' with shape [{have}], the config makes it [{want}]"
            for name, have, want in _SIZE_MISMATCH.findall(text)]


def _chain(error):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _check_causal_lm(path: Path, config: dict):
    """Before the tokenizer: an older transformers fails on the tokenizer of a model type it does not know (e.g. a
    CLIP text encoder), which would hide what is wrong with the folder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: I001
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LoadError(f"{path} holds a '{config.get('model_type')}' model, which is not a causal language model "
                        f"this loader reads (Llama, OPT, Mistral, ... any AutoModelForCausalLM of this "
                        f"transformers). Choose another folder.")


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
    needs = quantization_needs(choice, device)
    if needs:
        raise LoadError(f"'{choice}' needs {needs} here. Upgrade them in ComfyUI's Python (pip install -U "
                        f"transformers bitsandbytes) and restart ComfyUI, or choose auto, fp16, bf16 or fp32.")
    if mm.is_device_cpu(device):
        compute = torch.float32
    else:
        compute = torch.bfloat16 if mm.should_use_bf16(device, prioritize_performance=False) else torch.float16
    if choice.startswith("int8"):
        return BitsAndBytesConfig(load_in_8bit=True), compute
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute), compute


# The releases an int8/nf4 LLM needs, found by running the tests on each: transformers quantizes on a CPU from 4.53
# on; ComfyUI moves its models with .to(), which transformers refuses on an 8-bit model before 5.0, and from 5.0
# allows from bitsandbytes 0.48 on; transformers 5 wants bitsandbytes 0.46.1 for any quantization.
def quantization_needs(choice: str, device) -> str:
    """"" when this transformers and bitsandbytes can load and run the int8/nf4 choice on device, else what they
    need, with the versions found."""
    import bitsandbytes
    import transformers
    from packaging.version import Version
    have_t, have_b = Version(transformers.__version__), Version(getattr(bitsandbytes, "__version__", "0"))
    wanted_t, wanted_b = Version("4.40"), Version("0.46")
    if choice.startswith("int8"):
        wanted_t, wanted_b = Version("5.0"), Version("0.48")
    elif mm.is_device_cpu(device):
        wanted_t = Version("4.53")
    if have_t >= Version("5.0"):
        wanted_b = max(wanted_b, Version("0.46.1"))
    missing = [f"{name} {wanted} or newer" for name, have, wanted in
               (("transformers", have_t, wanted_t), ("bitsandbytes", have_b, wanted_b)) if have < wanted]
    if not missing:
        return ""
    where = "on the CPU" if mm.is_device_cpu(device) else f"on {device}"
    return (f"{' and '.join(missing)} {where} (this ComfyUI has transformers {transformers.__version__}, "
            f"bitsandbytes {getattr(bitsandbytes, '__version__', '?')})")


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


@contextmanager
def quiet_loggers(*names):
    """These loggers say only errors while the block runs (their levels are restored after): transformers' load
    reports list weights the pack leaves out on purpose."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [q.level for q in loggers]
    for q in loggers:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(loggers, levels):
            q.setLevel(level)


def tokenizer_failure(path: Path, error: Exception) -> str:
    text = str(error)
    if "trust_remote_code" in text or "custom code" in text:
        named = _listed(remote_code(path)) or "its files ask for it"
        return (f"the tokenizer in {path} needs Python code of its own ({named}). This pack never runs code from a "
                f"model folder. Use a model whose tokenizer transformers ships (tokenizer.json is read without code).")
    detail = "" if "weights_only" in text else f": {text[:300]}"
    return (f"the tokenizer in {path} could not be loaded ({type(error).__name__}{detail}). Copy the tokenizer files "
            f"of this exact model into the folder.")


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


GGUF_PIP = "pip install gguf"


@dataclass
class GGUFInfo:
    architecture: str
    dequantized_elements: int  # weights once dequantized: the model's size is this times the dtype's bytes
    types: tuple  # quantization types found


def gguf_info(path: Path) -> GGUFInfo:
    """What a .gguf file holds, read from its header (tensor data stays on disk), or a LoadError saying why the
    pack cannot use it: gguf missing, not a GGUF file, an architecture or quantization transformers cannot
    dequantize, no tokenizer in its metadata."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader  # optional: the gguf extra
        from gguf.quants import dequantize
    except ImportError:
        raise LoadError(f"{path.name} is a GGUF file: reading it needs the 'gguf' package. Install it into "
                        f"ComfyUI's Python ({GGUF_PIP}) and restart ComfyUI, or use a Hugging Face folder.") from None
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # transformers before 4.41
        raise LoadError(f"{path.name} is a GGUF file, which this transformers ({transformers.__version__}) cannot "
                        f"read. Upgrade transformers in ComfyUI's Python (5.0 or newer reads GGUF tensor by tensor), "
                        f"or use a Hugging Face folder.") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        tensors = list(reader.tensors)
    except KeyError:
        raise LoadError(f"{path} has no general.architecture in its metadata: it is not a GGUF LLM written by "
                        f"llama.cpp's tools. Use another file.") from None
    except Exception as e:  # gguf raises ValueError, struct errors, numpy errors on damaged files
        raise LoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); it is truncated "
                        f"or corrupt. Copy it again.") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise LoadError(f"{path.name} holds a '{arch}' model, which this transformers ({transformers.__version__}) "
                        f"cannot dequantize from GGUF (it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}). "
                        f"Use the model's Hugging Face folder instead.")
    if "tokenizer.ggml.model" not in reader.fields:
        raise LoadError(f"{path.name} has no tokenizer in its metadata (tokenizer.ggml.*), and the pack never "
                        f"fetches one. Use a GGUF file that embeds its tokenizer, as llama.cpp's converter writes.")
    types = tuple(sorted({GGMLQuantizationType(t.tensor_type).name for t in tensors}))
    for t in tensors:
        try:  # a block of zeros tells whether gguf can dequantize this type at all
            dequantize(t.data[:0] if t.data.ndim else t.data, t.tensor_type)
        except NotImplementedError:
            kind = GGMLQuantizationType(t.tensor_type).name
            raise LoadError(f"{path.name}: its tensor {t.name} is quantized as {kind}, which the installed gguf "
                            f"package cannot dequantize. Update it (pip install -U gguf), or use another "
                            f"quantization of the model.") from None
        except Exception:
            pass  # an empty block may be refused for shape reasons; the load itself says what is wrong then
    elements = sum(int(t.n_elements) for t in tensors)
    return GGUFInfo(arch, elements, types)


def load_llm(name: str, path: Path, dtype_choice: str = "auto", progress=None) -> LoadedLLM:
    """progress(step) is called after each of the 4 steps; it may raise to stop (interruption). `path` is a Hugging
    Face folder, or a .gguf file (read through transformers' GGUF support)."""
    if path.suffix.lower() == ".gguf":
        return _load_gguf(name, path, dtype_choice, progress)
    config = check_folder(path)
    _check_causal_lm(path, config)
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


def _load_gguf(name, path, dtype_choice, progress) -> LoadedLLM:
    if dtype_choice in QUANTIZED:
        raise LoadError(f"{path.name} is a GGUF file: transformers dequantizes it while loading, so it cannot also be "
                        f"quantized by bitsandbytes. Choose auto, fp16, bf16 or fp32.")
    info = gguf_info(path)
    dtype = choose_dtype(dtype_choice, mm.text_encoder_device())
    key = ("llm-gguf", str(path.resolve()), dtype, file_identity(path))
    return shared(key, lambda: _load_gguf_now(name, path, dtype, info, progress))


def _load_gguf_now(name, path, dtype, info, progress) -> LoadedLLM:
    progress and progress(1)
    folder, file = str(path.parent), path.name
    try:  # the tokenizer is built from the file's own metadata (tokenizer.ggml.*)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise LoadError(f"the tokenizer stored in {path} could not be built ({type(e).__name__}: {str(e)[:200]}). "
                        f"Use a GGUF file converted with llama.cpp's tools.") from None
    progress and progress(2)
    model = None
    try:
        # dequantized into `dtype`: the model's memory is the dequantized size (info.dequantized_elements x dtype
        # bytes), which is what ComfyUI counts once it is wrapped. Read tensor by tensor when gguf_weights can
        # (transformers' own load holds the whole file's pages and the whole state dict at once).
        model = gguf_weights.load_gguf(AutoModelForCausalLM, path, dtype)
        if model is None:
            model = from_pretrained(AutoModelForCausalLM, folder, dtype, gguf_file=file)
    except LoadError:
        raise
    except Exception as e:  # transformers, gguf and numpy raise many kinds here
        raise LoadError(f"the weights in {path} could not be dequantized ({type(e).__name__}: {str(e)[:200]}). The "
                        f"file is truncated or corrupt, or holds a variant of '{info.architecture}' transformers does "
                        f"not read; copy it again or use the Hugging Face folder.") from None
    finally:
        if model is None:
            gc.collect()
    model.eval().requires_grad_(False)
    progress and progress(3)
    hosted = patching.wrap(model)
    width = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    llm = LoadedLLM(patcher=hosted, config=model.config, source=str(path), name=name, tokenizer=tokenizer, path=path,
                    dtype=dtype, identity=f"{file_identity(path)}:{dtype}:gguf", hidden_size=int(width))
    log.info("Beyond CLIP: %s (%s, %s) dequantized to %s: %.2f GB", path.name, info.architecture,
             "/".join(info.types), dtype, info.dequantized_elements * dtype.itemsize / 1e9)
    progress and progress(4)
    return llm


def _load(name, path, dtype, quantized, extra, config, device, progress) -> LoadedLLM:
    progress and progress(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here (OSError, ValueError, TypeError)
        raise LoadError(tokenizer_failure(path, e)) from None
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
            model, info = from_pretrained(AutoModelForCausalLM, path, dtype, output_loading_info=True, **extra)
            missing = sorted(info.get("missing_keys") or [])
            if missing:  # from_pretrained would run them with random values
                model = None
                raise LoadError(f"{path}: the weight files lack {len(missing)} tensor(s) of the model, e.g. "
                                f"{missing[:3]}. The folder is incomplete or the files are from another model; copy "
                                f"every weight file of the release.")
    except LoadError:
        raise
    except Exception as e:  # transformers and safetensors raise many kinds here
        raise LoadError(weights_failure(path, config, e)) from None
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
