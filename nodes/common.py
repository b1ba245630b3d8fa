"""What every node family shares: socket types, progress, conditioning assembly, model checks."""
import comfy.model_management as mm
import comfy.utils
import torch

CATEGORY = "Beyond CLIP"
LLM_TYPE = "BEYOND_CLIP_LLM"
MAPPER_TYPE = "BEYOND_CLIP_MAPPER"
REPADAPTER_TYPE = "BEYOND_CLIP_REPADAPTER"
ROUTER_TYPE = "BEYOND_CLIP_ROUTER"


class Progress:
    """A ComfyUI progress bar whose every step is also a place where the user's interrupt stops the work."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def step(self, value: int = None):
        mm.throw_exception_if_processing_interrupted()
        if value is None:
            self.bar.update(1)
        else:
            self.bar.update_absolute(min(value, self.total))


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


def check_width_against_model(model, width: int, pooled: bool, what: str):
    """Fail before sampling when a bridge was made for another model family."""
    expected = model_context_width(model)
    if expected is None or (expected == width and (pooled or not model_needs_pooled(model))):
        return
    family = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
    if expected != width:
        raise ValueError(f"{what} produces {width}-wide tokens ({family.get(width, 'unknown model family')}), but the "
                         f"MODEL expects {expected} ({family.get(expected, 'this model')}). Use a bridge made for "
                         f"{family.get(expected, 'this model')}, or the matching checkpoint.")
    raise ValueError(f"{what} has no pooled output, but the MODEL ({family.get(expected, 'this model')}) needs the "
                     f"1280-wide pooled vector. Use a bridge made for SDXL.")


def missing_file_message(kind, name, choices, folder):
    listed = ", ".join(choices[:5]) if choices else "none"
    return (f"{kind} '{name}' is not in models/{folder} (found: {listed}). Put it there, or pick one that is "
            f"present, then refresh the page.")
