"""GILL (Koh, Fried, Salakhutdinov 2023): [IMG] tokens on a frozen OPT, the GILLMapper into SD text space,
image inputs, retrieval heads and the generate-or-retrieve decision.

Module and parameter names follow the reference code (kohjingyu/gill: gill/models.py, gill/layers.py), so the
official state dict loads unchanged once its 'model.' prefix is dropped. Pure torch + transformers: the caller
places models on devices and turns the outputs into conditioning.

SDXL: GILL only ever targeted SD v1.5 (77 x 768). Every width here is read from the weights, so a mapper trained
for SDXL (`model` Linear(512, 2048)) plugs into the same code. SDXL also needs a pooled vector (1, 1280); the
pack's design for it is `pooled_model`, a Linear(mapper hidden, 1280) on the mean of the 77 decoder outputs
(the queries attend to one another, so every output has seen the whole [IMG] summary; the mean is the
order-free read-out). Train it with the same per-token L2 loss against CLIP-G's pooled output of the caption.
It is optional: its presence in the weights is what makes a mapper an SDXL mapper.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config_record import ConfigRecord
from .errors import InputError
from .llm_text import check_text
from .pixels import check_pixels

PLACEHOLDER = "<image>"
GENERATE, RETRIEVE = "generate", "retrieve"  # decision classes 0 and 1 of the reference decision model


class GILLInputError(InputError):
    """Something about the prompt or the inputs that the user can fix."""


@dataclass
class GILLConfig(ConfigRecord):
    FIELDS_LABEL = "GILL config fields"
    llm_dim: int = 4096  # OPT-6.7B's word_embed_proj_dim (= hidden size)
    num_img_tokens: int = 8  # [IMG0]..[IMG7]
    mapper_hidden: int = 512
    mapper_heads: int = 4  # not recoverable from the weights; the reference hard-codes 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    mapper_ffn: int = 2048
    out_tokens: int = 77
    out_dim: int = 768
    pooled_dim: int = 0  # 1280 for an SDXL mapper (pack extension), 0 for the official SD1.5 one
    ret_dim: int = 256
    vision_dim: int = 1024  # CLIP ViT-L/14 pooler_output
    visual_tokens: int = 4  # LLM tokens per input image
    decision_in: int = 0  # 0: no decision model; llm_dim: [IMG0] state; llm_dim + 1: plus the best retrieval score
    opt_version: str = ""
    visual_encoder: str = ""

    @classmethod
    def from_state_dict(cls, sd: dict, **extra) -> "GILLConfig":
        """Every width and count from the tensors' shapes (keys without the 'model.' prefix)."""
        g = "gen_text_hidden_fcs.0."
        fc, out, queries = sd[g + "fc.weight"], sd[g + "model.weight"], sd[g + "query_embs"]
        llm_dim = fc.shape[1]

        def count(prefix):
            return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

        decision = sd.get("decision_model.1.weight")
        vis = sd["visual_embeddings.weight"]
        return cls(llm_dim=llm_dim, num_img_tokens=sd["input_embeddings.weight"].shape[0],
                   mapper_hidden=fc.shape[0], encoder_layers=count(g + "tfm.encoder.layers."),
                   decoder_layers=count(g + "tfm.decoder.layers."),
                   mapper_ffn=sd[g + "tfm.encoder.layers.0.linear1.weight"].shape[0],
                   out_tokens=queries.shape[1], out_dim=out.shape[0],
                   pooled_dim=sd[g + "pooled_model.weight"].shape[0] if g + "pooled_model.weight" in sd else 0,
                   ret_dim=sd["visual_fc.weight"].shape[0], vision_dim=vis.shape[1],
                   visual_tokens=vis.shape[0] // llm_dim,
                   decision_in=decision.shape[1] if decision is not None else 0, **extra)


class GILLMapper(nn.Module):
    """The reference TextFcLayer(mode='gill_mapper'), plus the optional pooled head for SDXL."""

    def __init__(self, in_dim, out_dim, out_tokens=77, hidden=512, heads=4, encoder_layers=4, decoder_layers=4,
                 ffn=2048, pooled_dim=0):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first": nothing to act on
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.tfm = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden,
                                      num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers,
                                      dim_feedforward=ffn, dropout=0.0, nhead=heads)
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.zeros(1, out_tokens, hidden))
        self.pooled_model = nn.Linear(hidden, pooled_dim) if pooled_dim else None

    def forward(self, hidden: torch.Tensor, input_embs: torch.Tensor):
        """hidden, input_embs: (B, T, in_dim) -> tokens (B, out_tokens, out_dim), pooled (B, pooled_dim) or None."""
        x = self.fc(hidden + input_embs)
        y = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        pooled = self.pooled_model(y.mean(dim=1)) if self.pooled_model is not None else None
        return self.model(y), pooled


