"""GGUF LLM files read straight into the model, one tensor at a time (what direct_weights does for safetensors).

transformers' gguf_file= load (its GGUF loader for llama, mistral, qwen2, gemma2, phi3, ...: every architecture
outside its newer packed-block path) dequantizes every tensor of the file into one state dict and only then loads
it, while the file's memory map keeps every page it touched: its peak is the whole dequantized model plus the
whole file (1.3x the model for Q8_0, 2x for F32). Here the model is built from the file's config with its
parameters on the meta device, and each tensor of the file in turn is dequantized with gguf's own dequantize,
named and transformed by transformers' own GGUF functions (get_gguf_hf_weights_map, the architecture's
TensorProcessor: llama.cpp's q/k row order, norm offsets, ...), converted as transformers converts it
(torch.from_numpy(np.copy(weights)).to(dtype)) and set as the parameter; the file pages it came from are dropped
from this process right after (madvise DONTNEED): the peak is the model plus one tensor in flight.

The model equals transformers' tensor for tensor (tests/test_gguf.py). One difference is deliberate:
transformers marks its model as quantized (model.hf_quantizer, config.quantization_config = GgufConfig) although
its weights are dense; that marker only refuses .half()/.float() and saving, and is left out here.

load_gguf() returns None whenever it cannot be sure to give what from_pretrained(gguf_file=) gives: an
architecture transformers reads with its packed-block path, a tensor processor that sets tensors itself (MoE
experts, GPT-2's head), a tensor the model does not have in that shape, a model key the file lacks, key
conversions, keep-in-fp32 modules, another transformers than 5; the caller then uses from_pretrained.
"""
import copy
import ctypes
import gc
import logging
import mmap
import sys
from pathlib import Path

import numpy as np
import torch

from .direct_weights import PAGE, Fallback, _assign, _build, _model_class, _transformers_5
from .errors import LoadError

log = logging.getLogger(__name__)
READAHEAD = 64 * 2**20  # bytes of the file asked ahead of the pass (MADV_WILLNEED), as direct_weights does


def load_gguf(cls, path, dtype: torch.dtype):
    """cls.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True) done tensor by
    tensor, or None when this reader cannot be sure to give the same model (the reason is logged at debug).
    LoadError for a file that cannot be read, naming it."""
    try:
        return _load(cls, Path(path), dtype)
    except LoadError as e:
        message = str(e)
    # Raised out here, the error holds no frame of the failed attempt: nothing half-loaded stays in memory.
    gc.collect()
    raise LoadError(message)


def _transformers_gguf():
    """transformers' legacy GGUF pieces and gguf's reader, or Fallback."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
        from transformers import AutoConfig
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )
    except ImportError as e:
        raise Fallback(f"transformers' or gguf's GGUF functions are not those this reader follows ({e})") from None
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # transformers before its packed-block path: every architecture goes the legacy way
        def is_gguf_arch_supported(arch):
            return False
    return (GGUFReader, dequantize, AutoConfig, WeightConverter, WeightRenaming, rename_source_key, TENSOR_PROCESSORS,
            TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field, is_gguf_arch_supported)


def _load_config(AutoConfig, path: Path, dtype):
    """The config from_pretrained(gguf_file=) builds: from the file's metadata, named after the folder, in dtype."""
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                        trust_remote_code=False)
    if getattr(config, "quantization_config", None) is not None:
        raise Fallback("the config carries a quantization config")
    config.name_or_path = str(path.parent)
    config.dtype = dtype
    for sub in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = dtype
    return config


def _check_no_conversions(model, keys, get_model_conversion_mapping, WeightConverter, WeightRenaming,
                          rename_source_key):
    """from_pretrained runs the state dict it built from the file through the model's key conversions (and the
    legacy renamings): Fallback unless none of them touches a key."""
    conversions = copy.deepcopy(get_model_conversion_mapping(model))  # matching marks them used: on a copy
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    for key in keys:
        renamed, converter = rename_source_key(key, renamings, converters)
        if renamed != key or converter is not None:
            raise Fallback(f"transformers converts '{key}' after reading the file")


