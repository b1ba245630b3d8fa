"""A de-tokenizer head that lets SEED codes condition SDXL.

SEED's de-tokenizer ends in 77 x 768 "generation embeddings" made to stand in for SD1.x's CLIP text features. SDXL
reads 77 x 2048 tokens (CLIP-L's 768 beside OpenCLIP-bigG's 1280) and bigG's 1280-wide pooled vector. The head
maps SEED's embeddings token by token to SDXL's width (an MLP, as the Beyond CLIP mapper maps LLM states), and
their mean to the pooled vector (SEED's reverse Q-Former is not causal: no one position summarises the codes the
way CLIP's end token does). It is distilled onto an SDXL checkpoint's own CLIP encoding of each picture's caption.
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import contract
from .config_record import ConfigRecord
from .mapper import ACTIVATIONS, _mlp


@dataclass
class SeedSDXLHeadConfig(ConfigRecord):
    FIELDS_LABEL = "SEED SDXL head config fields"
    in_dim: int = 768  # SEED's generation embeddings (SeedConfig.out_dim)
    hidden_dim: int = 1024
    depth: int = 2
    activation: str = "gelu"
    out_dim: int = contract.SDXL.width
    pooled_dim: int = contract.SDXL.pooled

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if min(self.in_dim, self.hidden_dim, self.depth, self.out_dim, self.pooled_dim) < 1:
            raise ValueError(f"invalid SEED SDXL head config {asdict(self)}")


class SeedSDXLHead(nn.Module):
    def __init__(self, config: SeedSDXLHeadConfig):
        super().__init__()
        self.config = config
        self.tokens = _mlp(config.in_dim, config.hidden_dim, config.out_dim, config.depth, config.activation)
        self.pooled = _mlp(config.in_dim, config.hidden_dim, config.pooled_dim, 2, config.activation)

    def forward(self, embeddings: torch.Tensor, last_token=None):
        """(B, 77, in_dim) SEED generation embeddings -> (tokens (B, 77, 2048), pooled (B, 1280)). last_token is
        ignored (the distillation task passes it to every student)."""
        return self.tokens(embeddings), self.pooled(embeddings.mean(dim=1))
