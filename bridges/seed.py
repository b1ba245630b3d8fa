"""SEED v1 (Ge et al. 2023): an image becomes 32 discrete causal codes, and codes become SD1.x conditioning.

Encoder: EVA-CLIP ViT-g/14 + LayerNorm (transformers' Blip2VisionModel: same EVA block with q/v biases, and
its post_layernorm is LAVIS's ln_vision) -> causal Q-Former (transformers' Blip2QFormerModel, with a
lower-triangular mask among the queries) -> Linear-Tanh-Linear -> nearest codebook entry.
De-tokenizer: codebook vectors -> Linear-Tanh-Linear -> + positional embedding -> 4 ViT blocks ->
non-causal reverse Q-Former with 77 learnt queries -> Linear -> (B, 77, 768) "generation embeddings" that
SD's UNet reads like CLIP text features.

State-dict keys here are the module's own (transformers naming); loaders/seed.py maps the official LAVIS keys.
"""
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from .config_record import ConfigRecord
from .errors import InputError
from .pixels import check_pixels

NUM_CODES = 32  # codes per image in SEED v1 (the causal Q-Former's query count)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LAVIS adds this to the scores of masked (future) queries; exp() of it is exactly 0 in fp16/fp32.
MASKED_SCORE = -10000.0


@dataclass
class SeedConfig(ConfigRecord):
    FIELDS_LABEL = "SEED config fields"
    # EVA-CLIP vision tower
    vision_width: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    patch_size: int = 14
    image_size: int = 224
    # causal Q-Former (BERT-base layout)
    hidden: int = 768
    num_queries: int = NUM_CODES
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    cross_attention_freq: int = 2
    # quantizer
    codebook_size: int = 8192
    code_dim: int = 32
    # de-tokenizer
    decoder_blocks: int = 4
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    reverse_queries: int = 77
    reverse_layers: int = 4
    reverse_heads: int = 12
    reverse_mlp: int = 3072
    reverse_cross_attention_freq: int = 2
    out_dim: int = 768

    @classmethod
    def from_dict(cls, d):
        return super().from_dict({k: int(v) for k, v in d.items()} if isinstance(d, dict) else d)


