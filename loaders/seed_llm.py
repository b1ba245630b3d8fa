"""SEED-LLM files: what training writes and the SEED-LLM loader reads.

- models/bridges/<name>.safetensors, kind 'seed_llm': the new tokens' rows (the FC layer proj.*, the <img> </img>
  input rows `markers`, the 8194 output rows `out_rows`); its config names the base LLM (folder name, a
  fingerprint of its weight and tokenizer files, width, vocabulary) and the SEED tokenizer (name, a fingerprint of
  its codebook and encoder head), the LoRA folder, the prompts and the training settings.
- models/LLM/<name>-seed-llm-lora/: the LoRA as a peft folder (adapter_config.json + adapter_model.safetensors, keys
  of a peft LoRA on the causal LM), which peft's PeftModel.from_pretrained reads too.
A file made for another LLM or another SEED tokenizer is refused, naming both.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import folder_paths
import torch

from ..bridges import seed_llm as seed_llm_bridge
from ..bridges.retrieval import fingerprint
from ..bridges.training.lora import LoRASet
from . import folders
from . import patcher as patching
from .bridge_files import load_state_into, read_bridge, save_bridge
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle
from .llm import weights_fingerprint
from .peft_lora import check_writable, read_peft_lora, save_peft_lora, scale_for

KIND = "seed_llm"
LORA_KIND = "seed_llm_lora"
LORA_SUFFIX = "-seed-llm-lora"
MODES = ("merged", "unmerged")
# The SEED tokenizer's tensors that decide which code a picture gets and what a code is (all kept in fp32 by the
# SEED loader, whatever the vision tower's dtype, so the fingerprint does not depend on it).
SEED_IDENTITY_TENSORS = ("quantize.embedding.weight", "encode_task_layer.0.weight", "encode_task_layer.2.weight",
                         "query_tokens")


def llm_identity(llm) -> dict:
    """How a SEED-LLM file names its base LLM."""
    model = llm.inner
    return {"name": llm.name, "fingerprint": weights_fingerprint(llm.path),
            "model_type": getattr(model.config, "model_type", "?"),
            "width": int(model.get_input_embeddings().weight.shape[1]),
            "vocab": int(model.get_input_embeddings().weight.shape[0])}


def seed_identity(seed) -> dict:
    """How a SEED-LLM file names its SEED tokenizer."""
    state = seed.inner.state_dict()
    return {"name": seed.name, "fingerprint": fingerprint({k: state[k] for k in SEED_IDENTITY_TENSORS}),
            "codebook_size": int(seed.config.codebook_size), "code_dim": int(seed.config.code_dim)}


def lora_layers(model) -> list:
    """Where the LoRA goes: every linear layer of the causal LM except its output head (peft's 'all-linear')."""
    head = model.get_output_embeddings()
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)


# ---------------------------------------------------------------------------------------------------- writing

def output_paths(output_name: str) -> dict:
    """{"vocab": models/bridges/<name>.safetensors, "lora": models/LLM/<name>-seed-llm-lora/}; files of others are
    never replaced."""
    name = folders.check_output_name(output_name, "output name")
    paths = {"vocab": folders.bridge_output_path(name, kind=KIND),
             "lora": Path(folder_paths.get_folder_paths(folders.LLM)[0]) / f"{name}{LORA_SUFFIX}"}
    check_writable(paths["lora"], LORA_KIND)
    return paths


def save_seed_llm(paths: dict, vocab, lora: LoRASet, llm_id: dict, seed_id: dict, training: dict = None):
    """The LoRA folder, then the rows file (its config names the folder)."""
    save_peft_lora(paths["lora"], lora.factors(), lora.alpha, LORA_KIND, base_model=llm_id["name"],
                   target_modules=list(lora.paths))
    config = {"seed_llm": vocab.config.to_dict(), "llm": llm_id, "seed": seed_id,
              "lora": {"folder": paths["lora"].name, "layers": len(lora.paths)}, "training": training or {}}
    save_bridge(paths["vocab"], KIND, config, vocab.state_dict())


# ---------------------------------------------------------------------------------------------------- loading

@dataclass
class AppliedSeedLoRA:
    """The LoRA on the LLM handle (its `adapter`): merged as ComfyUI weight patches, or run beside the layers."""
    lora: LoRASet
    mode: str
    source: str

    def attach(self, model):
        if self.mode == "merged":
            return nullcontext()  # the weights already carry it
        self.lora.to(next(model.parameters()).device)
        return self.lora.attached(model)

    def describe(self):
        return f"SEED-LLM LoRA {Path(self.source).name} (rank {self.lora.rank}, {self.mode})"

    @property
    def identity(self):
        return f"seed_llm_lora:{file_identity(self.source)}:{self.mode}"


@dataclass(eq=False)
class LoadedSeedLLM(Handle):
    """What the SEED-LLM socket carries: the visual vocabulary (this handle's module), the LLM with the LoRA
    applied (`llm`, a LoadedLLM) and the SEED tokenizer whose codes it reads and writes (`seed`)."""
    llm: object = None
    seed: object = None
    what = "SEED-LLM"

    @property
    def tokenizer(self):
        return self.llm.tokenizer


def _refuse_other(path, what, saved: dict, current: dict, advice: str):
    if saved.get("fingerprint") != current["fingerprint"]:
        same_name = saved.get("name") == current["name"]
        raise LoadError(f"{path} was trained with the {what} '{saved.get('name')}'; the connected {what} "
                        f"'{current['name']}' is " + ("a different one under the same name (its files differ)"
                                                      if same_name else "another one") + f". {advice}")


