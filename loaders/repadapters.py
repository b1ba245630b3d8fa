"""RepAdapter files (models/bridges/*.safetensors, kind 'repadapter') and applying them to a loaded LLM.

Merged mode hands the exact merge to ComfyUI as weight patches on a clone of the LLM's ModelPatcher: a rank-r
patch per weight plus a bias patch, applied when ComfyUI loads the model and undone when it unloads it. The
plain LLM (for chat) and the adapted one share one copy of the weights.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bridges.repadapter import AdapterSet, RepAdapter, attached, merge_factors
from . import patcher as patching
from .bridge_files import checked_build, load_state_into, read_bridge, save_bridge
from .encode_cache import file_identity
from .errors import InputError, LoadError
from .handles import Handle

KIND = "repadapter"
MODES = ("merged", "unmerged")


def save_repadapter(path, adapters: AdapterSet, hidden_dim, groups, scale):
    config = {"hidden_dim": hidden_dim, "groups": groups, "scale": scale, "targets": list(adapters)}
    save_bridge(path, KIND, config, adapters.state_dict())


@dataclass(eq=False)
class LoadedRepAdapter(Handle):
    """RepAdapter weights (an AdapterSet: one adapter per LLM linear layer) under ComfyUI's memory manager.
    config: hidden_dim, groups, scale, targets."""
    what = "RepAdapter"


def load_repadapter(path) -> LoadedRepAdapter:
    config, state_dict = read_bridge(path, KIND)

    def build():
        targets, hidden_dim, groups = config["targets"], int(config["hidden_dim"]), int(config["groups"])
        scale = float(config["scale"])
        if not isinstance(targets, list) or not math.isfinite(scale):
            raise ValueError(f"targets {str(targets)[:80]}, scale {scale}")
        adapters = AdapterSet()
        for target in targets:
            in_features = state_dict[f"{target}.conv_A.weight"].shape[1]
            adapters.add(target, RepAdapter(in_features, hidden_dim, groups, scale, dropout=0.0))
        return adapters

    # Checked on the meta device first: the sizes the config claims are never allocated unless the tensors hold them.
    checked_build(build, state_dict, path, "RepAdapter set")
    adapters = build()
    load_state_into(adapters, state_dict, path, "RepAdapter set")
    return host_repadapter(adapters.eval().requires_grad_(False), config, path)


def host_repadapter(adapters: AdapterSet, config: dict, path=None) -> LoadedRepAdapter:
    return LoadedRepAdapter(patcher=patching.wrap(adapters), config=config, source=str(path) if path else "",
                            identity=file_identity(path) if path else "", name=Path(path).name if path else "")


@dataclass
class AppliedAdapter:
    adapters: LoadedRepAdapter
    mode: str

    def attach(self, model):
        """The context to run the LLM in: hooks for unmerged adapters; nothing for merged ones (the weights
        already carry them). The adapters go where the LLM is."""
        if self.mode == "merged":
            return nullcontext()
        device = next(model.parameters()).device
        return attached(model, self.adapters.inner.to(device))

    def describe(self):
        return f"{self.adapters.describe()} ({self.mode})"

    @property
    def identity(self):
        return f"repadapter:{self.adapters.identity or id(self.adapters)}:{self.mode}"


def _check_fits(llm, adapters: LoadedRepAdapter):
    model = llm.inner
    for target, adapter in adapters.inner.items():
        try:
            linear = model.get_submodule(target)
        except AttributeError:
            raise LoadError(f"{adapters.source}: adapts layer '{target}', which {llm.describe()} does not have. "
                            f"Use an adapter trained for this LLM.") from None
        if not isinstance(linear, torch.nn.Linear) or linear.in_features != adapter.conv_A.in_channels:
            raise LoadError(f"{adapters.source}: layer '{target}' takes {adapter.conv_A.in_channels} features in "
                            f"the adapter but {getattr(linear, 'in_features', '?')} in {llm.describe()}. Use an "
                            f"adapter trained for this LLM.")


def apply_repadapter(llm, adapters: LoadedRepAdapter, mode: str):
    """A new LLM handle with the adapters; the given handle is unchanged."""
    if mode not in MODES:
        raise ValueError(f"unknown RepAdapter mode {mode!r}; choose one of {MODES}")
    if hasattr(llm, "cannot"):  # a stock CLIP (loaders/text_encoders.py)
        raise llm.cannot("Apply RepAdapter", "ComfyUI's text-encoder classes are not the transformers layers a "
                                             "RepAdapter is trained on and hooked into")
    if llm.adapter is not None:
        raise InputError(f"{llm.describe()} already has an adapter; apply one adapter to the plain LLM")
    _check_fits(llm, adapters)
    if mode == "merged" and llm.quantized:
        raise LoadError(f"{llm.describe()} is loaded {llm.quantized}: its weights cannot take a merged adapter. "
                        f"Use mode 'unmerged', or load the LLM in fp16/bf16.")
    if mode == "unmerged":
        return llm.with_adapter(llm.patcher, AppliedAdapter(adapters, mode))
    # Load the plain LLM first so its weights are the originals (ComfyUI undoes other clones' patches).
    model = llm.module()
    clone = llm.patcher.clone()
    patches = {}
    for target, adapter in adapters.inner.items():
        linear = model.get_submodule(target)
        if linear.bias is None:
            # LLaMA's linears have no bias but the merge needs one: a zero bias changes nothing for the
            # plain LLM and gives ComfyUI a tensor to patch.
            linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                         device=linear.weight.device), requires_grad=False)
        up, down, bias_delta = merge_factors(linear.weight, linear.bias, adapter)
        key = patching.PREFIX + target
        patches[key + ".weight"] = patching.lowrank_patch(up.cpu(), down.cpu())
        patches[key + ".bias"] = patching.diff_patch(bias_delta.cpu())
    patching.refresh_keys(clone)
    applied = clone.add_patches(patches, 1.0)
    if len(applied) != len(patches):
        raise LoadError(f"ComfyUI accepted {len(applied)} of {len(patches)} RepAdapter patches for "
                        f"{llm.describe()}; the adapter does not fit this model.")
    return llm.with_adapter(clone, AppliedAdapter(adapters, mode))
