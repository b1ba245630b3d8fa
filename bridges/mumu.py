"""MUMU (Berman & Peysakhovich 2024): prompts that interleave words and reference images, read by Idefics2
without its perceiver, mapped by a non-causal transformer ("connector") into SDXL's cross-attention space.

No code or weights were released, so this follows the paper:
- Idefics2's perceiver is not used: each image goes vision tower -> modality projection -> one token per
  vision patch, at a resolution the caller chooses ((resolution / patch)^2 tokens; MUMU used 324 and 1296).
  Images are padded to square with black.
- Each image sits in the prompt where its placeholder is, framed by <fake_token_around_image> as in Idefics2.
- The connector is a non-causal pre-norm transformer (16 layers in MUMU) on one hidden layer of the text
  model, projected to 2048 wide tokens. The paper does not say how SDXL's pooled vector (1280) is made: here
  a learnt query attends over the connector's output (attention pooling, like SigLIP's pooling head), so the
  summary does not depend on where the prompt ends or how many image tokens it holds.
No positional embedding is added in the connector: the Idefics2 states already encode order (RoPE).

Prompt weights (ComfyUI's `(word:1.3)`, parsed before the placeholders are bound; bridges/prompt_weights.py): the
connector keeps one output token per Idefics2 token, so a weighted word's tokens move from the empty prompt's
tokens toward their own, as the Beyond CLIP mapper's do. Weights act on words only. A picture is never weighted:
its patch tokens and the tokens framing it keep weight 1, also where its placeholder stands inside weighted
parentheses (`(a <man> man:1.3)` weighs "a" and "man"; `(<man>:1.3)` weighs nothing), since moving an image's
tokens toward the empty prompt's tokens at those positions is nothing the connector was trained on. To stress
what a picture shows, weigh the word that names it: `a <man> (man:1.3)`.

Pure torch + transformers modules; no file I/O, no ComfyUI.
"""
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import contract, hooks
from . import prompt_weights as weighting
from .config_record import ConfigRecord
from .errors import InputError
from .llm_text import check_text
from .pixels import check_pixels

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
POSITIONAL = "image"  # the name of the positional placeholder <image>
PLACEHOLDER = re.compile(r"<([^<>\s]+)>")
NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
SDXL_WIDTH, SDXL_POOLED = contract.SDXL.width, contract.SDXL.pooled


class PromptError(InputError):
    """A MUMU prompt or reference image that cannot be encoded as given."""


# ---------------------------------------------------------------------------------------------- prompt syntax

def check_image_name(name: str) -> str:
    name = name.strip()
    if name and (not NAME.match(name) or name == POSITIONAL):
        raise PromptError(f"image name {name!r} cannot be used: names are letters, digits, '_' or '-' and not "
                          f"'{POSITIONAL}' (leave the name empty to bind the image to the next <image>)")
    return name


def _describe(names, i):
    return f"image #{i + 1} (named '{names[i]}')" if names[i] else f"image #{i + 1} (unnamed)"


_WORD_CHAR = re.compile(r"[A-Za-z0-9_]")


def _check_brackets(text: str):
    """Angle brackets outside placeholders that look like a placeholder gone wrong are refused, not read as words:
    '<>', a '<' that opens something never closed ('a <man man'), a '>' right after a word ('a man> dog'). A '<'
    or '>' beside a space (or another bracket) stays text, so 'x < y' still reads as written."""
    inside = set()
    for match in PLACEHOLDER.finditer(text):
        inside.update(range(match.start(), match.end()))
    for i, char in enumerate(text):
        if i in inside or char not in "<>":
            continue
        snippet = text[max(0, i - 8):i + 12].replace("\n", " ")
        if text.startswith("<>", i):
            raise PromptError(f"empty placeholder '<>' at character {i} (in '{snippet}'): write <image> for the next "
                              f"unnamed image or <name> for a named one. A '<' with a space after it stays text.")
        nxt = text[i + 1:i + 2]
        if char == "<" and nxt and not nxt.isspace() and nxt not in "<>":
            raise PromptError(f"the '<' at character {i} (in '{snippet}') opens a placeholder that never closes: a "
                              f"placeholder is <image> or <name>, with no spaces inside. Close it with '>', or put a "
                              f"space after the '<' to keep it as text.")
        if char == ">" and i > 0 and (i - 1) not in inside and _WORD_CHAR.match(text[i - 1]):
            raise PromptError(f"the '>' at character {i} (in '{snippet}') closes no placeholder: a placeholder is "
                              f"<image> or <name>. Add the missing '<', or put a space before the '>' to keep it as "
                              f"text.")