class _LinearHead(nn.Module):
    """The reference TextFcLayer(mode='linear'): its Linear is called `model`."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.model = nn.Linear(in_dim, out_dim)


class GILLModel(nn.Module):
    """Everything GILL trains (the OPT and the CLIP tower stay outside, frozen and shared)."""

    def __init__(self, config: GILLConfig):
        super().__init__()
        c = self.config = config
        self.input_embeddings = nn.Embedding(c.num_img_tokens, c.llm_dim)  # the learnt [IMG] rows only
        self.gen_text_hidden_fcs = nn.ModuleList([GILLMapper(
            c.llm_dim, c.out_dim, c.out_tokens, c.mapper_hidden, c.mapper_heads, c.encoder_layers, c.decoder_layers,
            c.mapper_ffn, c.pooled_dim)])
        self.ret_text_hidden_fcs = nn.ModuleList([_LinearHead(c.llm_dim, c.ret_dim)])
        self.visual_embeddings = nn.Linear(c.vision_dim, c.visual_tokens * c.llm_dim)
        self.visual_fc = nn.Linear(c.vision_dim, c.ret_dim)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.decision_model = (nn.Sequential(nn.Dropout(0.5), nn.Linear(c.decision_in, 2)) if c.decision_in
                               else None)

    @property
    def mapper(self) -> GILLMapper:
        return self.gen_text_hidden_fcs[0]

    def img_embeddings(self) -> torch.Tensor:
        return self.input_embeddings.weight

    def image_tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """CLIP pooler_output (N, vision_dim) -> (N, visual_tokens, llm_dim) LLM input embeddings."""
        return self.visual_embeddings(pooled).reshape(pooled.shape[0], self.config.visual_tokens, -1)

    def image_retrieval_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_fc(pooled), dim=-1)

    def text_retrieval_embedding(self, img_hidden: torch.Tensor) -> torch.Tensor:
        """(B, 8, llm_dim) [IMG] hidden states -> (B, ret_dim) unit vectors of [IMG0]. As the reference computes it
        (`ret_text_hidden_fcs[0](raw_emb, None)[:, 0]`): the Linear runs on all 8 states and the first row is kept,
        since a matrix product over 8 rows can round differently from one over a single row; no input embeddings
        are added."""
        return F.normalize(self.ret_text_hidden_fcs[0].model(img_hidden)[:, 0], dim=-1)

    def generation_embedding(self, img_hidden: torch.Tensor):
        """(B, 8, llm_dim) -> tokens (B, 77, out_dim), pooled or None; the [IMG] input embeddings are added."""
        embs = self.img_embeddings().to(img_hidden.dtype)[None].expand(img_hidden.shape[0], -1, -1)
        return self.mapper(img_hidden, embs)

    def needs_retrieval_score(self) -> bool:
        return self.config.decision_in == self.config.llm_dim + 1

    def retrieve_probability(self, img_hidden: torch.Tensor, best_cosine: float = None) -> float:
        """P(retrieve) from the decision model on the [IMG0] state. The variant trained with the best retrieval
        score also reads it, as the reference computes it: logit_scale.exp() * cosine."""
        if self.decision_model is None:
            raise GILLInputError("this GILL model has no decision model; put decision_model.pth.tar beside "
                                 "pretrained_ckpt.pth.tar (or convert again with it present)")
        x = img_hidden[:, 0]
        if self.needs_retrieval_score():
            if best_cosine is None:
                raise GILLInputError("this decision model also reads the best retrieval score: connect an image index")
            score = self.logit_scale.exp() * best_cosine
            x = torch.cat([x, score.reshape(1, 1).to(x)], dim=-1)
        return float(self.decision_model(x).softmax(dim=-1)[0, 1])


# ---- prompts with images ---------------------------------------------------------------------------------

def split_prompt(text: str, placeholder: str = PLACEHOLDER):
    """'a <image> b' -> ['a', 0, 'b']: text segments (stripped, empty ones dropped) and image numbers in order.
    Each segment is tokenized on its own, as the reference tokenizes each string of its interleaved list."""
    parts, pieces = [], check_text(text, "the GILL prompt", GILLInputError).split(placeholder)
    for i, piece in enumerate(pieces):
        if piece.strip():
            parts.append(piece.strip())
        if i < len(pieces) - 1:
            parts.append(i)
    return parts



@dataclass
class GILLInputs:
    embeds: torch.Tensor  # (1, T, llm_dim) in the LLM's dtype, ending with the [IMG] embeddings
    tokens: int  # T
    dropped: int  # leading positions cut to fit the context (0 when none)
    images_used: int


def build_inputs(embed_tokens, tokenizer, parts, image_embeds, img_embs, max_positions: int) -> GILLInputs:
    """The LLM input: interleaved text and image tokens, then [IMG0]..[IMG7].

    embed_tokens: the LLM's input embedding module; image_embeds: (n_images, visual_tokens, llm_dim);
    img_embs: (8, llm_dim). As in the reference, the BOS token comes with the first text segment only, wherever
    that segment is. When the whole does not fit in max_positions, the oldest context goes first (text tokens
    from the start, images whole) and the BOS moves to the front of what is kept.
    """
    weight = embed_tokens.weight
    segments, first_text = [], True
    for part in parts:
        if isinstance(part, int):
            if part >= image_embeds.shape[0]:
                raise GILLInputError(f"the prompt has more {PLACEHOLDER} placeholders than images: placeholder "
                                     f"{part + 1} has no image (connected: {image_embeds.shape[0]})")
            segments.append(["image", image_embeds[part].to(weight)])
            continue
        ids = tokenizer(part, add_special_tokens=first_text, return_tensors="pt")["input_ids"][0]
        first_text = False
        if len(ids):
            segments.append(["text", ids])
    img = img_embs.to(weight)
    total = sum(v.shape[0] for _, v in segments)
    budget = max_positions - img.shape[0]
    bos = None
    if total > budget:
        text = next((s for s in segments if s[0] == "text"), None)
        bos_id = tokenizer.bos_token_id
        if text is not None and bos_id is not None and text[1][0] == bos_id:
            bos, text[1] = text[1][:1], text[1][1:]
            budget -= 1
    if budget < 0:
        raise GILLInputError(f"the LLM's context ({max_positions} positions) cannot even hold the {img.shape[0]} "
                             f"[IMG] tokens")
    kept, used = [], 0
    for kind, value in reversed(segments):
        size = value.shape[0]
        if used + size <= budget:
            kept.append((kind, value))
            used += size
            continue
        if kind == "text" and used < budget:  # keep the end of this text
            kept.append((kind, value[size - (budget - used):]))
            used = budget
        break  # the oldest context goes; nothing before a cut is kept (no gaps in a story)
    kept.reverse()
    dropped = total - used - (1 if bos is not None else 0)
    device = weight.device
    pieces = [] if bos is None else [embed_tokens(bos.to(device))[None]]
    for kind, value in kept:
        if value.shape[0]:
            pieces.append(embed_tokens(value.to(device))[None] if kind == "text" else value[None].to(device))
    pieces.append(img[None].to(device))
    embeds = torch.cat(pieces, dim=1)
    images_used = sum(1 for kind, _ in kept if kind == "image")
    return GILLInputs(embeds=embeds, tokens=embeds.shape[1], dropped=dropped, images_used=images_used)


def img_hidden_states(model, inputs: GILLInputs, num_img_tokens: int) -> torch.Tensor:
    """Last-layer hidden states (after OPT's final layer norm) at the [IMG] positions: (1, 8, llm_dim) float32."""
    embeds = inputs.embeds
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, -num_img_tokens:].float()


# ---- images -----------------------------------------------------------------------------------------------

def squash_224(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, size, size, 3), resized without cropping as the reference
    does (`img.resize((224, 224))`) before CLIP's own preprocessing, which then leaves it as it is. Channels as
    the reference's PIL convert("RGB") gives them: grey repeated, alpha dropped. Pictures that are empty, have
    another channel count or hold NaN / infinite values are refused (bridges/pixels.py)."""
    images = check_pixels(images, "an image for GILL")
    rgb = images[..., :3] if images.shape[-1] >= 3 else images[..., :1].expand(*images.shape[:-1], 3)
    x = rgb.movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)
