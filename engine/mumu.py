"""MUMU: a prompt interleaving words and reference pictures -> Idefics2 without its perceiver -> the connector ->
SDXL conditioning."""
import logging
from dataclasses import dataclass

import torch

from ..bridges import mumu as mumu_bridge
from ..loaders import mumu as mumu_files
from .cache import reuse_encoding
from .conditioning import conditioning

log = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    sequence: mumu_bridge.Sequence  # token ids with each image's patch span
    pixels: torch.Tensor  # (n_images, 3, R, R) normalised, padded square; None without images


def prepare_prompt(vlm, text: str, images, grid: int, resolution: int) -> PreparedPrompt:
    """Bind the prompt's placeholders to the pictures (images: [(name or "", (H, W, C) tensor)]), build the token
    sequence and the pixels Idefics2 reads."""
    segments = mumu_bridge.bind_placeholders(text, [name for name, _ in images])
    seq = mumu_bridge.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context)
    pixels = (torch.stack([mumu_bridge.prepare_image(img, resolution, vlm.image_mean, vlm.image_std,
                                                     f"reference image '{name}'" if name else
                                                     f"reference image #{i + 1} (unnamed)")
                           for i, (name, img) in enumerate(images)]) if images else None)
    return PreparedPrompt(seq, pixels)


def hidden_states(vlm, prompt: PreparedPrompt, hidden_layer: int) -> torch.Tensor:
    """Idefics2's (with its LoRA) text-model states (1, L, width) float32 of a prepared prompt."""
    model = vlm.module()
    with torch.no_grad(), vlm.attach(model):
        return mumu_bridge.encode(model, prompt.sequence, prompt.pixels, hidden_layer)


def encode(vlm, connector, text: str, images, grid: int, resolution: int, budget: int):
    """-> (tokens (1, N, 2048), pooled (1, 1280), a summary of the token counts)."""
    prompt = prepare_prompt(vlm, text, images, grid, resolution)
    hidden = hidden_states(vlm, prompt, connector.config.hidden_layer)
    net = connector.module()
    with torch.no_grad():
        tokens, pooled = net(hidden.to(next(net.parameters()).device))
    seq = prompt.sequence
    tokens, pooled_grid = mumu_bridge.fit_token_budget(tokens, seq, budget)
    summary = (f"{len(seq.spans)} image(s) x {grid * grid} tokens + {seq.text_tokens} text tokens = "
               f"{seq.input_ids.shape[1]}")
    if pooled_grid:
        summary += f", pooled to {pooled_grid * pooled_grid} per image = {tokens.shape[1]} (token_budget {budget})"
    return tokens, pooled, summary


def encode_conditioning(vlm, connector, text, images, grid, resolution, budget, *, disk_cache=False):
    """CONDITIONING (without size keys) of a prompt with pictures; identical requests are served from the caches."""
    def compute():
        tokens, pooled, summary = encode(vlm, connector, text, images, grid, resolution, budget)
        log.info("MUMU: %s", summary)
        return {"conditioning": conditioning(tokens, pooled)}

    image_size = (grid, resolution) if images else None  # a text-only encoding is the same at every size
    return reuse_encoding("mumu", [vlm.identity, connector.identity], [text, images, image_size, budget],
                          compute, disk=disk_cache, about={"idefics2": vlm.describe(), "connector": connector.source}
                          )["conditioning"]


def grid_for(vlm, resolution: int):
    return mumu_files.grid_for(vlm, resolution)