def _find_lora_folder(path, name) -> Path:
    for base in folders.search_paths(folders.LLM):
        if (base / name).is_dir():
            return base / name
    raise LoadError(f"{path} needs its LoRA folder '{name}' in models/{folders.LLM}/, which is not there. Copy the "
                    f"folder written beside it in training (models/{folders.LLM}/{name}/) too.")


def _lora_for(folder: Path, lora_config: dict, model, llm) -> LoRASet:
    """The peft folder's factors as a LoRASet on `model`, every layer checked."""
    peft_config, pairs = read_peft_lora(folder)
    ranks = {int(a.shape[0]) for a, _ in pairs.values()}
    scales = {scale_for(peft_config, p, next(iter(ranks))) for p in pairs}
    if len(ranks) != 1 or len(scales) != 1:
        raise LoadError(f"{folder}: its layers have ranks {sorted(ranks)} and scales {sorted(scales)}; a SEED-LLM "
                        f"LoRA has one rank and one alpha. Train it again.")
    layers, wrong = {}, []
    for p, (a, b) in sorted(pairs.items()):
        try:
            linear = model.get_submodule(p)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            wrong.append(f"{p}: no such linear layer")
        elif a.shape[1] != linear.in_features or b.shape[0] != linear.out_features or a.shape[0] != b.shape[1]:
            wrong.append(f"{p}: A {tuple(a.shape)}, B {tuple(b.shape)} vs layer {linear.in_features}->"
                         f"{linear.out_features}")
        layers[p] = (a.shape[1], b.shape[0])
    if wrong or len(pairs) != int(lora_config.get("layers", len(pairs))):
        raise LoadError(f"{folder}: the LoRA does not fit {llm.describe()} ({'; '.join(wrong[:3]) or 'layer count'}"
                        f"). Use the LoRA folder trained with this file.")
    rank = ranks.pop()
    lora = LoRASet(layers, rank, scales.pop() * rank)
    with torch.no_grad():
        for i, p in enumerate(lora.paths):
            lora.down[i].copy_(pairs[p][0])
            lora.up[i].copy_(pairs[p][1])
    return lora.eval().requires_grad_(False)


def _merged(llm, lora: LoRASet):
    """A clone of the LLM's patcher with W += scale * up @ down on each layer, applied when ComfyUI loads it."""
    if llm.quantized:
        raise LoadError(f"{llm.describe()} is loaded {llm.quantized}: its weights cannot take a merged LoRA. Use "
                        f"mode 'unmerged', or load the LLM in fp16/bf16/fp32.")
    clone = llm.patcher.clone()
    patches = {f"{patching.PREFIX}{p}.weight": patching.lowrank_patch((up * lora.scale).float(), down.float())
               for p, (down, up) in lora.factors().items()}
    applied = clone.add_patches(patches, 1.0)
    if len(applied) != len(patches):
        raise LoadError(f"ComfyUI accepted {len(applied)} of {len(patches)} LoRA patches for {llm.describe()}; the "
                        f"LoRA does not fit this model.")
    return clone


def load_seed_llm(path, llm, seed, mode: str = "merged") -> LoadedSeedLLM:
    """The SEED-LLM in `path` on this LLM (a plain LoadedLLM) and SEED tokenizer (a LoadedSeed), each checked by
    name and fingerprint against what the file was trained with."""
    path = Path(path)
    if mode not in MODES:
        raise LoadError(f"unknown LoRA mode {mode!r}; choose one of {MODES}")
    if llm.adapter is not None:
        raise LoadError(f"{llm.describe()} already has an adapter: connect the plain LLM (Load LLM) to the SEED-LLM "
                        f"loader")
    config, state = read_bridge(path, KIND)
    try:
        cfg = seed_llm_bridge.SeedLLMConfig.from_dict(config["seed_llm"])
        saved_llm, saved_seed, lora_config = dict(config["llm"]), dict(config["seed"]), dict(config["lora"])
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: its SEED-LLM config is not valid ({type(e).__name__}: {e}). Train it again.") \
            from None
    _refuse_other(path, "LLM", saved_llm, llm_identity(llm),
                  f"Load '{saved_llm.get('name')}' with Load LLM, or train a SEED-LLM for this LLM.")
    _refuse_other(path, "SEED tokenizer", saved_seed, seed_identity(seed),
                  f"Load '{saved_seed.get('name')}' with Load SEED Tokenizer: codes mean something only to the "
                  f"tokenizer that made them.")
    model = llm.inner
    width, vocab_rows = model.get_input_embeddings().weight.shape[1], model.get_input_embeddings().weight.shape[0]
    if (cfg.width, cfg.base_vocab) != (width, vocab_rows):
        raise LoadError(f"{path} is for a {cfg.width}-wide LLM with {cfg.base_vocab} tokens; {llm.describe()} is "
                        f"{width} wide with {vocab_rows}. Train it again for this LLM.")
    folder = _find_lora_folder(path, lora_config.get("folder", ""))
    lora = _lora_for(folder, lora_config, model, llm)
    codebook = seed.inner.quantize.embedding.weight.detach().float().cpu()
    try:
        vocab = seed_llm_bridge.VisualVocabulary(cfg, codebook)
    except ValueError as e:
        raise LoadError(f"{path} does not fit {seed.describe()} ({e}).") from None
    load_state_into(vocab, state, path, "SEED-LLM visual vocabulary")
    vocab = vocab.eval().requires_grad_(False)
    patcher = _merged(llm, lora) if mode == "merged" else llm.patcher
    adapted = llm.with_adapter(patcher, AppliedSeedLoRA(lora, mode, str(folder)))
    return LoadedSeedLLM(patcher=patching.wrap(vocab), config=cfg, source=str(path), name=path.name, llm=adapted,
                         seed=seed, identity=f"{file_identity(path)}|{adapted.identity}|{seed.identity}")
