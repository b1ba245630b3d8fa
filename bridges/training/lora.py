"""Trainable LoRA factors on named Linear layers of a frozen model, run through forward hooks (the model itself is
never modified)."""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks


class LoRASet(nn.Module):
    """Rank-r LoRA factors for named nn.Linear layers of a frozen model: while attached, each layer computes
    W x + (alpha / r) B A x. A starts as peft's (Kaiming-uniform), B at zero, so training starts from the
    frozen model's own output. The factors live here, so parameters() / state_dict() hold the LoRA only."""

    def __init__(self, layers: dict, rank: int, alpha: float = None):
        """layers: module path -> (in_features, out_features)."""
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.paths = sorted(layers)
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for path in self.paths:
            fan_in, fan_out = layers[path]
            down = torch.empty(rank, fan_in)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(fan_out, rank)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def for_linears(cls, model: nn.Module, paths, rank: int, alpha: float = None) -> "LoRASet":
        layers = {}
        for path in paths:
            layer = model.get_submodule(path)
            layers[path] = (layer.in_features, layer.out_features)
        return cls(layers, rank, alpha)

    def factors(self) -> dict:
        """module path -> (down (r, in), up (out, r)), detached."""
        return {p: (d.detach(), u.detach()) for p, d, u in zip(self.paths, self.down, self.up)}

    def attached(self, model: nn.Module):
        scale = self.scale

        def hook_for(down, up):
            def hook(module, args, output):
                x = args[0]
                return output + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale
            return hook

        return hooks.attached(model, {path: hook_for(down, up) for path, down, up in zip(self.paths, self.down,
                                                                                          self.up)})


def linear_paths(model: nn.Module, pattern: str) -> list:
    """Paths of the nn.Linear layers of `model` whose path matches the regular expression."""
    rx = re.compile(pattern)
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(name))