class Block(nn.Module):
    """The de-tokenizer's ViT block (LAVIS vit.Block): pre-norm, fused qkv with bias, GELU MLP, eps 1e-6."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp)
        self.mlp.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class Codebook(nn.Module):
    def __init__(self, size, dim):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    def nearest(self, z):
        """Indices of the nearest entries (Euclidean, no normalisation), with the reference's formula
        |z|^2 + |e|^2 - 2 z.e so that ties and near-ties round the same way."""
        flat = z.reshape(-1, z.shape[-1])
        e = self.embedding.weight
        d = (flat ** 2).sum(dim=1, keepdim=True) + (e ** 2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", flat, e.t())
        return d.argmin(dim=1).reshape(z.shape[:-1])


def _qformer(hidden, layers, heads, mlp, cross_freq, encoder_width):
    config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=mlp, cross_attention_frequency=cross_freq,
                                encoder_hidden_size=encoder_width, hidden_act="gelu", layer_norm_eps=1e-12,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                use_qformer_text_input=False, attn_implementation="eager")
    model = Blip2QFormerModel(config)
    for layer in model.encoder.layer:  # the text FFN (older transformers always build it): SEED drops it too
        for name in ("intermediate", "output"):
            if hasattr(layer, name):
                delattr(layer, name)
    return model


def _run_qformer(qformer, queries, encoder_states, self_mask):
    """Blip2QFormerModel.forward without its mask building (which differs between transformers releases):
    LayerNorm on the queries, then the layers with an additive (1, 1, Q, Q) self-attention mask or None."""
    x = qformer.layernorm(queries.to(qformer.layernorm.weight.dtype))
    out = qformer.encoder(x, attention_mask=self_mask, encoder_hidden_states=encoder_states.to(x.dtype),
                          encoder_attention_mask=None, query_length=x.shape[1])
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def causal_mask(n, dtype, device):
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~allowed, MASKED_SCORE)[None, None]


class SeedTokenizer(nn.Module):
    def __init__(self, config: SeedConfig):
        super().__init__()
        c = self.config = config
        self.vision = Blip2VisionModel(Blip2VisionConfig(
            hidden_size=c.vision_width, intermediate_size=c.vision_mlp, num_hidden_layers=c.vision_layers,
            num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size,
            hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, attention_dropout=0.0,
            attn_implementation="eager"))
        self.vision.post_layernorm.eps = 1e-5  # it is LAVIS's ln_vision: a default nn.LayerNorm, not eps 1e-6
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_queries, c.hidden))
        self.qformer = _qformer(c.hidden, c.qformer_layers, c.qformer_heads, c.qformer_mlp, c.cross_attention_freq,
                                c.vision_width)
        self.encode_task_layer = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.Tanh(),
                                               nn.Linear(c.hidden, c.code_dim))
        self.quantize = Codebook(c.codebook_size, c.code_dim)
        self.decode_task_layer = nn.Sequential(nn.Linear(c.code_dim, c.code_dim), nn.Tanh(),
                                               nn.Linear(c.code_dim, c.hidden))
        self.pos_embed_text = nn.Parameter(torch.zeros(1, c.num_queries, c.hidden))
        self.blocks_text = nn.ModuleList(Block(c.hidden, c.decoder_heads, c.decoder_mlp)
                                         for _ in range(c.decoder_blocks))
        self.reverse_tokens = nn.Parameter(torch.zeros(1, c.reverse_queries, c.hidden))
        self.reverse_qformer = _qformer(c.hidden, c.reverse_layers, c.reverse_heads, c.reverse_mlp,
                                        c.reverse_cross_attention_freq, c.hidden)
        self.distill_text_proj = nn.Linear(c.hidden, c.out_dim)

    @property
    def vision_dtype(self):
        return self.vision.embeddings.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.query_tokens.device

    def image_embeddings(self, pixels):
        """(B, 3, S, S) normalised pixels -> ln_vision(ViT) features (B, 1 + patches, width)."""
        out = self.vision(pixel_values=pixels.to(self.device, self.vision_dtype))
        return out.last_hidden_state

    def causal_embeddings(self, image_embeds):
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        mask = causal_mask(queries.shape[1], queries.dtype, queries.device)
        return _run_qformer(self.qformer, queries, image_embeds.float(), mask)

    def encode(self, pixels):
        """Normalised pixels -> codes (B, num_queries), int64."""
        z = self.encode_task_layer(self.causal_embeddings(self.image_embeddings(pixels)))
        return self.quantize.nearest(z)

    def decode(self, codes):
        """Codes (B, num_queries) -> generation embeddings (B, reverse_queries, out_dim) for SD's UNet."""
        x = self.decode_task_layer(self.quantize.embedding(codes.to(self.device)))
        x = x + self.pos_embed_text
        for block in self.blocks_text:
            x = block(x)
        queries = self.reverse_tokens.expand(x.shape[0], -1, -1)
        return self.distill_text_proj(_run_qformer(self.reverse_qformer, queries, x, None))


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, 3, size, size) as the reference prepares a PIL image:
    convert("RGB") (alpha dropped, grey repeated), Resize((size, size), BICUBIC) on 8-bit pixels (the aspect
    ratio is not kept, as in the reference), ToTensor, Normalize(CLIP mean, std)."""
    if images.ndim == 3:  # (B, H, W): a batch of grey pictures (a MASK)
        images = images[..., None]
    images = check_pixels(images, "the image for SEED")  # empty, 0-pixel, odd channels, NaN: refused by name
    if images.shape[-1] in (1, 2):  # grey, grey + alpha
        images = images[..., :1].expand(*images.shape[:-1], 3)
    else:
        images = images[..., :3]
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = []
    for array in pixels:
        resized = Image.fromarray(np.ascontiguousarray(array), "RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()))
    x = torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# Codes as text, written as SEED's later release writes them for its LLM (SEED-LLaMA, AILab-CVC/SEED main branch,
# MultiModalLLM/eval/eval_vqa.py): <img> opens an image, <img_00000>..<img_08191> are its codes, </img> closes it.
BOI_TOKEN = "<img>"
EOI_TOKEN = "</img>"
CODE_TOKEN = "<img_{:05d}>"
MAX_CODE_DIGITS = 9  # no codebook comes near a billion entries: longer numbers are refused before conversion
_SEPARATORS = re.compile(r"[\s,;\uff0c\uff1b\u3001]+")  # whitespace, commas, semicolons (also full-width ones)
_TEXT_TOKEN = re.compile(r"<img>|</img>|<img_([0-9]+)>")


def codes_text(row) -> str:
    """One image's codes as one line: <img><img_00012>...<img_08001></img>."""
    return BOI_TOKEN + "".join(CODE_TOKEN.format(int(c)) for c in row) + EOI_TOKEN


