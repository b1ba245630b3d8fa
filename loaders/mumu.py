"""MUMU files.

- Idefics2: a Hugging Face folder in models/LLM (config.json with model_type 'idefics2', weights, tokenizer and
  processor files), loaded offline as transformers' Idefics2Model (no LM head) with the perceiver dropped.
- Connector: models/bridges/*.safetensors in the pack's format, kind 'mumu_connector' (config = depth, width,
  heads, the Idefics2 width it reads and the hidden layer it was trained on).
- Idefics2 LoRA: a peft folder (adapter_config.json + adapter_model.safetensors) in models/LLM, read without
  peft; merged as ComfyUI weight patches or run beside the layers.
- SDXL UNet LoRA: written in kohya's SDXL key format (lora_unet_<ldm path>.lora_down/lora_up/alpha), which
  ComfyUI's stock LoraLoader / LoraLoaderModelOnly read on every host, so it stacks on any SDXL fine-tune.
"""
import gc
import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch
from safetensors.torch import save_file
from transformers import AutoProcessor, Idefics2Model

from ..bridges import mumu as mumu_bridge
from . import direct_weights, folders
from . import patcher as patching
from .bridge_files import (
    check_layer_counts,
    checked_build,
    load_state_into,
    read_bridge,
    save_bridge,
    writable_path,
)
from .encode_cache import file_identity
from .errors import InputError, LoadError
from .handles import Handle, shared
from .llm import (
    check_folder,
    choose_dtype,
    from_pretrained,
    quiet_loggers,
    tokenizer_failure,
    weights_failure,
)
from .peft_lora import (
    PEFT_CONFIG,  # noqa: F401  (nodes/mumu.py reads it here)
    check_writable,
    read_peft_lora,
    save_peft_lora,
    scale_for,
)

KIND = "mumu_connector"
LORA_MODES = ("merged", "unmerged")
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ Idefics2

@dataclass(eq=False)
class LoadedIdefics2(Handle):
    """What the MUMU VLM socket carries. `lora` is an AppliedLoRA when one is applied."""
    tokenizer: object = None
    path: Path = None
    dtype: torch.dtype = torch.float32
    hidden_size: int = 0  # text model width: what the connector reads
    patch_size: int = 14
    max_resolution: int = 0  # the vision tower's native image size; larger inputs would reuse positions
    context: int = 0
    image_mean: tuple = ()
    image_std: tuple = ()
    lora: object = None
    base: "LoadedIdefics2" = field(default=None, repr=False)
    what = "Idefics2"

    def with_lora(self, patcher, lora) -> "LoadedIdefics2":
        source = lora.lora.source  # its files as they are now, just after they were read
        identity = (f"{self.identity}+lora:{file_identity(source)}:{lora.strength}:{lora.mode}"
                    if self.identity and source else "")
        return replace(self, patcher=patcher, lora=lora, base=self.base or self, identity=identity)

    def attach(self, model):
        return self.lora.attach(model) if self.lora is not None else nullcontext()

    def describe(self) -> str:
        extra = f" + {self.lora.describe()}" if self.lora else ""
        return f"Idefics2 '{self.name}'{extra}"


def _check_processor(path: Path, processor, config: dict):
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise LoadError(f"{path}: its processor has no tokenizer or image processor. Copy the processor files "
                        f"(preprocessor_config.json / processor_config.json, tokenizer files) of the Idefics2 release.")
    for token in (mumu_bridge.IMAGE_TOKEN, mumu_bridge.FAKE_TOKEN):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise LoadError(f"{path}: the tokenizer has no {token} token, so it is not Idefics2's tokenizer. Copy "
                            f"the tokenizer files of this exact model.")
    image_id = tokenizer.convert_tokens_to_ids(mumu_bridge.IMAGE_TOKEN)
    if config.get("image_token_id", image_id) != image_id:
        raise LoadError(f"{path}: config.json says the image token is id {config.get('image_token_id')} but the "
                        f"tokenizer gives {mumu_bridge.IMAGE_TOKEN} id {image_id}; the tokenizer and the weights do "
                        f"not belong together.")
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise LoadError(f"{path}: the image processor has no 3-channel image_mean/image_std; copy its "
                        f"preprocessor_config.json from the Idefics2 release.")
    return tokenizer, tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _load_weights(cls, path, dtype):
    """(model, loading info) offline; the info names missing weights, which loaders.llm's helper does not return.
    Read directly when loaders.direct_weights can (then without the LM head and the perceiver, which MUMU does
    not use: the perceiver's parameters stay on the meta device until load_idefics2 removes it)."""
    model = direct_weights.load_pretrained(cls, path, dtype, skip=("lm_head.", "connector.perceiver_resampler."))
    if model is not None:
        return model, {"missing_keys": []}
    return from_pretrained(cls, path, dtype, output_loading_info=True)


