"""One command that checks every GPU target of the pack, inside a real ComfyUI booted in this process.

    python benchmarks/gpu_check.py             # full size, on a CUDA GPU (sized for ~5 minutes on an H100/H200)
    python benchmarks/gpu_check.py --tiny      # the same code at small sizes on the CPU (under 2 minutes)
    python benchmarks/gpu_check.py --prepare   # here, once: fill .gpu_check/ for a machine without internet

Models are full size from their public configs with random weights, built directly on the device (nothing is
downloaded): LLaMA-2-7B, Idefics2-8B without its perceiver (Mistral-7B + SigLIP 980 px / 14 px patches), the SDXL
base UNet, CLIP-L/G and VAE from ComfyUI's own classes, the pack's mapper and MUMU connector (16 layers, width 1024).
The pack is driven through its nodes (looked up by node id in ComfyUI's NODE_CLASS_MAPPINGS and called as the
executor calls them); the few places that reach into the pack otherwise are all in `PackParts` below.

Rows (each printed as soon as it is measured, so a timeout still leaves a table):
  LLM encode          7B bf16: LLM Text Encode node vs a bare transformers forward of the same ids   <= 30 ms (H100)
  SDXL step VRAM      peak VRAM of one SDXL sampling step right after the LLM encoded, on a card with
                      --vram-budget GiB: the LLM must have left VRAM (ComfyUI's and torch's view)     UNet alone + 5 %
  Idefics2 encode     Multimodal Prompt Encode (MUMU) node, 3 images x ~1000 tokens                   <= 250 ms (H100)
  train mapper        Train Mapper node (LLaMA-2-7B -> SDXL, CLIP teacher): steps/s, peak VRAM       completes
  train MUMU stage 2  Train MUMU node (Idefics2-8B + connector + SDXL UNet LoRAs): steps/s, peak VRAM completes
  int8 LLM, nf4 LLM   Load LLM node with bitsandbytes: packed bytes vs the pack's size hint, encode
                      time, cosine to bf16 (where bitsandbytes imports; else the reason)            hint within 2 %

ComfyUI: --comfyui DIR, else the archive comfyui-0.3.64.tar.gz (--archive FILE, .gpu_check/, ../shared/hosts/ or
shared/hosts/ beside or inside the checkout), unpacked into the scratch folder. Modules an in-process boot of
ComfyUI imports but the measured paths never call (torchvision, av, torchsde) get import-only stand-ins when they
are not installed: served only to ComfyUI's own imports, they raise if anything calls them, and the header lists
them. Wheels in .gpu_check/wheels (--prepare downloads torchsde and bitsandbytes) are unpacked into the scratch
folder and used for modules that are not installed.
"""
import argparse
import builtins
import gc
import gzip
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import types
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
ARCHIVE = "comfyui-0.3.64.tar.gz"
CARRY_DIR = PACK_DIR / ".gpu_check"  # ignored by git; --prepare fills it; carry it to the device machine
# Wheels --prepare downloads: torchsde (ComfyUI's sampler module imports it) with its one dependency, and
# bitsandbytes for the int8/nf4 rows (its wheel holds kernels for CUDA 11.8 to 13.x).
PREPARE_WHEELS = ("bitsandbytes==0.50.2", "torchsde==0.2.6", "trampoline==0.1.2")
# Absent on a bare torch + transformers machine; imported by ComfyUI at boot, never called on the measured paths.
STAND_INS = {
    "torchvision": "Stable Cascade, Cosmos and ACE model code",
    "av": "video and audio files (comfy_api)",
    "torchsde": "the Brownian tree of the SDE samplers (the check samples with euler)",
}
ROWS = ("LLM encode", "SDXL step VRAM", "Idefics2 encode", "train mapper", "train MUMU stage 2", "int8 LLM", "nf4 LLM")
PROMPT = ("a watercolor painting of a lighthouse on a cliff at sunset, seagulls over the waves, warm light, "
          "a small red boat in the harbour below")
MUMU_PROMPT = "a <image> man with his <image> dog, wearing a <image> hat, oil painting"


# ----------------------------------------------------------------------------------------------------- sizes

@dataclass
class Sizes:
    name: str
    llm: dict  # LlamaConfig fields
    idefics2_text: dict  # MistralConfig fields
    idefics2_vision: dict  # Idefics2VisionConfig fields
    image_resolution: int  # Encode (MUMU): tokens per image = (resolution / patch)^2
    connector: dict  # width, depth, heads
    full_sd: bool  # SDXL base UNet, CLIP-L/G and VAE at full size, or the tests' small ones
    image_size: int  # pixels of the sampled image and of the training pictures
    mapper_hidden: int
    captions: int
    mapper_steps: int
    mapper_batch: int
    mumu_crop_resolution: int
    mumu_steps: int
    repeats: int
    deadline_s: int


FULL = Sizes(
    name="full",
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json)
    llm={"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5},
    # Idefics2-8B (HuggingFaceM4/idefics2-8b config.json): Mistral-7B text model, SigLIP-so400m vision tower
    idefics2_text={"vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096},
    idefics2_vision={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "image_size": 980, "patch_size": 14},
    image_resolution=448,  # 32 x 32 = 1024 tokens per image
    connector={"width": 1024, "depth": 16, "heads": 16},  # MUMU
    full_sd=True, image_size=1024, mapper_hidden=512, captions=64, mapper_steps=40, mapper_batch=32,
    mumu_crop_resolution=504,  # MUMU stage 2: 36 x 36 = 1296 tokens per crop
    mumu_steps=5, repeats=20, deadline_s=480)

TINY = Sizes(
    name="tiny",
    llm={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128},
    idefics2_text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 512},
    idefics2_vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "image_size": 64, "patch_size": 4},
    image_resolution=32,  # 8 x 8 = 64 tokens per image
    connector={"width": 64, "depth": 2, "heads": 4},
    full_sd=False, image_size=64, mapper_hidden=64, captions=12, mapper_steps=10, mapper_batch=8,
    mumu_crop_resolution=16, mumu_steps=5, repeats=5, deadline_s=110)


# ------------------------------------------------------------------------------------- the pack's internals

