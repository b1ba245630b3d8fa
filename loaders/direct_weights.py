"""Hugging Face safetensors folders read straight into the model, without transformers' loading machinery.

The model is built from its config with parameters on the meta device (buffers real, so non-persistent ones
such as rotary inv_freq are computed as usual), each *.safetensors header is parsed here, and every tensor
becomes the final parameter in one pass over each file, in file order:
- in the wanted dtype: a view of a private (copy-on-write) memory map of the file, as transformers 5 gives
  too: no second copy, and edits (weight patches) never reach the file. Its pages are read in file order,
  with readahead, before returning: a first load from disk is one sequential read.
- in another dtype: converted tensor by tensor from the map, whose pages are dropped as soon as a tensor is
  converted (from_pretrained holds the whole file's pages and the converted weights at once: ~1.5x).
- without memory maps (Windows, where a private map reserves the whole file in the commit charge): readinto
  straight into the final tensor, or into one reused staging buffer for conversions.

load_pretrained() returns None whenever it cannot be sure to give exactly what from_pretrained gives
(transformers older than 5, quantization, keep-in-fp32 modules, checkpoint key conversions, keys that do not
match, unknown dtypes, ...); the caller then uses from_pretrained. A truncated or corrupt file raises LoadError,
on every transformers (the headers are checked before anything else).
"""
import contextlib
import gc
import inspect
import json
import logging
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoadError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
MAX_HEADER = 100 * 2**20  # safetensors' own limit
PAGE = mmap.PAGESIZE
# Private maps are cheap on POSIX; on Windows one reserves commit charge for the whole file (transformers reads
# with pread there for the same reason).
USE_MMAP = sys.platform != "win32"


class Fallback(Exception):
    """The direct path cannot be sure to match from_pretrained; the message says why (logged at debug)."""


@dataclass
class Entry:
    key: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute offsets in the file
    end: int