def _load(cls, path: Path, dtype):
    model = mapped = None
    try:
        if sys.byteorder != "little":
            raise Fallback("big-endian machine")
        get_model_conversion_mapping, no_tie_weights = _transformers_5()
        (GGUFReader, dequantize, AutoConfig, WeightConverter, WeightRenaming, rename_source_key, TENSOR_PROCESSORS,
         TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field,
         is_gguf_arch_supported) = _transformers_gguf()
        try:  # header and tensor table only: the tensor data stays on disk
            reader = GGUFReader(str(path))
            architecture = read_field(reader, "general.architecture")[0]
        except Exception as e:  # gguf raises ValueError, struct and numpy errors on damaged files
            raise LoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); it is "
                            f"truncated or corrupt. Copy it again.") from None
        if is_gguf_arch_supported(architecture):
            raise Fallback(f"transformers reads '{architecture}' with its own packed-block GGUF loader")
        try:
            config = _load_config(AutoConfig, path, dtype)
            # the processor gets the metadata's config as a dict, as transformers' own load gives it
            processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
                config=load_gguf_checkpoint(str(path), return_tensors=False)["config"])
            model = _build(_model_class(cls, config), config, dtype, no_tie_weights)
        except Fallback:
            raise
        except Exception as e:  # an unknown model type, a config the class refuses: from_pretrained says it best
            raise Fallback(f"the model could not be built from the file's config ({type(e).__name__}: {e})") from None
        if not isinstance(getattr(model, "all_tied_weights_keys", None), dict) or not hasattr(model, "_get_dtype_plan"):
            raise Fallback("this transformers' model API differs from the one this reader follows")
        if model._get_dtype_plan(dtype):
            raise Fallback("keep-in-fp32 modules")
        try:
            names = get_gguf_hf_weights_map(model, processor)  # {GGUF name: model key}, transformers' own map
        except Exception as e:  # NotImplementedError for a model type gguf-py does not know, and others
            raise Fallback(f"transformers cannot map this model's tensor names ({type(e).__name__}: {e})") from None
        expected = model.state_dict()
        _check_no_conversions(model, expected, get_model_conversion_mapping, WeightConverter, WeightRenaming,
                              rename_source_key)
        tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
        untied = {k for k in expected if k not in tied} - {names[t.name] for t in reader.tensors if t.name in names}
        if untied:  # before reading anything (a tensor processor may still rename; checked again after)
            raise Fallback(f"{len(untied)} model key(s) not in the file, e.g. {sorted(untied)[:3]}")
        mapped = _Mapped(path)
        seen = {}
        for t in sorted(reader.tensors, key=lambda t: t.data_offset):
            key, tensor = _read_tensor(mapped, t, dequantize, processor, names, dtype, path)
            if key is None:
                continue  # transformers skips what it cannot name (llama.cpp's rope_freqs, ...)
            if key in seen:
                raise Fallback(f"GGUF tensors '{seen[key]}' and '{t.name}' both give '{key}'")
            seen[key] = t.name
            if key not in expected:
                raise Fallback(f"'{t.name}' gives '{key}', which the model does not have")
            if tuple(tensor.shape) != tuple(expected[key].shape) or expected[key].dtype != dtype:
                raise Fallback(f"'{t.name}' gives {tuple(tensor.shape)} for '{key}', the model has "
                               f"{tuple(expected[key].shape)} {expected[key].dtype}")
            _assign(model, key, tensor)
            del tensor
        mapped.close()
        missing = {k for k in expected if k not in seen}
        model.tie_weights(missing_keys=missing, recompute_mapping=False)  # removes the tied ones from `missing`
        if missing:
            raise Fallback(f"{len(missing)} model key(s) not in the file, e.g. {sorted(missing)[:3]}")
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
        if left:
            raise Fallback(f"{len(left)} tensor(s) still empty, e.g. {left[:3]}")
        model.eval()
    except Fallback as why:
        log.debug("%s: loading with transformers' from_pretrained (%s)", path, why)
        if mapped is not None:
            mapped.close()
        if model is not None:
            del model
            gc.collect()  # nothing of this attempt stays in memory while from_pretrained loads
        return None
    log.debug("%s: loaded tensor by tensor from GGUF (%s)", path, architecture)
    return model