@dataclass
class SeedCodes:
    """What the SEED_TOKENS socket carries: one row of codes per image (int64, CPU)."""
    codes: torch.Tensor
    codebook_size: int = None  # of the model that made them; None when typed in

    def __post_init__(self):
        if self.codes.ndim != 2 or self.codes.shape[0] == 0:
            raise InputError(f"SEED codes must be (images, {NUM_CODES}); got shape {tuple(self.codes.shape)}")
        self.codes = self.codes.detach().to("cpu", torch.int64)

    def text(self) -> str:
        """One line per image, in SEED-LLaMA's token form (parse_codes reads it back)."""
        return "\n".join(codes_text(row) for row in self.codes)


def _shown(item: str) -> str:
    return repr(item if len(item) <= 24 else item[:24] + "...")


def _code_value(digits: str, number: int) -> int:
    if len(digits) > MAX_CODE_DIGITS:
        raise InputError(f"line {number}: {_shown(digits)} has {len(digits)} digits, far outside any SEED codebook "
                         f"(SEED v1's codes are 0 to 8191)")
    return int(digits)


def _token_images(line: str, number: int, count: int) -> list:
    """The images of one line in token form: <img><img_N>...</img> blocks (several allowed), or bare <img_N>
    tokens making one image. Whitespace between tokens is allowed; anything else is an error naming it."""
    images, current, blocks, bare, pos = [], None, 0, [], 0
    for m in _TEXT_TOKEN.finditer(line):
        gap = line[pos:m.start()]
        if gap.strip():
            raise InputError(f"line {number}: {gap.strip()[:40]!r} is not part of SEED codes; write {BOI_TOKEN}, "
                             f"{count} tokens like {CODE_TOKEN.format(42)} and {EOI_TOKEN} per image")
        pos = m.end()
        token = m.group(0)
        if token == BOI_TOKEN:
            if current is not None:
                raise InputError(f"line {number}: {BOI_TOKEN} opens an image inside another; close the first with "
                                 f"{EOI_TOKEN}")
            if bare:
                raise InputError(f"line {number}: codes before {BOI_TOKEN}; put every code inside "
                                 f"{BOI_TOKEN}...{EOI_TOKEN}")
            current = []
        elif token == EOI_TOKEN:
            if current is None:
                raise InputError(f"line {number}: {EOI_TOKEN} without {BOI_TOKEN} before it")
            images.append(current)
            blocks += 1
            current = None
        else:
            value = _code_value(m.group(1), number)
            if current is not None:
                current.append(value)
            elif blocks:
                raise InputError(f"line {number}: codes after {EOI_TOKEN}; put every code inside "
                                 f"{BOI_TOKEN}...{EOI_TOKEN}")
            else:
                bare.append(value)
    rest = line[pos:]
    if rest.strip():
        raise InputError(f"line {number}: {rest.strip()[:40]!r} is not part of SEED codes; write {BOI_TOKEN}, "
                         f"{count} tokens like {CODE_TOKEN.format(42)} and {EOI_TOKEN} per image")
    if current is not None:
        raise InputError(f"line {number}: {BOI_TOKEN} is never closed; end the image with {EOI_TOKEN}")
    if bare:
        images.append(bare)
    for i, row in enumerate(images):
        if len(row) != count:
            where = f"image {i + 1} of line {number}" if len(images) > 1 else f"line {number}"
            raise InputError(f"{where} has {len(row)} codes; an image takes exactly {count} SEED codes")
    return images