class PackParts:
    """Every place this script reaches into the pack other than through a node. When modules move (the engine/
    layer), re-point these; everything else goes through node ids, whose inputs saved workflows depend on.

      headless.tiny_llm.build_tokenizer    a byte-level BPE tokenizer built here (nothing to download)
      headless.tiny_llm.random_mapper      a Beyond CLIP mapper with random weights ...
      loaders.mappers.host_mapper          ... as the mapper socket carries it
      headless.tiny_models                 the tests' small SDXL UNet, CLIP and VAE (--tiny)
      loaders.llm.LoadedLLM                the LLM socket's handle, around a model built on the device
      loaders.mumu.LoadedIdefics2          the Idefics2 socket's handle, likewise
      loaders.patcher.HostedModule         what the handles' patcher wraps ...
      loaders.patcher.WholeModelPatcher    ... and the patcher (loaded whole, unloaded whole)
      bridges.mumu.MUMUConnector/Config    a connector (random weights, or on the meta device) ...
      loaders.mumu.host_connector          ... as the connector socket carries it
      loaders.llm.quantized_size           the size hint the int8/nf4 loader frees memory by
    """

    def __init__(self, pack):
        self.pack = pack

    def _mod(self, name):
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def tokenizer(self, image_tokens=False):
        tokenizer = self._mod("headless.tiny_llm").build_tokenizer()
        if image_tokens:  # Idefics2's special tokens, as its tokenizer has them
            tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                        "<end_of_utterance>"]})
        return tokenizer

    def random_mapper(self, in_dim, hidden_dim):
        """A mapper handle without a file: its identity is "", which keeps it out of the encoding caches."""
        mapper = self._mod("headless.tiny_llm").random_mapper(in_dim, "sdxl", hidden_dim=hidden_dim)
        return self._mod("loaders.mappers").host_mapper(mapper)

    def _patcher(self, model):
        """The model stays where it was built (the load device): ComfyUI moves it to the offload device only
        when it needs the memory, as for a model it loaded itself."""
        import comfy.model_management as mm
        patching = self._mod("loaders.patcher")
        return patching.WholeModelPatcher(patching.HostedModule(model), load_device=mm.text_encoder_device(),
                                          offload_device=mm.text_encoder_offload_device())

    def llm_handle(self, model, tokenizer, dtype, name):
        return self._mod("loaders.llm").LoadedLLM(
            patcher=self._patcher(model), config=model.config, source=name, name=name, tokenizer=tokenizer,
            path=Path(name), dtype=dtype, hidden_size=model.config.hidden_size,
            identity="")  # no identity: the encoding caches stay out

    def idefics2_handle(self, model, tokenizer, dtype, name):
        text, vision = model.config.text_config, model.config.vision_config
        return self._mod("loaders.mumu").LoadedIdefics2(
            patcher=self._patcher(model), config=model.config, source=name, name=name, tokenizer=tokenizer,
            path=Path(name), dtype=dtype,
            hidden_size=text.hidden_size, patch_size=vision.patch_size, max_resolution=vision.image_size,
            context=text.max_position_embeddings, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
            identity="")

    def connector(self, in_dim, width, depth, heads):
        mumu = self._mod("bridges.mumu")
        return mumu.MUMUConnector(mumu.ConnectorConfig(in_dim=in_dim, width=width, depth=depth, heads=heads))

    def connector_handle(self, in_dim, width, depth, heads):
        torch.manual_seed(5)
        connector = self.connector(in_dim, width, depth, heads)
        return self._mod("loaders.mumu").host_connector(connector.eval().requires_grad_(False))

    def quantized_size_hint(self, folder, choice, compute_dtype):
        return self._mod("loaders.llm").quantized_size(Path(folder), choice, compute_dtype)

    def tiny_sd(self):
        tiny = self._mod("headless.tiny_models")
        return tiny.build_model("sdxl"), tiny.build_clip("sdxl"), tiny.build_vae()


# Node ids (NODE_CLASS_MAPPINGS keys): stable, saved workflows name them.
TEXT_ENCODE, LLM_LOADER = "BeyondCLIP_TextEncode", "BeyondCLIP_LLMLoader"
MUMU_IMAGE, MUMU_ENCODE = "BeyondCLIP_MUMUReferenceImage", "BeyondCLIP_MUMUEncode"
TRAIN_MAPPER, TRAIN_MUMU = "BeyondCLIP_TrainMapper", "BeyondCLIP_TrainMUMU"


# ------------------------------------------------------------------------------------------------ the host

class CheckError(RuntimeError):
    """The check cannot start: the message says what is missing and what to do."""


def find_archive(explicit=None) -> Path:
    candidates = [Path(explicit)] if explicit else [CARRY_DIR / ARCHIVE, PACK_DIR.parent / "shared" / "hosts" / ARCHIVE,
                                                    PACK_DIR / "shared" / "hosts" / ARCHIVE]
    for path in candidates:
        if path.is_file():
            return path
    raise CheckError(f"no ComfyUI archive: looked for {', '.join(str(c) for c in candidates)}. Give --comfyui DIR (a "
                     f"ComfyUI folder) or --archive FILE, or run --prepare where the archive is.")


def unpack_comfyui(archive: Path, dest: Path) -> Path:
    """The archive's ComfyUI/ folder unpacked under dest; its root."""
    root = dest / "ComfyUI"
    try:
        if archive.suffix == ".gz":  # a truncated tar.gz can end at a member boundary and unpack "fine" in part
            with gzip.open(archive) as stream:
                while stream.read(1 << 22):
                    pass
        with tarfile.open(archive) as tar:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, **kwargs)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        shutil.rmtree(root, ignore_errors=True)
        raise CheckError(f"{archive} could not be unpacked ({type(e).__name__}: {e}); copy the archive "
                         f"again.") from None
    if not ((root / "comfy" / "model_management.py").is_file() and (root / "execution.py").is_file()):
        raise CheckError(f"{archive} holds no ComfyUI/ folder with comfy/model_management.py and execution.py; it is "
                         f"not a ComfyUI source archive.")
    return root