def _read_tensor(mapped, t, dequantize, processor, names, dtype, path):
    """(model key, tensor in dtype) for one GGUF tensor, with the values transformers' load_gguf_checkpoint gives
    it (dequantize, the processor, np.copy, .to(dtype)), or (None, None) for one it skips. Its file pages are
    dropped from this process as it is read.

    The processor is first asked about a zero-byte stand-in of the tensor's shape: when it hands that very array
    back, it leaves this tensor's values alone (only llama.cpp's q/k rows, norm offsets and the like are
    transformed), and the tensor is dequantized in row chunks straight into its final dtype: every ggml type
    quantizes each row by itself, so chunks give the same values as the whole, without a float32 copy of the whole
    tensor in flight. Otherwise it goes exactly transformers' way, whole."""
    side = {"tensors": {}}  # a processor that sets tensors itself (MoE experts, GPT-2's head) puts them here
    try:
        data = mapped.view(t, path)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dimensions fastest first
        stand_in = np.broadcast_to(np.float32(0), shape)
        try:
            with np.errstate(all="ignore"):
                probe = processor.process(weights=stand_in, name=t.name, tensor_key_mapping=names,
                                          parsed_parameters=side)
        except Exception:  # a processor that needs real values: ask it again with them below
            probe = None
        if side["tensors"]:
            raise Fallback(f"{type(processor).__name__} sets tensors itself ({sorted(side['tensors'])[:3]})")
        if probe is not None and probe.weights is stand_in:
            if probe.name not in names:
                return None, None
            return names[probe.name], _dequantize_rows(mapped, t, data, shape, dequantize, dtype)
        weights = dequantize(data, t.tensor_type)
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=names, parsed_parameters=side)
        del data, weights
        if side["tensors"]:
            raise Fallback(f"{type(processor).__name__} sets tensors itself ({sorted(side['tensors'])[:3]})")
        if result.name not in names:
            return None, None
        key, tensor = names[result.name], torch.from_numpy(np.copy(result.weights))  # transformers' conversion
        del result
        return key, tensor.to(dtype)
    except (Fallback, LoadError):
        raise
    except NotImplementedError:
        raise Fallback(f"gguf cannot dequantize '{t.name}' ({t.tensor_type.name})") from None
    except Exception as e:  # numpy raises many kinds on a damaged block
        raise LoadError(f"{path}: its tensor '{t.name}' could not be dequantized ({type(e).__name__}: "
                        f"{str(e)[:200]}); the file is truncated or corrupt. Copy it again.") from None
    finally:
        mapped.done(t.data_offset + int(t.n_bytes))
        _release_free_heap()


CHUNK = 2**20  # bytes of float32 values dequantized at a time: about what one tensor holds in flight, times 2-3


def _dequantize_rows(mapped, t, data, shape, dequantize, dtype):
    """The tensor dequantized CHUNK at a time into a new tensor of `shape` in `dtype` (the same cast as .to())."""
    out = torch.empty(shape, dtype=dtype)
    cols = shape[-1] if shape else 1
    rows_out = out.view(-1, cols)
    rows_in = data.reshape(rows_out.shape[0], -1)
    row_bytes = int(t.n_bytes) // max(rows_out.shape[0], 1)
    step = max(1, CHUNK // (4 * max(cols, 1)))
    for first in range(0, rows_out.shape[0], step):
        block = dequantize(rows_in[first:first + step], t.tensor_type)
        rows_out[first:first + step].copy_(torch.from_numpy(block).view(-1, cols))
        del block
        mapped.done(t.data_offset + min(first + step, rows_out.shape[0]) * row_bytes)
        _release_free_heap()  # gguf's many small temporaries per chunk fragment the heap between the weights
    return out


def _heap_trimmer():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _heap_trimmer() if sys.platform.startswith("linux") else None


def _release_free_heap():
    """Hand the heap memory freed by a tensor's temporaries back to the system. glibc keeps freed chunks that lie
    between the loaded weights (and in the arenas of torch's and numpy's worker threads) resident until trimmed: the
    temporaries of one tensor after another then add up to tens of percent of the model, measured
    (benchmarks/gguf_memory.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Mapped:
    """A private (copy-on-write: nothing reaches the file) map of the file, read in file order: readahead
    READAHEAD bytes ahead of the pass, and every whole page before the end of the tensor just read dropped from
    this process (the page cache keeps them; arrays still pointing there fault them back in from the file)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:  # private: its arrays are writable, as torch.from_numpy wants them
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.dropped = 0
        self.advised = 0

    def _advise(self, option, start, end):
        if hasattr(self.map, "madvise") and end > start:
            self.map.madvise(option, start, end - start)

    def view(self, t, path):
        """The tensor's bytes as gguf's reader shapes them (t.data: its dtype, byte order and shape), from this
        map instead of the reader's."""
        start, end = t.data_offset, t.data_offset + int(t.n_bytes)
        if end > len(self.map) or t.data.nbytes != end - start:
            raise LoadError(f"{path} is truncated: it ends inside its tensor '{t.name}'. Copy it again.")
        if end > self.advised and hasattr(mmap, "MADV_WILLNEED"):
            first = max(self.advised, start // PAGE * PAGE)
            self.advised = min(-(-max(end, first + READAHEAD) // PAGE) * PAGE, len(self.map))
            self._advise(mmap.MADV_WILLNEED, first, self.advised)
        return np.ndarray(t.data.shape, dtype=t.data.dtype, buffer=self.map, offset=start)

    def done(self, end):
        """Everything before `end` is read: drop its whole pages (the page holding `end` may start the next)."""
        upto = min(end, len(self.map)) // PAGE * PAGE
        if hasattr(mmap, "MADV_DONTNEED") and upto > self.dropped:
            self._advise(mmap.MADV_DONTNEED, self.dropped, upto)
            self.dropped = upto

    def close(self):
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # an array of an aborted read still points into it: the map goes with it
                pass
            self.map = None