def _number_image(line: str, number: int, count: int) -> list:
    """One image written as `count` whole numbers. Digits of any script count by their value, as Python reads them
    (full-width '１２' and Arabic-Indic '١٢' are 12); signs, decimal points, exponents and other numerals are
    refused."""
    line = line.strip("[]()").strip()
    items = [t for t in _SEPARATORS.split(line.replace("[", " ").replace("]", " ")) if t]
    row = []
    for item in items:
        if not item.isdecimal():
            raise InputError(f"line {number}: {_shown(item)} is not a code; SEED codes are whole numbers from 0 to "
                             f"8191, {count} per line (or {BOI_TOKEN}{CODE_TOKEN.format(42)}...{EOI_TOKEN})")
        row.append(_code_value(item, number))
    if len(row) != count:
        raise InputError(f"line {number} has {len(row)} codes; an image takes exactly {count} SEED codes")
    return row


def parse_codes(text: str, count: int = NUM_CODES) -> torch.Tensor:
    """SEED codes written as text, one image per line, in either form:
    - SEED-LLaMA's tokens: <img><img_00012>...</img> (what SEED Tokenize and the SEED-LLM nodes write; several
      images on a line are allowed, and bare <img_N> tokens without the markers make one image);
    - `count` whole numbers separated by spaces, commas or semicolons ([ ] or ( ) around them allowed), as earlier
      versions wrote them (_number_image).
    Numbers of more than 9 digits are refused before conversion (far outside any codebook); whether a code is inside
    the loaded tokenizer's codebook is checked where the codes are used (check_codes). Errors are InputError naming
    the line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if "<" in line or ">" in line:
            rows.extend(_token_images(line, number, count))
        else:
            rows.append(_number_image(line, number, count))
    if not rows:
        raise InputError(f"no SEED codes in the text: write {count} codes per image, one image per line, as "
                         f"{BOI_TOKEN}{CODE_TOKEN.format(0)}...{EOI_TOKEN} or as whole numbers (0 to 8191)")
    return torch.tensor(rows, dtype=torch.int64)


def check_codes(codes: torch.Tensor, config: SeedConfig):
    if codes.shape[-1] != config.num_queries:
        raise InputError(f"an image takes exactly {config.num_queries} SEED codes; got {codes.shape[-1]}")
    bad = (codes < 0) | (codes >= config.codebook_size)
    if bad.any():
        image, position = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"SEED code {int(codes[image, position])} (image {image + 1}, position {position + 1}) is "
                         f"out of range: this tokenizer's codebook has {config.codebook_size} entries (0 to "
                         f"{config.codebook_size - 1})")


def mix_codes(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The first k codes of a, the rest from b. Causal codes make a prefix meaningful on its own.
    A batch of 1 pairs with every image of the other batch."""
    if a.shape[1] != b.shape[1]:
        raise InputError(f"the two code sets have {a.shape[1]} and {b.shape[1]} codes per image")
    if a.shape[0] != b.shape[0]:
        if 1 not in (a.shape[0], b.shape[0]):
            raise InputError(f"cannot pair {a.shape[0]} images with {b.shape[0]}: use equal batches, or one image")
        n = max(a.shape[0], b.shape[0])
        a, b = a.expand(n, -1), b.expand(n, -1)
    k = max(0, min(int(k), a.shape[1]))
    return torch.cat([a[:, :k], b[:, k:]], dim=1)
