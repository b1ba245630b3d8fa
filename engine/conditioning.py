"""CONDITIONING for the stock KSampler, and the check that a bridge's output fits the MODEL it will condition.

The widths and pooled sizes themselves are the contract in bridges/contract.py; this module only assembles
ComfyUI's value ([[tokens, {pooled_output?}]] on the intermediate device) and reads a MODEL's config.
"""
import comfy.model_management as mm
import torch

from ..bridges import contract
from ..bridges.errors import InputError


def conditioning(tokens: torch.Tensor, pooled: torch.Tensor = None):
    """ComfyUI's CONDITIONING: [[(1, N, width) float32 tensor, {pooled_output?}]] on the intermediate device."""
    device = mm.intermediate_device()
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = pooled.float().to(device)
    return [[tokens.float().to(device), extra]]


def zero_conditioning_like(cond):
    return [[torch.zeros_like(t), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in d.items()}]
            for t, d in cond]


def model_context_width(model):
    """The cross-attention width a MODEL expects (768 SD1.x, 1024 SD2, 2048 SDXL), or None if unknown."""
    try:
        return int(model.model.model_config.unet_config["context_dim"])
    except (AttributeError, KeyError, TypeError):
        return None


def model_needs_pooled(model) -> bool:
    try:
        return model.model.model_config.unet_config.get("adm_in_channels") is not None
    except AttributeError:
        return False


def check_fits_model(model, width: int, pooled: int, what: str):
    """Fail before sampling when a bridge (tokens `width` wide, a pooled vector `pooled` wide or 0) was made for
    another model family than the MODEL's."""
    expected = model_context_width(model)
    if expected is None:
        return
    problem = contract.mismatch(width, pooled, expected, model_needs_pooled(model))
    if problem:
        raise InputError(f"{what} {problem}")
