"""Hand pack models to ComfyUI's memory manager, across the 2024 and 2025 hosts.

Transformers modules are not built from comfy.ops, so they are always loaded whole (no partial loading);
ComfyUI can then offload them when the UNet needs the memory, like its own CLIP vision tower.
"""
import inspect

import comfy.model_management as mm
import comfy.model_patcher
import torch


class HostedModule(torch.nn.Module):
    """A plain container: ModelPatcher sets attributes such as `device` on the model it manages, which a
    transformers model exposes as a read-only property. State-dict keys are `inner.<original key>`."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.device = next(inner.parameters()).device


PREFIX = "inner."


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for modules not built from comfy.ops: they are loaded whole (force_full_load), and they leave
    whole. When the UNet needs room, ComfyUI (2025 hosts) first tries to unload a model in part, moving some of
    its layers off the device and keeping it counted as loaded; an LLM of which half stays on the GPU is what the
    user's VRAM cannot afford. Freeing nothing in part makes ComfyUI unload it whole. (Clones keep this class on
    those hosts; the 2024 hosts never unload in part.)"""

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        return 0


def wrap(module: torch.nn.Module, load_device=None, offload_device=None, pinned=False):
    """A ModelPatcher for `module`, on the text-encoder devices unless given. pinned: the module stays on the
    device it is on (bitsandbytes-quantized weights are not moved between devices)."""
    if pinned:
        load_device = offload_device = next(module.parameters()).device
    load_device = load_device or mm.text_encoder_device()
    offload_device = offload_device or mm.text_encoder_offload_device()
    hosted = HostedModule(module.to(offload_device))
    return WholeModelPatcher(hosted, load_device=load_device, offload_device=offload_device)


def _load_models(patchers):
    # Models that are not built from comfy.ops cannot be partly loaded: always whole (2025 hosts ask).
    if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:
        mm.load_models_gpu(list(patchers), force_full_load=True)
    else:
        mm.load_models_gpu(list(patchers))


def load_all(patchers) -> list:
    """Ask ComfyUI to place each whole model (with its weight patches applied) on its load device, in one call
    (making room for one never unloads another). Returns the inner modules, ready to run."""
    _load_models(patchers)
    return [p.model.inner for p in patchers]


def load_to_device(patcher) -> torch.nn.Module:
    return load_all([patcher])[0]


def load_for_training(*patchers):
    """The models gradients run through, placed whole on the device together (ComfyUI's own MODEL patchers
    too). Returns the device."""
    _load_models(patchers)
    return mm.get_torch_device()


def refresh_keys(patcher):
    """After adding parameters to a hosted model: 2024 hosts cache its state-dict keys at wrap time and
    accept patches only for keys in that cache."""
    if hasattr(patcher, "model_keys"):
        patcher.model_keys = set(patcher.model.state_dict().keys())


def lowrank_patch(up: torch.Tensor, down: torch.Tensor):
    """A weight patch W += up @ down in the form this host's ModelPatcher understands."""
    try:  # 2025 hosts: weight adapters
        from comfy.weight_adapter.lora import LoRAAdapter
        return LoRAAdapter(set(), (up, down, None, None, None, None))
    except ImportError:  # 2024 hosts: typed tuples
        return ("lora", (up, down, None, None, None, None))


def diff_patch(diff: torch.Tensor):
    """A weight patch W += diff (both host generations read a 1-tuple as a diff)."""
    return (diff,)