def load_idefics2(name: str, path: Path, dtype_choice: str = "auto", progress=None) -> LoadedIdefics2:
    """Idefics2Model + tokenizer + image normalisation, offline; the perceiver is removed (MUMU does not use
    it). progress(step) after each of 4 steps."""
    config = check_folder(path)
    if config.get("model_type") != "idefics2":
        kind = config.get("model_type", "unknown")
        raise LoadError(f"{path} holds a '{kind}' model, not Idefics2 (model_type 'idefics2', e.g. "
                        f"HuggingFaceM4/idefics2-8b). MUMU reads Idefics2's vision tower and projection without "
                        f"the perceiver; other VLMs (Idefics3, LLaVA, ...) differ. Choose an Idefics2 folder.")
    device = mm.text_encoder_device()
    dtype = choose_dtype(dtype_choice, device)
    key = ("idefics2", str(path.resolve()), dtype, file_identity(path))
    return shared(key, lambda: _load(name, path, dtype, config, progress))


def _load(name, path, dtype, config, progress) -> LoadedIdefics2:
    progress and progress(1)
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds here
        raise LoadError(tokenizer_failure(path, e).replace("the tokenizer in", "the Idefics2 processor in") +
                        " (the processor and tokenizer files of the release)") from None
    tokenizer, mean, std = _check_processor(path, processor, config)
    progress and progress(2)
    model = None
    try:
        # transformers warns about the LM head we do not load (a table in v5); missing weights are checked below.
        with quiet_loggers("transformers.modeling_utils", "transformers.utils.loading_report"):
            model, info = _load_weights(Idefics2Model, path, dtype)
    except LoadError:
        raise
    except Exception as e:  # transformers and safetensors raise many kinds here
        raise LoadError(weights_failure(path, config, e, Idefics2Model)) from None
    finally:
        if model is None:
            gc.collect()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        del model
        gc.collect()  # nothing half-loaded stays in memory
        raise LoadError(f"{path}: the weight files lack {len(missing)} tensor(s) of the Idefics2 model, e.g. "
                        f"{missing[:3]}. The folder is incomplete; copy every weight shard.")
    model.connector.perceiver_resampler = None  # MUMU's change: one token per patch, no resampling
    model.eval().requires_grad_(False)
    progress and progress(3)
    text, vision = model.config.text_config, model.config.vision_config
    vlm = LoadedIdefics2(patcher=patching.wrap(model), config=model.config, source=str(path), name=name,
                         tokenizer=tokenizer, path=path, dtype=dtype, hidden_size=int(text.hidden_size),
                         patch_size=int(vision.patch_size), max_resolution=int(vision.image_size),
                         context=int(text.max_position_embeddings), image_mean=mean, image_std=std,
                         identity=f"{file_identity(path)}:{dtype}")
    progress and progress(4)
    return vlm


def grid_for(vlm: LoadedIdefics2, resolution: int):
    """(grid, resolution actually used): the image is resized to grid*patch pixels, grid^2 tokens."""
    grid = resolution // vlm.patch_size
    if grid < 1:
        raise InputError(f"image_resolution {resolution} is smaller than one {vlm.patch_size}-pixel patch of "
                         f"{vlm.describe()}; use at least {vlm.patch_size}")
    if grid * vlm.patch_size > vlm.max_resolution:
        raise InputError(f"image_resolution {resolution} is above the {vlm.max_resolution} pixels {vlm.describe()}'s "
                         f"vision tower was made for; use at most {vlm.max_resolution}")
    if grid * vlm.patch_size != resolution:
        log.info("MUMU: image_resolution %d is not a multiple of the %d-pixel patch; using %d (%d tokens per image)",
                 resolution, vlm.patch_size, grid * vlm.patch_size, grid * grid)
    return grid, grid * vlm.patch_size


# ----------------------------------------------------------------------------------------------- connector

def save_connector(path, connector: mumu_bridge.MUMUConnector):
    save_bridge(path, KIND, connector.config.to_dict(), connector.state_dict())


@dataclass(eq=False)
class LoadedConnector(Handle):
    """A MUMU connector under ComfyUI's memory manager (16 layers of width 1024 is ~0.2 B parameters)."""
    what = "MUMU connector"


