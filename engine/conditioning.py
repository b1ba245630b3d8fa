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


def family_problem(model, width: int, pooled: int):
    """Why tokens `width` wide (with a pooled vector `pooled` wide, 0 = none) cannot condition `model` (a MODEL's
    ModelPatcher), or None when they can or the model does not say its width."""
    expected = model_context_width(model)
    if expected is None:
        return None
    return contract.mismatch(width, pooled, expected, model_needs_pooled(model))


def check_fits_model(model, width: int, pooled: int, what: str):
    """Fail before sampling when a bridge (tokens `width` wide, a pooled vector `pooled` wide or 0) was made for
    another model family than the MODEL's."""
    problem = family_problem(model, width, pooled)
    if problem:
        raise InputError(f"{what} {problem}")


def _family_check(width: int, pooled: int, what: str):
    """A should_register function for ComfyUI's hooks: the sampler calls it with the MODEL before it reads the
    conditioning; it refuses a MODEL of another family by name, and otherwise registers nothing."""
    def should_register(hook, model, model_options, target_dict, registered):
        problem = family_problem(model, width, pooled)
        if problem:
            raise InputError(f"{what} {problem} (checked by the sampler; connect the MODEL to the encoder's optional "
                             f"'model' input to be told before encoding)")
        return False  # nothing to add to the sampling: the hook is dropped from the conditioning
    return should_register


def guard_family(cond, what: str):
    """CONDITIONING that names its model family to the sampler: on hosts with conditioning hooks (ComfyUI from
    December 2024 on), each entry carries one that the sampler consults with its MODEL before it reads the tokens,
    so a bridge made for SD1.x sampled with SDXL (or the other way round) stops with the pack's message, not with
    KeyError: 'pooled_output' or a matrix shape error, whether or not the encoder's optional MODEL input is
    connected. The hook registers nothing (it is dropped before sampling): pictures are unchanged. Older hosts have
    no such hook and no other place where the pack sees the sampler's model without patching ComfyUI, so there the
    check runs only when the MODEL input is connected."""
    try:
        import comfy.hooks as hooks
    except ImportError:
        return cond
    out = []
    for tokens, extra in cond:
        pooled = extra.get("pooled_output")
        hook = hooks.AdditionalModelsHook(models=[])
        hook.custom_should_register = _family_check(int(tokens.shape[-1]), int(pooled.shape[-1]) if torch.is_tensor(
            pooled) else 0, what)
        group = hooks.HookGroup()
        group.add(hook)
        existing = extra.get("hooks")
        out.append([tokens, {**extra, "hooks": existing.clone_and_combine(group) if existing is not None else group}])
    return out
