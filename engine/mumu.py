"""MUMU: a prompt interleaving words and reference pictures -> Idefics2 without its perceiver -> the connector ->
SDXL conditioning."""
import logging
from dataclasses import dataclass

import torch

from ..bridges import llm_text
from ..bridges import mumu as mumu_bridge
from ..bridges import prompt_weights as weighting
from ..loaders import mumu as mumu_files
from . import prompt_weights
from .cache import reuse_encoding
from .conditioning import conditioning

log = logging.getLogger(__name__)


@dataclass
class PreparedPrompt:
    sequence: mumu_bridge.Sequence  # token ids with each image's patch span
    pixels: torch.Tensor  # (n_images, 3, R, R) normalised, padded square; None without images


def parse_weights(text: str) -> tuple:
    """(the prompt without ComfyUI's weight syntax, one weight per character of it or None when every weight is
    1.0). A prompt without the syntax comes back as written."""
    segments = prompt_weights.parse(text)
    if segments is None:
        return text, None
    plain, char_weights = weighting.plain_text(segments)
    return plain, (char_weights if weighting.is_weighted(segments) else None)


def prepare_prompt(vlm, text: str, images, grid: int, resolution: int, *, weighted: bool = False) -> PreparedPrompt:
    """Bind the prompt's placeholders to the pictures (images: [(name or "", (H, W, C) tensor)]), build the token
    sequence and the pixels Idefics2 reads. weighted: read ComfyUI's weight syntax first ((word:1.3); the
    sequence then carries the words' weights); training captions are read as written."""
    names = [name for name, _ in images]
    char_weights = None
    if weighted:
        text, char_weights = parse_weights(text)
    segments = mumu_bridge.bind_placeholders(text, names)
    weights = None
    if char_weights is not None:
        weights = mumu_bridge.piece_weights(text, char_weights)
        for placeholder, weight in mumu_bridge.weighted_placeholders(text, char_weights):
            log.warning("MUMU: the weight %g around %s applies to the words beside it only; the picture keeps "
                        "weight 1. To stress what a picture shows, weigh the word naming it, e.g. 'a <man> (man:1.3)'",
                        weight, placeholder)
    seq = mumu_bridge.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context, weights=weights)
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


def empty_hidden_states(vlm, length: int, hidden_layer: int) -> torch.Tensor:
    """(1, length, width) float32 text-model states of the empty prompt (its start token, then padding), as ComfyUI's
    CLIP encodes it for weighting: what weighted tokens move away from."""
    ids = llm_text.empty_ids(vlm.tokenizer, length)
    empty = mumu_bridge.Sequence(input_ids=ids, spans=[], text_tokens=length)
    return hidden_states(vlm, PreparedPrompt(empty, None), hidden_layer)


def encode(vlm, connector, text: str, images, grid: int, resolution: int, budget: int):
    """-> (tokens (1, N, 2048), pooled (1, 1280), a summary of the token counts). Weighted words ((word:1.3),
    ComfyUI's syntax) move their tokens from the empty prompt's connector tokens toward their own; pictures and the
    pooled vector are the prompt's."""
    prompt = prepare_prompt(vlm, text, images, grid, resolution, weighted=True)
    hidden = hidden_states(vlm, prompt, connector.config.hidden_layer)
    net = connector.module()
    seq = prompt.sequence
    with torch.no_grad():
        device = next(net.parameters()).device
        tokens, pooled = net(hidden.to(device))
        if seq.weights is not None:
            empty = empty_hidden_states(vlm, hidden.shape[1], connector.config.hidden_layer)
            tokens = weighting.apply(tokens, net(empty.to(device))[0], seq.weights)
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