def load_connector(path) -> LoadedConnector:
    config, state_dict = read_bridge(path, KIND)
    try:
        connector_config = mumu_bridge.ConnectorConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: its MUMU connector config is not valid ({e}). Write the file again.") from None
    # Every size the config claims is checked against the tensors before anything is allocated.
    check_layer_counts({"depth": (connector_config.depth, "layers.")}, state_dict, path, "MUMU connector")
    checked_build(lambda: mumu_bridge.MUMUConnector(connector_config), state_dict, path, "MUMU connector")
    # Built on the CPU and filled (not assigned the file's memory-mapped tensors, as the mapper is): the connector's
    # pictures are kept byte-identical to those of earlier versions, and matrix kernels can round differently on
    # differently aligned memory.
    connector = mumu_bridge.MUMUConnector(connector_config)
    load_state_into(connector, state_dict, path, "MUMU connector")
    return host_connector(connector.eval().requires_grad_(False), path)


def host_connector(connector: mumu_bridge.MUMUConnector, path=None) -> LoadedConnector:
    """A connector module as a handle; from a file (`path`) it carries the file's identity, else none (no caching)."""
    return LoadedConnector(patcher=patching.wrap(connector), config=connector.config,
                           source=str(path) if path else "", identity=file_identity(path) if path else "",
                           name=Path(path).name if path else "")


def check_connector_fits(vlm: LoadedIdefics2, connector: LoadedConnector):
    if connector.config.in_dim != vlm.hidden_size:
        raise LoadError(f"{connector.describe()} reads {connector.config.in_dim}-wide Idefics2 hidden states, but "
                        f"{vlm.describe()} produces {vlm.hidden_size}. Use a connector trained for this Idefics2.")


# ---------------------------------------------------------------------------------- Idefics2 LoRA (peft)

@dataclass
class PeftLoRA:
    factors: dict  # module path in Idefics2Model -> mumu_bridge.LoRAFactor
    source: str
    rank: int


IDEFICS2_LORA_KIND = "mumu_idefics2_lora"
UNET_LORA_KIND = "mumu_unet_lora"


def _check_lora_folder_writable(folder: Path):
    """A peft folder may be replaced only when it is absent or one this pack wrote."""
    check_writable(folder, IDEFICS2_LORA_KIND)


def stage2_output_paths(output_name: str) -> dict:
    """Where MUMU stage 2 writes, each listed by its loader at once: the connector in models/bridges, the Idefics2
    LoRA as a peft folder in models/LLM, the UNet LoRA in models/loras. Files of others are never replaced."""
    name = folders.check_output_name(output_name, "output name")
    paths = {"connector": folders.bridge_output_path(name, kind=KIND),
             "idefics2_lora": Path(folder_paths.get_folder_paths(folders.LLM)[0]) / f"{name}-idefics2-lora",
             "unet_lora": Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}-unet-lora.safetensors"}
    writable_path(paths["unet_lora"], UNET_LORA_KIND)
    _check_lora_folder_writable(paths["idefics2_lora"])
    return paths


def save_idefics2_lora(folder: Path, factors: dict, alpha: float, base_model: str = ""):
    """A peft LoRA folder (peft's key names for a LoRA on Idefics2Model) from factors {module path: (down A (r, in),
    up B (out, r))}: peft itself and load_idefics2_lora read it (loaders/peft_lora.py)."""
    save_peft_lora(folder, factors, alpha, IDEFICS2_LORA_KIND, base_model)


def load_idefics2_lora(folder: Path, vlm: LoadedIdefics2) -> PeftLoRA:
    """Resolve a peft LoRA's layers in `vlm` (saved from Idefics2ForConditionalGeneration ('model.' prefix) or
    Idefics2Model) and check every shape before anything is applied."""
    config, pairs = read_peft_lora(folder)
    model = vlm.inner
    factors, unknown, wrong, unused = {}, [], [], 0
    for path, (a, b) in sorted(pairs.items()):
        if ".perceiver_resampler." in f".{path}":
            unused += 1  # MUMU runs without the perceiver; a LoRA made with broad targets may still adapt it
            continue
        candidates = [path] + ([path[len("model."):]] if path.startswith("model.") else [])
        target = None
        for c in candidates:
            try:
                target = (c, model.get_submodule(c))
                break
            except AttributeError:
                continue
        if target is None or not isinstance(target[1], torch.nn.Linear):
            unknown.append(path)
            continue
        name, linear = target
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] < 1 or a.shape[1] != linear.in_features \
                or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
            wrong.append(f"{path}: A {tuple(a.shape)}, B {tuple(b.shape)} vs layer {linear.in_features}->"
                         f"{linear.out_features}")
            continue
        scale = scale_for(config, path, a.shape[0])
        factors[name] = mumu_bridge.LoRAFactor(down=a, up=b, scale=scale)
    if unknown or wrong:
        parts = ([f"{len(unknown)} layer(s) this Idefics2 does not have (linear), e.g. {unknown[:3]}"]
                 if unknown else []) + \
                ([f"wrong shapes: {wrong[:3]}"] if wrong else [])
        raise LoadError(f"{folder}: the LoRA does not fit {vlm.describe()}: " + "; ".join(parts) +
                        ". Use a LoRA trained for this Idefics2.")
    if unused:
        log.info("MUMU: %s adapts %d perceiver layer(s), which MUMU does not run; they are skipped", folder, unused)
    if not factors:
        raise LoadError(f"{folder}: the LoRA adapts only the perceiver, which MUMU does not use; nothing to apply.")
    rank = max(f.down.shape[0] for f in factors.values())
    return PeftLoRA(factors=factors, source=str(folder), rank=rank)