def add_wheels(folder: Path, site: Path) -> list:
    """Unpack each wheel in folder whose module is not importable into site (first on sys.path): the machine's own
    packages win. Returns the wheels used."""
    used = []
    for wheel in sorted(Path(folder).glob("*.whl")) if folder and Path(folder).is_dir() else []:
        module = wheel.name.split("-")[0].lower()
        if importlib.util.find_spec(module) is not None:
            continue
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if any(n.startswith("/") or ".." in Path(n).parts for n in names):
                raise CheckError(f"{wheel} has paths outside its own folder; download it again with --prepare")
            zf.extractall(site)
        used.append(wheel.name)
    if used:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return used


class _StandInType(type):
    """A class standing for anything a stand-in module holds: attributes give more stand-ins (annotations and
    `isinstance` checks work), calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__} was called, but gpu_check put an import-only stand-in there "
                           f"({cls.__qualname__.partition('.')[0]} is not installed). This path needs the real "
                           f"package.")


def _stand_in(qualname):
    return _StandInType(qualname.rpartition(".")[2], (), {"__qualname__": qualname})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{self.__name__}.{name}")


class StandIns:
    """Import-only stand-ins for absent modules, handed to import statements in files under `root` (ComfyUI)
    only. Nothing goes into sys.modules, so every other library still sees the module as absent."""

    def __init__(self, root, names):
        self.root = str(Path(root).resolve()) + os.sep
        self.absent = {n for n in names if importlib.util.find_spec(n) is None}
        self.used = []
        self._import = None

    def install(self):
        if self.absent and self._import is None:
            self._import = builtins.__import__
            builtins.__import__ = self._hooked

    def uninstall(self):
        if self._import is not None:
            builtins.__import__ = self._import
            self._import = None

    def _hooked(self, name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and top in self.absent and str((globals or {}).get("__file__") or "").startswith(self.root):
            if top not in self.used:
                self.used.append(top)
            return _StandInModule(name if fromlist else top)
        return self._import(name, globals, locals, fromlist, level)


def load_host_module():
    spec = importlib.util.spec_from_file_location("beyond_clip_gpu_check_host", PACK_DIR / "headless" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- measuring helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def cosine(a, b):
    a, b = a.detach().float().flatten().cpu(), b.detach().float().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def load_gpu(patcher):
    """ComfyUI loads the whole model onto its device (force_full_load where the host has it)."""
    import comfy.model_management as mm
    full = {"force_full_load": True} if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters else {}
    mm.load_models_gpu([patcher], **full)


def manager_view():
    """[(what, device, bytes on its device)] for each model ComfyUI's memory manager holds loaded."""
    import comfy.model_management as mm
    out = []
    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model
        if patcher is None:
            continue
        inner = getattr(patcher.model, "inner", patcher.model)
        size = patcher.loaded_size() if hasattr(patcher, "loaded_size") else patcher.model_size()
        out.append((type(inner).__name__, str(loaded.device), size, patcher))
    return out


def describe_view(view):
    return ", ".join(f"{name} {gib(size)} on {dev}" for name, dev, size, _ in view) or "nothing loaded"


