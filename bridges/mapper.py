"""The Beyond CLIP mapper: LLM hidden states -> the UNet's cross-attention space, one token at a time.

The paper says "multiple linear layers", hidden 512, output 768, and nothing about depth or activation, so
those are config fields stored with the weights. SDXL also needs a pooled vector (1280) that the paper never
had to produce: a second small MLP reads the hidden state of the prompt's last token, which in a causal LLM
has seen the whole prompt (the same role CLIP's end-of-text token plays for CLIP's own pooled output).
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import contract
from .config_record import ConfigRecord
from .encoder_record import EncoderRecord

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}

# The model families a mapper can target (their widths and pooled sizes: bridges/contract.py).
TARGETS = contract.TRAINABLE


@dataclass
class MapperConfig(ConfigRecord):
    FIELDS_LABEL = "mapper config fields"
    in_dim: int  # the LLM's hidden size (4096 for LLaMA-2-7B)
    target: str = "sd1"  # "sd1" (77 x 768) or "sdxl" (N x 2048 + pooled 1280)
    hidden_dim: int = 512
    depth: int = 2  # number of Linear layers in the token MLP
    activation: str = "gelu"
    num_tokens: int = 77  # prompts are padded or cut to this many tokens; 0 keeps the prompt's own length
    hidden_layer: int = -1  # the LLM layer the mapper was trained on (-1 = last)
    # which text encoder it was trained on (bridges/encoder_record.py EncoderRecord as a dict); None in files
    # written before the pack kept it
    encoder: dict = None

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown mapper target {self.target!r}; expected one of {sorted(TARGETS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.depth < 1 or self.in_dim < 1 or self.hidden_dim < 1 or self.num_tokens < 0:
            raise ValueError(f"invalid mapper config {asdict(self)}")
        if self.encoder is not None:
            record = EncoderRecord.from_dict(self.encoder)
            if record.width != self.in_dim:
                raise ValueError(f"the text-encoder record says {record.width} wide, the mapper reads {self.in_dim}")

    @property
    def out_dim(self) -> int:
        return contract.family_by_key(self.target).width

    @property
    def pooled_dim(self) -> int:
        return contract.family_by_key(self.target).pooled


def _mlp(in_dim, hidden_dim, out_dim, depth, activation):
    widths = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < depth - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class BeyondCLIPMapper(nn.Module):
    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        self.tokens = _mlp(config.in_dim, config.hidden_dim, config.out_dim, config.depth, config.activation)
        self.pooled = (_mlp(config.in_dim, config.hidden_dim, config.pooled_dim, 2, config.activation)
                       if config.pooled_dim else None)

    def forward(self, hidden: torch.Tensor, last_token):
        """hidden: (B, N, in_dim); last_token: index of the prompt's last real token, one int for the batch or a
        LongTensor (B,) (a batch of prompts that end at different tokens).
        Returns (tokens (B, N, out_dim), pooled (B, pooled_dim) or None)."""
        tokens = self.tokens(hidden)
        if self.pooled is None:
            return tokens, None
        if torch.is_tensor(last_token):
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token.to(hidden.device)]
        else:
            last = hidden[:, last_token]
        return tokens, self.pooled(last)