@dataclass
class AppliedLoRA:
    lora: PeftLoRA
    strength: float
    mode: str

    def attach(self, model):
        if self.mode == "merged":
            return nullcontext()  # the weights already carry it
        return mumu_bridge.lora_attached(model, self.lora.factors, self.strength)

    def describe(self):
        return f"LoRA {Path(self.lora.source).name} (rank {self.lora.rank}, {self.mode}, strength {self.strength:g})"


def apply_idefics2_lora(vlm: LoadedIdefics2, lora: PeftLoRA, strength: float, mode: str) -> LoadedIdefics2:
    """A new handle with the LoRA; the given one is unchanged. Merged: ComfyUI weight patches on a clone of the
    patcher (W + s B A, applied at load, undone at unload; the plain model shares the weights)."""
    if mode not in LORA_MODES:
        raise ValueError(f"unknown LoRA mode {mode!r}; choose one of {LORA_MODES}")
    if vlm.lora is not None:
        raise InputError(f"{vlm.describe()} already has a LoRA; apply one LoRA to the plain Idefics2")
    if mode == "unmerged":
        return vlm.with_lora(vlm.patcher, AppliedLoRA(lora, strength, mode))
    clone = vlm.patcher.clone()
    patches = {}
    for path, factor in lora.factors.items():
        up, down = mumu_bridge.lora_delta(factor)
        patches[f"{patching.PREFIX}{path}.weight"] = patching.lowrank_patch(up, down)
    applied = clone.add_patches(patches, strength)
    if len(applied) != len(patches):
        raise LoadError(f"ComfyUI accepted {len(applied)} of {len(patches)} LoRA patches for {vlm.describe()}; "
                        f"the LoRA does not fit this model.")
    return vlm.with_lora(clone, AppliedLoRA(lora, strength, mode))


# ----------------------------------------------------------------------------------------- SDXL UNet LoRA

# The layers MUMU's rank-8 UNet LoRA adapts: the attention projections of every transformer block (the paper
# gives only the rank; these are the usual SDXL LoRA targets).
UNET_LORA_TARGETS = re.compile(r"^diffusion_model\..*transformer_blocks\.\d+\."
                               r"attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def unet_lora_name(model_key: str) -> str:
    """'diffusion_model.<path>.weight' -> kohya's SDXL name 'lora_unet_<path with _>' (ComfyUI maps it back)."""
    if not (model_key.startswith("diffusion_model.") and model_key.endswith(".weight")):
        raise ValueError(f"{model_key!r} is not a UNet weight key (diffusion_model.*.weight)")
    return "lora_unet_" + model_key[len("diffusion_model."):-len(".weight")].replace(".", "_")


def unet_lora_targets(model_state_keys) -> list:
    return sorted(k for k in model_state_keys if UNET_LORA_TARGETS.match(k))


def save_unet_lora(path, factors: dict, alpha: float, metadata: dict = None):
    """factors: UNet weight key (as in ComfyUI's model state dict) -> (down (r, in), up (out, r)).
    Effective update: W += (alpha / r) * up @ down, ComfyUI's and kohya's convention."""
    tensors = {}
    ranks = set()
    for key, (down, up) in factors.items():
        name = unet_lora_name(key)
        tensors[f"{name}.lora_down.weight"] = down.detach().contiguous().cpu()
        tensors[f"{name}.lora_up.weight"] = up.detach().contiguous().cpu()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        ranks.add(int(down.shape[0]))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks, default=0)),
            "ss_network_alpha": str(float(alpha)), "ss_base_model_version": "sdxl_base_v1-0",
            "beyond_clip_kind": UNET_LORA_KIND}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