def bind_placeholders(text: str, names):
    """Split `text` at its placeholders and bind each to an image.

    names: one per image, in input order; "" for an image bound by position. `<image>` takes the next unnamed
    image; `<name>` takes the image with that name (it may appear more than once). Returns a list of str
    (text pieces) and int (image index). Every placeholder needs an image and every image a placeholder.
    """
    check_text(text, "the MUMU prompt", PromptError)
    names = [check_image_name(n) for n in names]
    seen = {}
    for i, n in enumerate(names):
        if not n:
            continue
        if n in seen:
            raise PromptError(f"two images are named '{n}' ({_describe(names, seen[n])} and {_describe(names, i)}); "
                              f"give each image its own name")
        seen[n] = i
    unnamed = [i for i, n in enumerate(names) if not n]
    segments, used, pos, next_unnamed = [], set(), 0, 0
    for match in PLACEHOLDER.finditer(text):
        name = match.group(1)
        segments.append(text[pos:match.start()])
        pos = match.end()
        if name == POSITIONAL:
            if next_unnamed >= len(unnamed):
                have = (f"only {len(unnamed)} unnamed image(s) are connected" if unnamed
                        else "no unnamed image is connected")
                raise PromptError(f"placeholder <image> #{next_unnamed + 1} (at character {match.start()}) has no "
                                  f"image: {have}. Connect another image with an empty name, or remove the "
                                  f"placeholder.")
            index = unnamed[next_unnamed]
            next_unnamed += 1
        elif name in seen:
            index = seen[name]
        else:
            listed = ", ".join(_describe(names, i) for i in range(len(names))) or "none"
            raise PromptError(f"placeholder <{name}> (at character {match.start()}) has no image named '{name}' "
                              f"(images: {listed}). Name an image '{name}', or remove the placeholder.")
        used.add(index)
        segments.append(index)
    segments.append(text[pos:])
    _check_brackets(text)
    left = [i for i in range(len(names)) if i not in used]
    if left:
        i = left[0]
        wanted = "<image>" if not names[i] else f"<{names[i]}>"
        raise PromptError(f"{_describe(names, i)} has no placeholder in the prompt: write {wanted} before the word "
                          f"it depicts (e.g. 'a {wanted} man'), or disconnect the image."
                          + (f" ({len(left)} images are unused.)" if len(left) > 1 else ""))
    return [s for s in segments if s != ""]


def piece_weights(text: str, char_weights) -> list:
    """For each piece bind_placeholders(text, ...) returns: the weights of a text piece's characters (char_weights:
    one per character of `text`), None for an image."""
    pieces, pos = [], 0
    for match in PLACEHOLDER.finditer(text):
        if match.start() > pos:
            pieces.append(list(char_weights[pos:match.start()]))
        pieces.append(None)
        pos = match.end()
    if len(text) > pos:
        pieces.append(list(char_weights[pos:]))
    return pieces


def weighted_placeholders(text: str, char_weights) -> list:
    """The placeholders of `text` that stand inside weighted parentheses: [(placeholder, weight)]. Their pictures
    keep weight 1 (see the module's docstring)."""
    return [(m.group(0), char_weights[m.start()]) for m in PLACEHOLDER.finditer(text)
            if any(w != 1.0 for w in char_weights[m.start():m.end()])]


# ---------------------------------------------------------------------------------------------------- images