def read_header(file: Path) -> list:
    """The file's tensors in file order. LoadError when the file is truncated or its header is not safetensors;
    Fallback for what this reader does not handle (dtypes, holes, trailing bytes)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length > MAX_HEADER or 8 + length > size:
                raise LoadError(f"{file} is truncated or is not a safetensors file (its header does not fit in its "
                                f"{size} bytes). Copy it again from the model's release.")
            header = json.loads(f.read(length))
    except OSError as e:
        raise LoadError(f"{file} could not be read ({e}). Check the file and its permissions, or copy it "
                        f"again.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{file} is corrupt: its safetensors header is not valid JSON ({e}). Copy it again.") from None
    if not isinstance(header, dict):
        raise LoadError(f"{file} is corrupt: its safetensors header is not a JSON object. Copy it again.")
    header.pop("__metadata__", None)
    base = 8 + length
    entries = []
    for key, info in header.items():
        try:
            name, shape, (start, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{file} is corrupt: the header entry of '{key}' is malformed. Copy it again.") from None
        if not isinstance(name, str) or name not in DTYPES:
            raise Fallback(f"{file.name}: tensor '{key}' has dtype {name}")
        dtype = DTYPES[name]
        numel = 1
        for n in shape:
            numel *= n
        if min(shape, default=0) < 0 or start < 0 or end - start != numel * dtype.itemsize:
            raise LoadError(f"{file} is corrupt: the header gives '{key}' {end - start} bytes for shape {shape} of "
                            f"{name}. Copy it again.")
        entries.append(Entry(key, dtype, shape, base + start, base + end))
    entries.sort(key=lambda e: (e.start, e.end))
    data_end = entries[-1].end if entries else base
    if data_end > size:
        raise LoadError(f"{file} is truncated: its header describes {data_end} bytes but the file holds {size}. "
                        f"Copy it again from the model's release.")
    position = base
    for e in entries:
        if e.start != position:  # safetensors writes tensors back to back; anything else is left to it
            raise Fallback(f"{file.name}: tensors are not back to back at '{e.key}'")
        position = e.end
    if position != size:
        raise Fallback(f"{file.name}: {size - position} bytes after the last tensor")
    return entries


def checkpoint_files(folder: Path) -> list:
    """The safetensors files from_pretrained would read: model.safetensors, else the index's shards."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if not index.is_file():
        raise Fallback(f"no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Fallback(f"{INDEX_FILE} unreadable ({e})") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise Fallback(f"{INDEX_FILE} names {name!r}, not a safetensors file of this folder")
        if not (folder / name).is_file():
            raise LoadError(f"{folder} lacks {name}, one of the weight files its {INDEX_FILE} lists. Copy every "
                            f"weight file of the release into the folder.")
    return [folder / name for name in names]


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside is moved to the meta device (no memory); buffers stay real. Like
    accelerate's init_empty_weights(include_buffers=False). The parameters are flagged as transformers flags
    loaded ones, so its weight init (run in post_init) skips them and only computes the buffers."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is None:
            return
        if type(param) is not torch.nn.Parameter:
            raise Fallback(f"parameter '{name}' is a {type(param).__name__}")
        empty = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        empty.__dict__.update(param.__dict__)
        empty._is_hf_initialized = True
        module._parameters[name] = empty

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


_BUILD_LOCK = threading.Lock()
INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
                  "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def no_init_on_meta():
    """torch.nn.init does nothing to meta tensors (the modules' reset_parameters, ~0.2 ms a call through the meta
    decompositions); real tensors, such as buffers, are initialised as usual."""
    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def skipping(init):
        def call(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return call

    for name, init in originals.items():
        setattr(torch.nn.init, name, skipping(init))
    try:
        yield
    finally:
        for name, init in originals.items():
            setattr(torch.nn.init, name, init)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _transformers_5():
    """transformers' own pieces the direct path relies on (those of version 5), or Fallback."""
    from transformers import PreTrainedModel
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.initialization import no_tie_weights
    except ImportError:
        raise Fallback("transformers older than 5") from None
    if "missing_keys" not in inspect.signature(PreTrainedModel.tie_weights).parameters:
        raise Fallback("transformers' tie_weights has no missing_keys")
    return get_model_conversion_mapping, no_tie_weights


def _model_class(cls, config):
    """cls itself, or the class an Auto class picks for config (transformers' own, never remote code)."""
    if not hasattr(cls, "_model_mapping"):
        return cls
    # An auto_map naming code in the folder is ignored, as from_pretrained without remote code ignores it for a
    # model type transformers ships (loaders.llm.check_remote_code tells the user).
    from transformers.models.auto.auto_factory import _get_model_class
    try:
        return _get_model_class(config, cls._model_mapping)
    except (KeyError, ValueError) as e:
        raise Fallback(f"{cls.__name__} has no class for this config ({e})") from None


def _load_config(cls, path: Path, dtype):
    from transformers import AutoConfig
    loader = AutoConfig if hasattr(cls, "_model_mapping") else cls.config_class
    config = loader.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if getattr(config, "quantization_config", None) is not None:
        raise Fallback("quantized checkpoint")
    if getattr(config, "transformers_weights", None) or getattr(type(config), "extra_files", None):
        raise Fallback("the config names its own weight files")
    config.name_or_path = str(path)
    config.dtype = dtype  # as from_pretrained records it, on the config and its sub-configs
    for sub in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = dtype
    return config


def _build(model_class, config, dtype, no_tie_weights):
    try:
        from transformers.monkey_patching import get_patch_mapping
        if get_patch_mapping():
            raise Fallback("transformers monkey patches are registered")
    except ImportError:
        pass
    # Construction may draw random numbers for parameters that end on meta anyway: leave the caller's RNG as it was.
    # The context managers below patch torch for the whole process (Module.register_parameter, torch.nn.init, the
    # default dtype), as accelerate's init_empty_weights does: a module that another thread builds meanwhile would
    # get meta parameters. The lock keeps the pack's own loads apart; ComfyUI runs nodes one at a time.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]), default_dtype(dtype), no_tie_weights(), \
            parameters_on_meta(), no_init_on_meta():
        return model_class(config)


def _match(model, entries_by_file, skip):
    """(targets {checkpoint key: model key}, unexpected checkpoint keys, wrong shapes as text, model keys seen,
    the model's state dict) with from_pretrained's base-model prefix rule (strip first, then add). Fallback for
    two checkpoint keys that give one model key."""
    expected = model.state_dict()
    prefix = model.base_model_prefix
    targets, unexpected, wrong, seen = {}, [], [], {}
    for file, entries in entries_by_file:
        for e in entries:
            key = e.key
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
                key = key[len(prefix) + 1:]
            elif prefix and f"{prefix}.{key}" in expected:
                key = f"{prefix}.{key}"
            if key.startswith(skip):
                continue
            if key not in expected:
                unexpected.append(e.key)
                continue
            if key in seen:
                raise Fallback(f"checkpoint keys '{seen[key]}' and '{e.key}' both give '{key}'")
            if tuple(expected[key].shape) != e.shape:
                wrong.append(f"{file.name} holds '{e.key}' with shape {list(e.shape)}, the config makes it "
                             f"{list(expected[key].shape)}")
            seen[key] = e.key
            targets[e.key] = key
    return targets, unexpected, wrong, seen, expected


def _targets(model, entries_by_file, skip, folder):
    """{checkpoint key: model key}, model keys missing from the checkpoint, the model's state dict. LoadError naming
    wrongly shaped tensors (from_pretrained refuses them too, but names them only in its log); Fallback for keys
    that do not match."""
    targets, unexpected, wrong, seen, expected = _match(model, entries_by_file, skip)
    if wrong:
        raise LoadError(shape_message(folder, wrong))
    if unexpected:
        raise Fallback(f"{len(unexpected)} checkpoint key(s) the model does not have, e.g. {unexpected[:3]}")
    missing = {k for k in expected if k not in seen and not k.startswith(skip)}
    return targets, missing, expected


def shape_message(folder: Path, wrong: list) -> str:
    named = "; ".join(wrong[:3]) + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")
    return (f"the weights in {folder} do not fit its config.json: {named}. The weight files and config.json come "
            f"from different models, or a file was edited; copy the folder again.")


def shape_mismatches(cls, path, skip: tuple = ()) -> list:
    """The wrongly shaped tensors of a safetensors folder against the model its config.json builds, as text (for
    messages when from_pretrained refused the folder); [] when they cannot be told from the headers."""
    path = Path(path)
    try:
        files = checkpoint_files(path)
        entries_by_file = [(f, read_header(f)) for f in files]
        config = _load_config(cls, path, torch.float32)
        try:
            get_model_conversion_mapping, no_tie_weights = _transformers_5()
        except Fallback:  # transformers 4: checkpoint keys are the model's own; compare with a model on meta
            return _plain_mismatches(_model_class(cls, config), config, entries_by_file)
        model = _build(_model_class(cls, config), config, torch.float32, no_tie_weights)
        return _match(model, entries_by_file, tuple(skip))[2]
    except Exception as e:  # a message helper: whatever stops it, the caller says what it knows
        log.debug("%s: shapes not compared (%s: %s)", path, type(e).__name__, e)
        return []


def _plain_mismatches(model_class, config, entries_by_file) -> list:
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    return [f"{file.name} holds '{e.key}' with shape {list(e.shape)}, the config makes it {list(expected[e.key])}"
            for file, entries in entries_by_file for e in entries
            if e.key in expected and tuple(e.shape) != expected[e.key]]


def _read_file(file: Path, entries, targets, wanted, use_mmap):
    """{checkpoint key: tensor} for the entries in targets, in their wanted dtypes, in one pass in file order."""
    out = {}
    with open(file, "rb", buffering=0) as f:
        reader = _MappedReader(f) if use_mmap else _CopyReader(f, file)
        try:
            for e in entries:
                if e.key in targets:
                    out[e.key] = reader.read(e, wanted[e.key])
        finally:
            reader.close()  # the tensors keep a map alive; it closes with the last of them
    return out


class _CopyReader:
    """Reads each tensor's bytes with readinto: straight into the final tensor, or for another dtype into one
    reused staging buffer, converted from there."""

    def __init__(self, f, file):
        self.f, self.file, self.staging = f, file, None

    def _fill(self, view, e):
        self.f.seek(e.start)
        got = 0
        while got < len(view):  # readinto may return less than asked
            n = self.f.readinto(view[got:])
            if not n:
                raise LoadError(f"{self.file} is truncated: it ended while reading '{e.key}'. Copy it again.")
            got += n

    def read(self, e, dtype):
        size = e.end - e.start
        if e.dtype == dtype:
            tensor = torch.empty(e.shape, dtype=dtype)
            if size:
                self._fill(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), e)
            return tensor
        if self.staging is None or self.staging.numel() < size:
            self.staging = torch.empty(size, dtype=torch.uint8)
        self._fill(memoryview(self.staging[:size].numpy()), e)
        return self.staging[:size].view(e.dtype).view(e.shape).to(dtype)

    def close(self):
        self.staging = None


class _MappedReader:
    """A private (copy-on-write) map of the file. Tensors in the wanted dtype are views of it, their pages read
    in file order before returning (one sequential read from disk on a first load, and the load is done when it
    returns, not at the first forward pass); others are converted from it and their pages dropped right after,
    so a conversion holds no second copy of the file. Readahead runs WINDOW bytes ahead of the pass."""
    WINDOW = 64 * 2**20

    def __init__(self, f):
        # Private: writes (weight patches) never reach the file. The map needs no descriptor of its own.
        extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY, **extra) if os.fstat(f.fileno()).st_size else None
        self.advised = 0
        self.fallback = _CopyReader(f, Path(f.name))

    def _advise(self, option, start, end):
        if hasattr(self.map, "madvise") and end > start:
            self.map.madvise(option, start, end - start)

    def read(self, e, dtype):
        aligned = e.start % e.dtype.itemsize == 0
        if self.map is None or e.end == e.start or not aligned:
            return self.fallback.read(e, dtype)
        if e.end > self.advised and hasattr(mmap, "MADV_WILLNEED"):
            start = max(self.advised, e.start // PAGE * PAGE)
            self.advised = min(-(-max(e.end, start + self.WINDOW) // PAGE) * PAGE, len(self.map))
            self._advise(mmap.MADV_WILLNEED, start, self.advised)
        source = torch.frombuffer(self.map, dtype=e.dtype, count=(e.end - e.start) // e.dtype.itemsize,
                                  offset=e.start).view(e.shape)
        if e.dtype == dtype:
            source.view(-1).view(torch.uint8)[::PAGE].max()  # one byte per page brings each page in
            return source
        tensor = source.to(dtype)
        del source
        # Unmap the source's pages (whole pages only: the neighbours may be views). Batching this saves nothing
        # measurable and holds more memory.
        if hasattr(mmap, "MADV_DONTNEED"):
            self._advise(mmap.MADV_DONTNEED, -(-e.start // PAGE) * PAGE, e.end // PAGE * PAGE)
        return tensor

    def close(self):
        self.map = None
        self.fallback.close()


def load_pretrained(cls, path, dtype: torch.dtype, skip: tuple = (), use_mmap: bool = None):
    """cls.from_pretrained(path, dtype=dtype, local_files_only=True) done directly, or None when the direct
    path cannot be sure to give the same model (the reason is logged at debug). LoadError for a truncated or
    corrupt file, naming it.

    cls: a transformers model class or Auto class. skip: prefixes of model keys (and of checkpoint keys, after
    the base-model prefix rule) that are neither read nor required; their parameters stay on the meta device
    and the caller removes those modules. The model is in eval mode with the checkpoint's generation config."""
    try:
        return _load(cls, Path(path), dtype, tuple(skip), USE_MMAP if use_mmap is None else use_mmap)
    except LoadError as e:
        message = str(e)
    # Raised out here, the error holds no frame of the failed attempt: nothing half-loaded stays in memory.
    gc.collect()
    raise LoadError(message)


def _load(cls, path: Path, dtype, skip: tuple, use_mmap: bool):
    model = None
    try:
        if sys.byteorder != "little":
            raise Fallback("big-endian machine")
        files = checkpoint_files(path)
        # LoadError here: truncated or corrupt. Checked before anything else, so that such a file gets this message
        # whichever path loads it (from_pretrained's names no file), on every transformers.
        entries_by_file = [(f, read_header(f)) for f in files]
        get_model_conversion_mapping, no_tie_weights = _transformers_5()
        try:
            config = _load_config(cls, path, dtype)
            model = _build(_model_class(cls, config), config, dtype, no_tie_weights)
        except Fallback:
            raise
        except Exception as e:  # an unknown model type, a config the class refuses: from_pretrained says it best
            raise Fallback(f"the model could not be built from its config ({type(e).__name__}: {e})") from None
        if not isinstance(getattr(model, "all_tied_weights_keys", None), dict) or not hasattr(model, "_get_dtype_plan"):
            raise Fallback("this transformers' model API differs from the one this reader follows")
        if model._get_dtype_plan(dtype):
            raise Fallback("keep-in-fp32 modules")
        if get_model_conversion_mapping(model, add_legacy=False):
            raise Fallback("transformers converts this model's checkpoint keys")
        targets, missing, expected = _targets(model, entries_by_file, skip, path)
        untied = missing - set(model.all_tied_weights_keys) - set(model.all_tied_weights_keys.values())
        if untied:  # before reading anything; tie_weights below settles the tied ones
            raise Fallback(f"{len(untied)} model key(s) not in the checkpoint, e.g. {sorted(untied)[:3]}")
        # from_pretrained casts to `dtype`, or to the model's own dtype for tensors it creates in another one:
        # the dtype of the tensor it replaces, built under `dtype` as the default.
        wanted = {k: expected[t].dtype for k, t in targets.items()}
        for file, entries in entries_by_file:
            for key, tensor in _read_file(file, entries, targets, wanted, use_mmap).items():
                _assign(model, targets[key], tensor)
        model.tie_weights(missing_keys=missing, recompute_mapping=False)  # removes the tied ones from `missing`
        if missing:
            raise Fallback(f"{len(missing)} model key(s) not in the checkpoint, e.g. {sorted(missing)[:3]}")
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.device.type == "meta" and not n.startswith(skip)]
        if left:
            raise Fallback(f"{len(left)} tensor(s) still empty, e.g. {left[:3]}")
        model.eval()
        _generation_config(model, path)
    except Fallback as why:
        log.debug("%s: loading with transformers' from_pretrained (%s)", path, why)
        if model is not None:
            del model
            gc.collect()  # nothing of this attempt stays in memory while from_pretrained loads
        return None
    log.debug("%s: loaded directly from %d safetensors file(s) (%s)", path, len(files),
              "memory-mapped" if use_mmap else "read")
    return model


def _assign(model, key, tensor):
    """As from_pretrained sets a loaded tensor: parameters requiring grad when floating point, buffers as they are."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._buffers:
        module._buffers[name] = tensor
    else:
        param = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        param._is_hf_initialized = True
        setattr(module, name, param)


def _generation_config(model, path: Path):
    """from_pretrained's: generation_config.json, else the generation settings of config.json."""
    if not model.can_generate():
        return
    from transformers import GenerationConfig
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(str(path), config_file_name="config.json",
                                                                   _from_model_config=True, local_files_only=True)