@torch.no_grad()
def fill_random(module, seed=0):
    """Random weights for modules the host allocates with torch.empty: N(0, 1/fan_in) for matrices and kernels,
    1 for norm scales, 0 for biases (activations keep their scale through the layers)."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5)
        else:
            p.fill_(0.0 if name.endswith("bias") else 1.0)


# The SDXL VAE (sd_xl_base_1.0's first_stage_model), as ComfyUI builds it.
SDXL_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                         "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                         "attn_resolutions": [], "dropout": 0.0}}


def sdxl_unet_model(mm, device):
    """The SDXL base UNet from ComfyUI's own classes (comfy.supported_models.SDXL with the base model's
    unet_config), in the dtype ComfyUI picks for it on `device`; weights allocated there with torch.empty."""
    import comfy.supported_models
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mumu_token_budget import SDXL_UNET
    base = comfy.supported_models.SDXL
    if device.type == "meta":
        dtype, manual_cast = torch.float16, None
    else:
        dtype = mm.unet_dtype(model_params=2_567_463_684, supported_dtypes=base.supported_inference_dtypes)
        manual_cast = mm.unet_manual_cast(dtype, device, base.supported_inference_dtypes)

    class Config(base):
        unet_config = dict(SDXL_UNET, dtype=dtype)  # noqa: RUF012 (ComfyUI reads it from the class)

    config = Config(dict(Config.unet_config))  # the 2024 host keeps (and extends) the dict it is given
    config.set_inference_dtype(dtype, manual_cast)
    with torch.device(device):
        return config.get_model({}, device=device)


class StepClock:
    """A ComfyUI progress hook that times a training node's steps: steps 2 .. n-1 (the first warms up, the last
    also evaluates), and the peak VRAM over that window."""

    def __init__(self, total, device):
        self.total, self.device = total, device
        self.times, self.peak, self.resident = {}, None, None

    def __call__(self, value, total, *args, **kwargs):
        if total != self.total:
            return
        sync(self.device)
        self.times[value] = time.perf_counter()
        if value == 1:
            self.resident = manager_view()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        elif value == self.total - 1 and self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)

    def steps_per_second(self):
        gaps = [self.times[v + 1] - self.times[v] for v in range(1, self.total - 1)
                if v in self.times and v + 1 in self.times]
        if not gaps:
            raise RuntimeError(f"the node reported {len(self.times)} of {self.total} training steps")
        return 1.0 / statistics.median(gaps), len(gaps)


@dataclass
class Row:
    name: str
    measured: str
    target: str
    ok: object = None  # True / False, or a string: why it is not judged ("n/a (CPU)", "SKIP: ...")
    details: list = field(default_factory=list)
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)

    @property
    def result(self):
        return "PASS" if self.ok is True else "FAIL" if self.ok is False else str(self.ok or "n/a")


class Table:
    HEAD = ("row", "measured", "target", "result", "s")

    def __init__(self, out_dir=None, about=None):
        self.rows, self.out_dir, self.about = [], out_dir, about or {}

    def header(self):
        print("| " + " | ".join(self.HEAD) + " |")
        print("|" + "|".join("---" for _ in self.HEAD) + "|", flush=True)

    def add(self, row: Row):
        self.rows.append(row)
        cells = (row.name, row.measured, row.target, row.result, f"{row.seconds:.1f}")
        print("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        for line in row.details:
            print(f"|   | {line} |  |  |  |")
        sys.stdout.flush()
        if self.out_dir:
            rows = [{**row.__dict__, "result": row.result} for row in self.rows]
            with open(Path(self.out_dir) / "gpu_check.json", "w") as f:
                json.dump({"about": self.about, "rows": rows}, f, indent=1, default=str)


# ---------------------------------------------------------------------------------------------- the check

class Check:
    def __init__(self, args, sizes: Sizes, workdir: Path):
        self.args, self.sizes, self.workdir = args, sizes, workdir
        self.started = time.perf_counter()
        self.notes = []
        self._built = {}
        self._checked_nodes = set()
        self.reference = None  # the unquantized LLM's conditioning of PROMPT (the int8/nf4 rows compare with it)

    # -- boot ------------------------------------------------------------------------------------------------
    def boot(self):
        args = self.args
        if args.comfyui:
            root, where = Path(args.comfyui).resolve(), "given"
        else:
            archive = find_archive(args.archive)
            root, where = unpack_comfyui(archive, self.workdir / "host"), f"unpacked from {archive}"
        wheels_dir = Path(args.wheels) if args.wheels else CARRY_DIR / "wheels"
        self.wheels = add_wheels(wheels_dir, self.workdir / "site")
        self.stand_ins = StandIns(root, STAND_INS)
        self.stand_ins.install()
        host_module = load_host_module()
        w = self.workdir
        self.host = host_module.Host(root=root, output_dir=w / "output", temp_dir=w / "temp", input_dir=w / "input",
                                     cpu=args.device == "cpu")
        self.host.add_models_dir(w / "models", ("LLM", "bridges", "checkpoints", "loras"))
        self.host.models_dir = w / "models"
        self.pack = self.host.load_pack(w / "custom_nodes")
        self.parts = PackParts(self.pack)
        import comfy.model_management as mm
        self.mm = mm
        self.device = mm.get_torch_device()
        if self.device.type != args.device:
            raise CheckError(f"ComfyUI chose {self.device}, not {args.device}")
        self.where = where

    def node(self, node_id, **inputs):
        """Run a node as ComfyUI's executor does: its FUNCTION with the inputs by name, under inference mode."""
        cls = self.host.nodes.NODE_CLASS_MAPPINGS[node_id]
        if node_id not in self._checked_nodes:  # once: some nodes list folders for their inputs
            missing = set(cls.INPUT_TYPES().get("required", {})) - set(inputs)
            if missing:
                raise CheckError(f"node {node_id} now requires {sorted(missing)}: update gpu_check.py")
            self._checked_nodes.add(node_id)
        with torch.inference_mode():
            out = getattr(cls(), cls.FUNCTION)(**inputs)
        return out["result"] if isinstance(out, dict) else out

    def release(self):
        """Between rows: ComfyUI unloads every model (to its offload device), memory is handed back."""
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def elapsed(self):
        return time.perf_counter() - self.started

    # -- models ----------------------------------------------------------------------------------------------
    def _hf(self, auto_cls, config, dtype, device=None):
        """A transformers model built directly on `device` (default: ComfyUI's text-encoder device) in `dtype`: no
        CPU copy, and on the meta device no memory at all."""
        import transformers
        from packaging.version import Version
        dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        with torch.device(device or self.mm.text_encoder_device()):
            try:
                model = auto_cls.from_config(config, attn_implementation="sdpa", **{dtype_arg: dtype})
            except ValueError:  # a transformers without the SDPA path for this model (Idefics2 on 4.40)
                model = auto_cls.from_config(config, attn_implementation="eager", **{dtype_arg: dtype})
        return model.eval().requires_grad_(False)

    def _dtype(self):
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def built(self, what):
        if what not in self._built:
            start = time.perf_counter()
            self._built[what] = getattr(self, "_build_" + what)()
            sync(self.device)
            self.notes.append(f"built {what} in {time.perf_counter() - start:.1f} s")
        return self._built[what]

    @staticmethod
    def _special_ids(tokenizer):
        return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}

    def _llm_config(self, sizes, tokenizer):
        from transformers import LlamaConfig
        return LlamaConfig(**{"vocab_size": len(tokenizer), **sizes.llm, **self._special_ids(tokenizer)})

    def _idefics2_config(self, sizes, tokenizer):
        from transformers import Idefics2Config
        ids = self._special_ids(tokenizer)
        text = {"model_type": "mistral", "vocab_size": len(tokenizer), **sizes.idefics2_text, **ids}
        # The perceiver is removed after the build (MUMU does not run it): a small one is built.
        perceiver = {"hidden_size": text["hidden_size"], "resampler_n_latents": 8, "resampler_depth": 1,
                     "resampler_n_heads": 2, "resampler_head_dim": 16, "num_key_value_heads": 1}
        return Idefics2Config(vision_config=sizes.idefics2_vision, text_config=text, perceiver_config=perceiver,
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **ids)

    def _idefics2_model(self, config, dtype, device=None):
        from transformers import AutoModel
        model = self._hf(AutoModel, config, dtype, device)
        model.connector.perceiver_resampler = None  # MUMU runs without it (as the pack's loader removes it)
        return model

    def _build_llm(self):
        from transformers import AutoModelForCausalLM
        tokenizer = self.parts.tokenizer()
        torch.manual_seed(0)
        model = self._hf(AutoModelForCausalLM, self._llm_config(self.sizes, tokenizer), self._dtype())
        name = "llama-2-7b (random)" if self.sizes.full_sd else "tiny llama (random)"
        return self.parts.llm_handle(model, tokenizer, self._dtype(), name)

    def _build_mapper(self):
        return self.parts.random_mapper(self.sizes.llm["hidden_size"], self.sizes.mapper_hidden)

    def _build_idefics2(self):
        tokenizer = self.parts.tokenizer(image_tokens=True)
        torch.manual_seed(1)
        model = self._idefics2_model(self._idefics2_config(self.sizes, tokenizer), self._dtype())
        name = "idefics2-8b (random)" if self.sizes.full_sd else "tiny idefics2 (random)"
        return self.parts.idefics2_handle(model, tokenizer, self._dtype(), name)

    def _build_connector(self):
        return self.parts.connector_handle(self.sizes.idefics2_text["hidden_size"], **self.sizes.connector)

    def _build_sd(self):
        """(MODEL, CLIP, VAE) for SDXL: full size from ComfyUI's classes, or the tests' small ones."""
        if not self.sizes.full_sd:
            return self.parts.tiny_sd()
        import comfy.model_patcher
        import comfy.sd
        import comfy.sdxl_clip
        from comfy.ldm.models.autoencoder import AutoencoderKL
        from comfy.supported_models_base import ClipTarget
        mm = self.mm
        model = sdxl_unet_model(mm, self.device)  # weights allocated on the GPU, filled there
        fill_random(model.diffusion_model, seed=1)
        model.to(mm.unet_offload_device())  # where a checkpoint loader leaves it until sampling
        unet = comfy.model_patcher.ModelPatcher(model, load_device=self.device, offload_device=mm.unet_offload_device())
        with torch.no_grad():  # the 2024 host writes into the text projection in place
            clip = comfy.sd.CLIP(ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel))
        load_gpu(clip.patcher)
        fill_random(clip.cond_stage_model, seed=2)
        with torch.device(self.device):
            autoencoder = AutoencoderKL(**SDXL_VAE)
        fill_random(autoencoder, seed=3)
        vae = comfy.sd.VAE(sd={k: v.cpu() for k, v in autoencoder.state_dict().items()}, config={"params": SDXL_VAE})
        del autoencoder
        return unet, clip, vae

    def plan(self):
        """The full-size models built on the meta device (no memory, no time): their public configs are checked
        wherever this runs, --tiny included. Returns {what: parameters} and prints the memory plan."""
        from transformers import AutoModelForCausalLM
        meta = torch.device("meta")

        def count(module):
            return sum(p.numel() for p in module.parameters())

        llm = self._hf(AutoModelForCausalLM, self._llm_config(FULL, self.parts.tokenizer()), torch.bfloat16, meta)
        vlm = self._idefics2_model(self._idefics2_config(FULL, self.parts.tokenizer(image_tokens=True)),
                                   torch.bfloat16, meta)
        unet = sdxl_unet_model(self.mm, meta).diffusion_model
        with torch.device(meta):
            connector = self.parts.connector(FULL.idefics2_text["hidden_size"], **FULL.connector)
        mapper = self.parts.random_mapper(FULL.llm["hidden_size"], FULL.mapper_hidden).inner
        plan = {"llama-2-7b": count(llm), "idefics2-8b without perceiver": count(vlm),
                "idefics2 vision tower": count(vlm.vision_model), "sdxl unet": count(unet),
                "mumu connector": count(connector), "mapper": count(mapper)}
        llm_bytes, unet_bytes = plan["llama-2-7b"] * 2, plan["sdxl unet"] * 2
        budget = self.args.vram_budget * 2 ** 30
        print("full-size models, built on the meta device (their configs checked, no memory used):")
        print(f"  LLaMA-2-7B {plan['llama-2-7b'] / 1e9:.2f} B parameters ({gib(llm_bytes)} bf16); Idefics2-8B "
              f"without perceiver {plan['idefics2-8b without perceiver'] / 1e9:.2f} B (vision tower "
              f"{plan['idefics2 vision tower'] / 1e9:.2f} B); SDXL UNet {plan['sdxl unet'] / 1e9:.2f} B "
              f"({gib(unet_bytes)} fp16); MUMU connector {plan['mumu connector'] / 1e6:.0f} M; mapper "
              f"{plan['mapper'] / 1e6:.1f} M")
        verdict = ("the LLM has to leave" if llm_bytes + unet_bytes > budget else
                   "both fit: lower --vram-budget, or the row checks nothing")
        print(f"  SDXL step VRAM row: a {gib(budget)} card; the LLM and the UNet take {gib(llm_bytes + unet_bytes)} "
              f"together, so {verdict}")
        return plan

    # -- rows ------------------------------------------------------------------------------------------------
    def encode(self, llm, prompt=PROMPT):
        positive, _ = self.node(TEXT_ENCODE, llm=llm, mapper=self.built("mapper"), prompt=prompt, negative_prompt="",
                                negative="zeros", hidden_layer=-1, template="none", cache_to_disk=False)
        return positive

    def row_llm_encode(self):
        llm, mapper, dev = self.built("llm"), self.built("mapper"), self.device
        tokenizer = llm.tokenizer
        ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=True)["input_ids"]
        last = ids.shape[1] - 1
        ids = torch.cat([ids, torch.full((1, 77 - ids.shape[1]), tokenizer.pad_token_id)], dim=1).to(dev)
        model = llm.inner
        decoder = model.get_decoder()  # hidden states only, as the node computes them

        def bare():
            with torch.inference_mode():
                out = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                              use_cache=False)
            sync(dev)
            return out.hidden_states[-1]

        def node():
            cond = self.encode(llm)
            sync(dev)
            return cond

        bare_ms, node_ms = [], []
        for i in range(self.sizes.repeats + 2):  # back to back pairs; the first two warm up
            for fn, times in ((bare, bare_ms), (node, node_ms)):
                start = time.perf_counter()
                result = fn()
                if i >= 2:
                    times.append((time.perf_counter() - start) * 1e3)
                if fn is node:
                    self.reference = result[0][0].cpu()
        with torch.inference_mode():
            tokens, _ = mapper.module()(bare().float(), last)
        same = cosine(tokens, self.reference)
        b, n = statistics.median(bare_ms), statistics.median(node_ms)
        params = sum(p.numel() for p in model.parameters())
        params = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
        full = self._judged()
        return Row("LLM encode", f"{params} {str(llm.dtype).split('.')[-1]}: node {n:.1f} ms/prompt, bare "
                   f"forward {b:.1f} ms ({n / b:.2f}x)", "node <= 30 ms on an H100",
                   (n <= 30.0) if full else full_reason(self),
                   [(f"77 tokens, median of {len(node_ms)} back-to-back pairs; node output vs mapper(bare hidden "
                     f"states): cosine {same:.6f}")],
                   numbers={"node_ms": n, "bare_ms": b, "cosine_same": same})

    def row_sdxl_vram(self):
        unet, _, _ = self.built("sd")
        llm, dev, mm = self.built("llm"), self.device, self.mm
        budget = int(self.args.vram_budget * 2 ** 30)
        ballast = None
        if dev.type == "cuda":
            # A card with `budget` bytes: what is allocated now plus what ComfyUI sees as free.
            extra = mm.get_free_memory(dev) - (budget - torch.cuda.memory_allocated(dev))
            if extra > 0:
                ballast = torch.empty(int(extra), dtype=torch.uint8, device=dev)
        ballast_bytes = ballast.numel() if ballast is not None else 0
        size = self.sizes.image_size
        (latent,) = self.node("EmptyLatentImage", width=size, height=size, batch_size=1)
        seen = {}

        def before_step(module, args):
            sync(dev)
            seen.setdefault("view", manager_view())
            if dev.type == "cuda":
                seen.setdefault("start", torch.cuda.memory_allocated(dev) - ballast_bytes)
                torch.cuda.reset_peak_memory_stats(dev)

        def after_step(module, args, output):
            if dev.type == "cuda":
                sync(dev)
                seen["peak"] = max(seen.get("peak", 0), torch.cuda.max_memory_allocated(dev) - ballast_bytes)

        def sample(positive, negative):
            seen.clear()
            diffusion = unet.model.diffusion_model
            hooks = [diffusion.register_forward_pre_hook(before_step), diffusion.register_forward_hook(after_step)]
            try:
                self.node("KSampler", model=unet, seed=0, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal",
                          positive=positive, negative=negative, latent_image=latent, denoise=1.0)
            finally:
                for h in hooks:
                    h.remove()
            return dict(seen)

        try:
            positive, negative = self.node(TEXT_ENCODE, llm=llm, mapper=self.built("mapper"), prompt=PROMPT,
                                           negative_prompt="", negative="zeros", hidden_layer=-1, template="none",
                                           cache_to_disk=False)
            before = manager_view()
            llm_before = sum(s for _, _, s, p in before if p is llm.patcher)
            after_llm = sample(positive, negative)
            llm_during = sum(s for _, _, s, p in after_llm["view"] if p is llm.patcher)
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()
            alone = sample(positive, negative)
        finally:
            del ballast
            gc.collect()
        unet_bytes = unet.model_size()
        details = [f"card: {gib(budget)} (ballast {gib(ballast_bytes)})" if dev.type == "cuda" else
                   "CPU: ComfyUI keeps models in RAM, nothing needs to leave",
                   f"ComfyUI before sampling: {describe_view(before)}",
                   f"ComfyUI during the step: {describe_view(after_llm['view'])}",
                   f"ComfyUI during the step, UNet alone: {describe_view(alone['view'])}"]
        numbers = {"llm_loaded_during_step_bytes": llm_during, "llm_loaded_before_bytes": llm_before,
                   "unet_bytes": unet_bytes}
        if dev.type != "cuda":
            return Row("SDXL step VRAM", f"LLM {gib(llm_before)} loaded before, {gib(llm_during)} during the step; "
                       f"UNet {gib(unet_bytes)}", "UNet alone + 5 %; LLM left VRAM", "n/a (CPU)", details,
                       numbers=numbers)
        ratio = after_llm["peak"] / alone["peak"]
        details.insert(1, f"torch: allocated at step start {gib(after_llm['start'])} after the LLM, "
                          f"{gib(alone['start'])} alone")
        numbers.update(peak_after_llm=after_llm["peak"], peak_alone=alone["peak"], ratio=ratio)
        return Row("SDXL step VRAM", f"step peak {gib(after_llm['peak'])} after the LLM vs {gib(alone['peak'])} UNet "
                   f"alone ({(ratio - 1) * 100:+.1f} %); LLM {gib(llm_before)} before, {gib(llm_during)} during the "
                   f"step", "UNet alone + 5 %; LLM left VRAM", ratio <= 1.05 and llm_during == 0 and llm_before > 0,
                   details, numbers=numbers)

    def row_idefics2(self):
        vlm, connector, dev = self.built("idefics2"), self.built("connector"), self.device
        images = None
        g = torch.Generator().manual_seed(0)
        side = 512 if self.sizes.full_sd else 48
        for _ in range(3):
            (images,) = self.node(MUMU_IMAGE, image=torch.rand(1, side, side, 3, generator=g), name="", images=images)
        size = self.sizes.image_size
        times = []
        for i in range(max(3, self.sizes.repeats // 2) + 1):
            start = time.perf_counter()
            positive, _ = self.node(MUMU_ENCODE, idefics2=vlm, connector=connector, prompt=MUMU_PROMPT,
                                    negative_prompt="", negative="zeros", image_resolution=self.sizes.image_resolution,
                                    token_budget=0, width=size, height=size, target_width=size, target_height=size,
                                    images=images, cache_to_disk=False)
            sync(dev)
            if i:
                times.append((time.perf_counter() - start) * 1e3)
        per_image = (self.sizes.image_resolution // vlm.patch_size) ** 2
        total = positive[0][0].shape[1]
        ms = statistics.median(times)
        return Row("Idefics2 encode", f"3 x {per_image} image + {total - 3 * per_image} text tokens = {total}: "
                   f"{ms:.1f} ms/prompt", "<= 250 ms on an H100", (ms <= 250.0) if self._judged() else
                   full_reason(self), [f"median of {len(times)} encodes (Idefics2 + connector, negative zeros)"],
                   numbers={"ms": ms, "tokens": total})

    def _train_row(self, name, steps, run):
        """Runs a training node with a StepClock on ComfyUI's progress bar; the row from its steps."""
        import comfy.utils
        clock = StepClock(steps, self.device)
        previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(clock)
        try:
            val_loss, what = run()
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)
        rate, n = clock.steps_per_second()
        peak = f", peak VRAM {gib(clock.peak)}" if clock.peak is not None else ""
        finite = math.isfinite(val_loss)
        return Row(name, f"{rate:.2f} steps/s{peak}; val loss {val_loss:.4g}", "completes, finite loss", finite,
                   [what, f"median of {n} steps; resident while training: {describe_view(clock.resident or [])}"],
                   numbers={"steps_per_s": rate, "peak_bytes": clock.peak, "val_loss": val_loss})

    def row_train_mapper(self):
        llm, (_, clip, _) = self.built("llm"), self.built("sd")
        words = ("red", "blue", "old", "small", "giant", "quiet", "golden", "misty")
        things = ("fox", "lighthouse", "castle", "bowl of fruit", "city street", "mountain lake", "sailing boat", "cat")
        captions = [f"a {words[i % 8]} {things[(i // 8) % 8]} in the style of painting number {i}"
                    for i in range(self.sizes.captions)]
        input_dir = Path(self.host.folder_paths.get_input_directory())
        (input_dir / "gpu_check_captions.txt").write_text("\n".join(captions) + "\n")
        steps, batch = self.sizes.mapper_steps, self.sizes.mapper_batch

        def run():
            _, _, val = self.node(TRAIN_MAPPER, llm=llm, clip=clip, captions="gpu_check_captions.txt",
                                  run_name="gpu_check_mapper", output_name="gpu_check_mapper", steps=steps,
                                  batch_size=batch, learning_rate=1e-3, loss="mse", hidden_dim=self.sizes.mapper_hidden,
                                  depth=2, activation="gelu", hidden_layer=-1, template="none", val_fraction=0.1,
                                  seed=0, resume=False, checkpoint_every=10 ** 6, eval_every=10 ** 6,
                                  cache_precision="fp32")
            return val, (f"{llm.hidden_size} -> SDXL (77 x 2048 + pooled 1280), hidden {self.sizes.mapper_hidden}, "
                         f"batch {batch}, {len(captions)} captions cached through the LLM and CLIP teacher")

        return self._train_row("train mapper", steps, run)

    def row_train_mumu(self):
        from PIL import Image
        vlm, connector, (unet, _, vae) = self.built("idefics2"), self.built("connector"), self.built("sd")
        input_dir = Path(self.host.folder_paths.get_input_directory())
        folder = input_dir / "gpu_check_pictures"
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1)

        def picture(name, side):
            pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name)
            return f"gpu_check_pictures/{name}"

        lines = []
        for i in range(2):
            crops = [picture(f"crop{i}{c}.png", self.sizes.mumu_crop_resolution * 2) for c in "ab"]
            lines.append("\t".join([picture(f"picture{i}.png", self.sizes.image_size),
                                    "a <image> man with a <image> dog in a garden"] + crops))
        (input_dir / "gpu_check_pairs.tsv").write_text("\n".join(lines) + "\n")
        steps = self.sizes.mumu_steps
        per_crop = (self.sizes.mumu_crop_resolution // vlm.patch_size) ** 2

        def run():
            *_, val = self.node(TRAIN_MUMU, idefics2=vlm, connector=connector, model=unet, vae=vae,
                                pairs="gpu_check_pairs.tsv", run_name="gpu_check_mumu", output_name="gpu_check_mumu",
                                steps=steps, batch_size=1, connector_lr=1e-5, idefics2_lora_lr=3e-6, unet_lora_lr=5e-6,
                                rank=8, resolution=self.sizes.image_size,
                                image_resolution=self.sizes.mumu_crop_resolution, val_fraction=0.0, seed=0,
                                resume=False, checkpoint_every=10 ** 6, eval_every=10 ** 6)
            return val, (f"connector {self.sizes.connector['depth']} x {self.sizes.connector['width']} + rank-8 LoRAs "
                         f"on Idefics2 and the UNet; 1 picture of {self.sizes.image_size} px with 2 crops x "
                         f"{per_crop} tokens per step")

        return self._train_row("train MUMU stage 2", steps, run)

    def _llm_folder(self):
        """The bf16 LLM written as a Hugging Face folder in models/LLM (bitsandbytes quantizes while loading)."""
        folder = self.host.models_dir / "LLM" / "gpu-check-llm"
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            llm = self.built("llm")
            llm.inner.save_pretrained(str(folder), safe_serialization=True)
            llm.tokenizer.save_pretrained(str(folder))
            self.notes.append(f"wrote the bf16 LLM folder in {time.perf_counter() - start:.1f} s")
        return folder

    def row_quantized(self, name, choice):
        problem = bitsandbytes_problem()
        if problem:
            return Row(name, "not measured", "hint within 2 %", f"SKIP: {problem}")
        if self.reference is None:
            self.reference = self.encode(self.built("llm"))[0][0].cpu()
        folder = self._llm_folder()
        self.release()
        start = time.perf_counter()
        try:
            (llm,) = self.node(LLM_LOADER, llm_name=folder.name, dtype=choice)
        except Exception as e:  # the pack's LoadError says why bitsandbytes cannot run here
            if type(e).__name__ != "LoadError":
                raise
            return Row(name, "not measured", "hint within 2 %", f"SKIP: {e}")
        load_s = time.perf_counter() - start
        packed = llm.patcher.model_size()
        hint = self.parts.quantized_size_hint(folder, choice, llm.dtype)
        times, cond = [], None
        for i in range(self.sizes.repeats // 2 + 2):
            start = time.perf_counter()
            cond = self.encode(llm)
            sync(self.device)
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        cos = cosine(cond[0][0], self.reference)
        off = abs(hint - packed) / packed
        del llm, cond
        gc.collect()
        unquantized = str(self._dtype()).split(".")[-1]
        return Row(name, f"packed {gib(packed)}, hint {gib(hint)} ({off * 100:.1f} % off); encode {ms:.1f} ms; "
                   f"cosine to {unquantized} {cos:.4f}", "hint within 2 %", off <= 0.02,
                   [(f"Load LLM node {load_s:.1f} s (reads the folder, quantizes on {self.device}); compute "
                     f"{unquantized}; weights are random, so the cosine is a sanity check")],
                   numbers={"packed": packed, "hint": hint, "ms": ms, "cosine": cos})

    def _judged(self):
        """Speed targets are for a full-size run on a GPU."""
        return self.sizes.full_sd and self.device.type == "cuda"

    def rows(self):
        return [("LLM encode", self.row_llm_encode, 30), ("SDXL step VRAM", self.row_sdxl_vram, 60),
                ("Idefics2 encode", self.row_idefics2, 40), ("train mapper", self.row_train_mapper, 40),
                ("train MUMU stage 2", self.row_train_mumu, 60),
                ("int8 LLM", lambda: self.row_quantized("int8 LLM", "int8 (bitsandbytes)"), 90),
                ("nf4 LLM", lambda: self.row_quantized("nf4 LLM", "nf4 (bitsandbytes)"), 60)]


def full_reason(check):
    return "n/a (tiny)" if not check.sizes.full_sd else "n/a (CPU)"


def bitsandbytes_problem():
    """"" when bitsandbytes imports, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 (bitsandbytes fails with many kinds where it cannot run)
        return f"bitsandbytes does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return ""


# -------------------------------------------------------------------------------------------------- prepare

def prepare(args):
    """Here, with the package index: copy the ComfyUI archive and download the wheels into .gpu_check/."""
    CARRY_DIR.mkdir(exist_ok=True)
    archive = find_archive(args.archive)
    if archive != CARRY_DIR / ARCHIVE:
        shutil.copyfile(archive, CARRY_DIR / ARCHIVE)
    wheels = CARRY_DIR / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--platform", "manylinux_2_24_x86_64",
                    "-d", str(wheels), *PREPARE_WHEELS], check=True)
    total = sum(f.stat().st_size for f in CARRY_DIR.rglob("*") if f.is_file())
    for f in sorted(CARRY_DIR.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(PACK_DIR)}  {f.stat().st_size / 2 ** 20:.1f} MiB")
    print(f"{CARRY_DIR.relative_to(PACK_DIR)}: {total / 2 ** 20:.1f} MiB in all. On the GPU machine, with this folder "
          f"carried beside the checkout's files:\n  python3 benchmarks/gpu_check.py --out OUTDIR")


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU (the test runs this)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda, or cpu with --tiny")
    parser.add_argument("--comfyui", help="a ComfyUI folder to boot (else the archive is unpacked)")
    parser.add_argument("--archive", help=f"the {ARCHIVE} to unpack")
    parser.add_argument("--wheels", help=f"a folder of wheels for modules that are not installed (default "
                                         f"{CARRY_DIR.name}/wheels)")
    parser.add_argument("--vram-budget", type=float, default=16.0,
                        help="GiB of the card the SDXL VRAM row pretends to have (the rest is held by a ballast "
                             "tensor), so the LLM and the UNet do not fit together")
    parser.add_argument("--only", help="comma-separated row names to run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --tiny on the CPU, where "
                                                    "the models are too small to share)")
    parser.add_argument("--deadline", type=float, help="seconds; rows that would start later are skipped")
    parser.add_argument("--workdir", help="scratch folder (default: a new temp folder, removed at the end)")
    parser.add_argument("--out", help="also write gpu_check.json (every row, as it completes) here")
    parser.add_argument("--prepare", action="store_true", help="fill .gpu_check/ (archive + wheels) and stop")
    parser.add_argument("--python-version", default="3.12", help="for --prepare: the GPU machine's Python")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args)
    sizes = TINY if args.tiny else FULL
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    # Nothing is fetched from a hub, whatever a library would like to check.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.tiny:  # ComfyUI's memory manager says what it loads and unloads: kept in the stderr log
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckError("no CUDA device here: run with --tiny for the CPU version")
    if args.threads or (args.tiny and args.device == "cpu"):
        torch.set_num_threads(args.threads or 1)
    deadline = args.deadline or sizes.deadline_s
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="beyond-clip-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    check = Check(args, sizes, workdir)
    try:
        check.boot()
        print_header(check, sizes)
        plan = check.plan()
        print(flush=True)
        table = Table(args.out, {"sizes": sizes.name, "device": str(check.device), "comfyui": check.host.version,
                                 "stand_ins": check.stand_ins.used, "wheels": check.wheels, "plan": plan})
        table.header()
        only = {s.strip() for s in args.only.split(",")} if args.only else None
        for name, run, estimate in check.rows():
            if only and name not in only:
                continue
            start = time.perf_counter()
            if check.elapsed() + (estimate if sizes.full_sd else 5) > deadline:
                row = Row(name, "not measured", "", f"SKIP: {check.elapsed():.0f} s used of the {deadline:.0f} s "
                          f"deadline")
            else:
                try:
                    check.notes.clear()
                    row = run()
                    row.details += check.notes
                except Exception as e:  # noqa: BLE001 (one row's failure must leave the others' numbers)
                    traceback.print_exc()
                    row = Row(name, "not measured", "", f"ERROR: {type(e).__name__}: {str(e)[:300]}")
                finally:
                    check.release()
            row.seconds = time.perf_counter() - start
            table.add(row)
        if check.stand_ins.used:
            print(f"\nstand-ins used (import-only): {', '.join(check.stand_ins.used)}")
        print(f"total {check.elapsed():.1f} s", flush=True)
        return 1 if any(r.result.startswith("ERROR") for r in table.rows) else 0
    finally:
        check.__dict__.get("stand_ins") and check.stand_ins.uninstall()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def print_header(check, sizes):
    import transformers
    dev = check.device
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name} ({gib(props.total_memory)})"
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"Beyond CLIP GPU check ({sizes.name}): {where}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {sys.version.split()[0]}")
    print(f"ComfyUI {check.host.version} ({check.where}); booted in {check.elapsed():.1f} s")
    stand = ", ".join(f"{n} ({STAND_INS[n]})" for n in check.stand_ins.used) or "none"
    print(f"stand-ins (not installed, import-only, raise if called): {stand}")
    print(f"wheels unpacked: {', '.join(check.wheels) or 'none'}; bitsandbytes: {bitsandbytes_problem() or 'imports'}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as e:
        sys.exit(f"gpu_check: {e}")