def to_rgb(image: torch.Tensor, what: str = "a reference image") -> torch.Tensor:
    """(H, W, C) in [0, 1] -> (3, H, W). Grayscale is repeated; alpha is composited onto black (the padding).
    Empty pictures, other channel counts and NaN / infinite values are refused (bridges/pixels.py)."""
    if image.ndim != 3:
        raise PromptError(f"{what} must be (height, width, channels); got shape {tuple(image.shape)}")
    image = check_pixels(image, what, PromptError)[0]
    c = image.shape[-1]
    image = image.float().clamp(0, 1)
    if c in (2, 4):
        image = image[..., :-1] * image[..., -1:]
        c -= 1
    if c == 1:
        image = image.expand(*image.shape[:2], 3)
    return image.permute(2, 0, 1)


def prepare_image(image: torch.Tensor, resolution: int, mean, std, what: str = "a reference image") -> torch.Tensor:
    """(H, W, C) in [0, 1] -> normalised (3, resolution, resolution), padded to square with black.

    Resizing the long side first and padding after is the same picture as padding first (black stays black),
    and never allocates a huge square for a very large input."""
    rgb = to_rgb(image, what)
    h, w = rgb.shape[1:]
    scale = resolution / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    rgb = F.interpolate(rgb[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    top, left = (resolution - nh) // 2, (resolution - nw) // 2
    square = torch.zeros(3, resolution, resolution)
    square[:, top:top + nh, left:left + nw] = rgb
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (square - mean) / std


# --------------------------------------------------------------------------------------- Idefics2 encoding

@dataclass
class Span:
    start: int  # first image token in the sequence
    image: int  # index of the image
    grid: int  # the image's patch grid is grid x grid tokens

    @property
    def length(self):
        return self.grid * self.grid


@dataclass
class Sequence:
    input_ids: torch.Tensor  # (1, L)
    spans: list  # Span per placeholder occurrence
    text_tokens: int  # tokens that are not image patches (text, BOS, the framing tokens)
    weights: list = None  # one prompt weight per token (1.0 for images and special tokens); None: no weights


def _weighted_ids(tokenizer, text: str, char_weights) -> tuple:
    """(ids, one weight per id): each token takes the weight of its first non-space character."""
    try:
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        raise PromptError("prompt weights like (word:1.3) need a tokenizer that knows which characters each token "
                          "came from (a 'fast' tokenizer with a tokenizer.json); this Idefics2's tokenizer does not. "
                          "Write the prompt without weights.") from None
    ids = torch.tensor(list(encoded["input_ids"]), dtype=torch.long)
    return ids, weighting.token_weights(offsets, char_weights, text)


def build_sequence(tokenizer, segments, grid: int, *, context: int, weights=None) -> Sequence:
    """Token ids for the bound prompt: each image becomes <fake> + grid^2 x <image> + <fake>.

    The text is tokenized in one piece (with one <image> per image, expanded afterwards), so words split
    exactly as in a plain prompt. Refuses a sequence longer than the model's context, with the numbers.
    weights: piece_weights() of the prompt when it has weights other than 1.0 (None: the text as written); the
    sequence then carries one weight per token, 1.0 for images and the tokens framing them."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    frame = f"{FAKE_TOKEN}{IMAGE_TOKEN}{FAKE_TOKEN}"
    text = "".join(s if isinstance(s, str) else frame for s in segments)
    token_weights = None
    if weights is None:
        ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"][0]
    else:
        char_weights = [w for s, piece in zip(segments, weights)
                        for w in (piece if isinstance(s, str) else [1.0] * len(frame))]
        ids, token_weights = _weighted_ids(tokenizer, text, char_weights)
    images = [s for s in segments if not isinstance(s, str)]
    where = (ids == image_id).nonzero().flatten().tolist()
    if len(where) != len(images):
        raise PromptError(f"the tokenizer split the image placeholders unexpectedly ({len(where)} {IMAGE_TOKEN} "
                          f"tokens for {len(images)} images); the prompt may contain the literal text "
                          f"'{IMAGE_TOKEN}' in another form")
    n = grid * grid
    total = ids.numel() + len(images) * (n - 1)
    if total > context:
        text_tokens = ids.numel() - len(images)
        fit = max(0, (context - text_tokens) // max(1, len(images)))
        raise PromptError(f"the prompt needs {total} tokens ({text_tokens} text + {len(images)} image(s) x {n} "
                          f"patch tokens), more than Idefics2's context of {context}. Lower image_resolution "
                          f"(at most {fit} tokens per image fit), use fewer images, or shorten the text.")
    pieces, spans, prev, offset = [], [], 0, 0
    expanded = [] if token_weights is not None else None
    for image, at in zip(images, where):
        pieces += [ids[prev:at], torch.full((n,), image_id, dtype=ids.dtype)]
        if expanded is not None:
            expanded += token_weights[prev:at] + [1.0] * n
        spans.append(Span(start=at + offset, image=image, grid=grid))
        offset += n - 1
        prev = at + 1
    pieces.append(ids[prev:])
    if expanded is not None:
        expanded += token_weights[prev:]
    input_ids = torch.cat(pieces)[None]
    return Sequence(input_ids=input_ids, spans=spans, text_tokens=input_ids.shape[1] - len(spans) * n,
                    weights=expanded)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Idefics2 without the perceiver: vision tower -> modality projection, one token per patch.
    model: transformers' Idefics2Model. (N, 3, R, R) -> (N, (R/patch)^2, text hidden size)."""
    patch = model.config.vision_config.patch_size
    n, _, h, w = pixel_values.shape
    # An explicit all-true mask: the black padding is part of the picture (as in MUMU), not masked out.
    mask = torch.ones(n, h // patch, w // patch, dtype=torch.bool, device=pixel_values.device)
    vision = model.vision_model(pixel_values=pixel_values.to(model.dtype), patch_attention_mask=mask).last_hidden_state
    return model.connector.modality_projection(vision)


def encode(model, seq: Sequence, pixel_values, hidden_layer: int = -1) -> torch.Tensor:
    """Hidden states (1, L, text hidden) float32 of the interleaved prompt at `hidden_layer` (an index into
    the text model's hidden states: 0 = embeddings, -1 = last layer)."""
    device = next(model.parameters()).device
    input_ids = seq.input_ids.to(device)
    embeds = model.text_model.get_input_embeddings()(input_ids)
    if seq.spans:
        features = image_features(model, pixel_values.to(device)).to(embeds.dtype)
        embeds = embeds.clone()
        for span in seq.spans:
            embeds[0, span.start:span.start + span.length] = features[span.image]
    layers = model.config.text_config.num_hidden_layers + 1
    if not -layers <= hidden_layer < layers:
        raise PromptError(f"hidden_layer {hidden_layer} is out of range: this Idefics2 has {layers} hidden states "
                          f"(0 = embeddings, {layers - 1} or -1 = last layer)")
    out = model.text_model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                           output_hidden_states=True, use_cache=False)
    return out.hidden_states[hidden_layer].float()


# ----------------------------------------------------------------------------------------------- connector

@dataclass
class ConnectorConfig(ConfigRecord):
    FIELDS_LABEL = "MUMU connector config fields"
    in_dim: int  # Idefics2's text hidden size (4096 for idefics2-8b)
    width: int = 1024
    depth: int = 16  # MUMU: 16 layers
    heads: int = 16
    ff_mult: int = 4
    hidden_layer: int = -1  # the Idefics2 hidden state the connector reads (trained on; not a user choice)
    out_dim: int = SDXL_WIDTH
    pooled_dim: int = SDXL_POOLED

    def __post_init__(self):
        if min(self.in_dim, self.width, self.depth, self.heads, self.ff_mult, self.out_dim) < 1 or self.pooled_dim < 0:
            raise ValueError(f"invalid MUMU connector config {asdict(self)}")
        if self.width % self.heads:
            raise ValueError(f"connector width {self.width} is not divisible by its {self.heads} heads")


class AttentionPool(nn.Module):
    """A learnt query attends over all tokens -> one vector (SDXL's pooled 1280)."""

    def __init__(self, width, heads, out_dim):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, x, key_padding_mask=None):
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x, key_padding_mask=key_padding_mask,
                              need_weights=False)
        return self.proj(self.norm(pooled[:, 0]))


class MUMUConnector(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.config = config
        w = config.width
        # LLM hidden states carry a few huge outlier features; normalise before projecting.
        self.in_norm = nn.LayerNorm(config.in_dim)
        self.in_proj = nn.Linear(config.in_dim, w)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(w, config.heads, dim_feedforward=config.ff_mult * w, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, config.out_dim)
        self.pool = AttentionPool(w, config.heads, config.pooled_dim) if config.pooled_dim else None

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor = None):
        """hidden (B, L, in_dim) -> tokens (B, L, out_dim), pooled (B, pooled_dim) or None. Non-causal. valid
        (B, L) bool marks the real tokens of a padded batch: the padding is masked out of the self-attention and
        of the pooling, so each prompt is encoded as it would be alone (training batches captions this way)."""
        pad = None if valid is None else ~valid
        x = self.in_proj(self.in_norm(hidden.to(self.in_proj.weight.dtype)))
        for layer in self.layers:
            x = layer(x) if pad is None else layer(x, src_key_padding_mask=pad)
        x = self.out_norm(x)
        pooled = self.pool(x, key_padding_mask=pad) if self.pool is not None else None
        return self.out_proj(x), pooled


# --------------------------------------------------------------------------------------------- token budget

def fit_token_budget(tokens: torch.Tensor, seq: Sequence, budget: int):
    """Average-pool each image's patch grid (the same smaller grid for all images) until the sequence fits
    `budget` tokens; text tokens are kept. Every UNet step attends to every token, so this is what makes
    several high-resolution images affordable. Returns (tokens, grid used or None when unchanged)."""
    length = tokens.shape[1]
    if budget <= 0 or length <= budget:
        return tokens, None
    if not seq.spans:
        raise PromptError(f"token_budget {budget} is below the prompt's {length} text tokens; raise the "
                          f"budget or shorten the prompt")
    grid, k, text = seq.spans[0].grid, len(seq.spans), seq.text_tokens
    new = grid
    while new > 1 and text + k * new * new > budget:
        new -= 1
    if text + k * new * new > budget:
        raise PromptError(f"token_budget {budget} cannot hold the prompt: {text} text tokens + {k} image(s) x at "
                          f"least 1 token = {text + k}. Raise the budget, use fewer images or shorten the text.")
    pieces, prev = [], 0
    for span in seq.spans:
        pieces.append(tokens[:, prev:span.start])
        block = tokens[:, span.start:span.start + span.length]  # (B, g*g, D), row-major patches
        b, _, d = block.shape
        grid_map = block.transpose(1, 2).reshape(b, d, grid, grid)
        pooled = F.adaptive_avg_pool2d(grid_map, new).reshape(b, d, new * new).transpose(1, 2)
        pieces.append(pooled)
        prev = span.start + span.length
    pieces.append(tokens[:, prev:])
    return torch.cat(pieces, dim=1), new


# ----------------------------------------------------------------------------------- LoRA (peft format)

@dataclass
class LoRAFactor:
    down: torch.Tensor  # A (r, in)
    up: torch.Tensor  # B (out, r)
    scale: float  # alpha / r (or alpha / sqrt(r) with rsLoRA)


def lora_delta(factor: LoRAFactor, strength: float = 1.0):
    """(up, down) with the scale folded into up, float32: W' = W + strength * up @ down."""
    return factor.up.float() * (factor.scale * strength), factor.down.float()


def _lora_hook(factor: LoRAFactor, strength: float):
    up, down = lora_delta(factor, strength)

    def hook(module, args, output):
        x = args[0]
        return output + F.linear(F.linear(x, down.to(x.device, x.dtype)), up.to(x.device, x.dtype))
    return hook


def lora_attached(model, factors: dict, strength: float = 1.0):
    """Run `model` with each named Linear computing W x + s B A x beside it (peft's unmerged forward)."""
    return hooks.attached(model, {path: _lora_hook(factor, strength) for path, factor in factors.items()})
