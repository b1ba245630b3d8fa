"""RepAdapter (Luo et al. 2023) on the inputs of an LLM's linear layers, as Beyond CLIP uses it.

Two forms of the same adapters:
- unmerged (trainable): `attached(model, adapters)` feeds every target linear `adapter(x)` instead of x;
- merged (inference): `merge_factors` gives each linear's exact low-rank weight and bias change, which
  loaders/repadapters.py hands to ComfyUI as weight patches, so the adapted model costs exactly what the plain one
  does. (`merge_into` applies the same merge in place; the tests use it as an oracle.)
The adapter is linear (no activation), so the merge is exact in eval mode (dropout off).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import hooks


class RepAdapter(nn.Module):
    """`x + scale * conv_B(dropout(conv_A(x)))` on token-last input (..., in_features).

    Layout, names and init follow luogen1996/RepAdapter `repadapter.py`. Differences from it:
    `in_features` has no default (the reference defaults to 768, ViT-B), `dropout` is an argument
    (the reference hard-codes 0.1), and any number of leading dims is accepted (the reference
    transposes a (B, N, C) tensor to (B, C, N) and back).
    """

    def __init__(self, in_features, hidden_dim=8, groups=2, scale=1.0, dropout=0.1):
        super().__init__()
        if hidden_dim % groups or in_features % groups:
            raise ValueError(f"groups={groups} must divide hidden_dim={hidden_dim} "
                             f"and in_features={in_features}")
        self.conv_A = nn.Conv1d(in_features, hidden_dim, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.groups = groups
        self.scale = float(scale)
        nn.init.xavier_uniform_(self.conv_A.weight)
        nn.init.zeros_(self.conv_A.bias)
        # conv_B starts at zero, so a fresh adapter is the identity.
        nn.init.zeros_(self.conv_B.weight)
        nn.init.zeros_(self.conv_B.bias)

    def forward(self, x):
        # A kernel-1 Conv1d is a linear map over channels: apply it on the last dim, no transposes.
        h = self.dropout(F.linear(x, self.conv_A.weight.squeeze(-1), self.conv_A.bias))
        # Grouped conv_B: group g maps hidden slice g to output slice g.
        w_b = self.conv_B.weight.squeeze(-1).unflatten(0, (self.groups, -1))  # (G, in/G, r/G)
        y = torch.einsum("...gr,gor->...go", h.unflatten(-1, (self.groups, -1)), w_b).flatten(-2)
        return x + self.scale * (y + self.conv_B.bias)

    def dense_B(self):
        """conv_B as an (in_features, hidden_dim) block-diagonal matrix."""
        w_b = self.conv_B.weight.squeeze(-1).unflatten(0, (self.groups, -1))
        return torch.block_diag(*w_b)


class AdapterSet(nn.Module):
    """Adapters stored at the same module paths as the linears they adapt.

    Intermediate nodes are empty nn.Modules, so state_dict keys read
    "<linear path>.conv_A.weight" and load_state_dict works unchanged.
    """

    def __init__(self):
        super().__init__()
        self._paths = []

    def add(self, path, adapter):
        parent = self
        *parents, leaf = path.split(".")
        for name in parents:
            if name not in parent._modules:
                parent.add_module(name, nn.Module())
            parent = parent._modules[name]
        parent.add_module(leaf, adapter)
        self._paths.append(path)

    def items(self):
        return [(path, self.get_submodule(path)) for path in self._paths]

    def __getitem__(self, path):
        if path not in self._paths:
            raise KeyError(path)
        return self.get_submodule(path)

    def __contains__(self, path):
        return path in self._paths

    def __iter__(self):
        return iter(list(self._paths))

    def __len__(self):
        return len(self._paths)


def _excluded(name, exclude):
    return any(name == e or name.endswith("." + e) for e in exclude)


def find_linear_targets(model, exclude=("lm_head",)):
    """Paths of every nn.Linear in `model`, minus those whose path is or ends with an excluded name."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _excluded(name, exclude)]


def build_adapters(model, targets, hidden_dim=8, groups=2, scale=1.0, dropout=0.1):
    """One fresh (identity) RepAdapter per target linear, float32, on that linear's device."""
    adapters = AdapterSet()
    for path in targets:
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{path} is a {type(linear).__name__}, not an nn.Linear")
        adapter = RepAdapter(linear.in_features, hidden_dim, groups, scale, dropout)
        adapters.add(path, adapter.to(linear.weight.device))
    return adapters


def _input_hook(adapter):
    def hook(module, args):
        x = args[0]
        # Adapters may be kept in float32 under a half-precision LLM.
        adapted = adapter(x.to(adapter.conv_A.weight.dtype)).to(x.dtype)
        return (adapted,) + tuple(args[1:])
    return hook


def attached(model, adapters):
    """Run `model` with each target linear seeing `adapter(x)` as its (positional) input (forward pre-hooks)."""
    return hooks.attached(model, {path: _input_hook(adapter) for path, adapter in adapters.items()}, kind="pre")


@torch.no_grad()
def merge_factors(weight, bias, adapter):
    """Exact low-rank merge of `adapter` into the linear (weight, bias) that follows it, in float32.

    linear(adapter(x)) = W (x + s (B (A x + a) + b_B)) + b
                       = (W + up @ down) x + (b + bias_delta)
    with up = s W B (out x r), down = A (r x in), bias_delta = s W (B a + b_B), where B is the
    block-diagonal (in x r) form of the grouped conv_B. `bias` is unused: a linear without bias
    gets bias_delta as its whole bias. Eval-mode equivalence (dropout off).
    """
    w = weight.float()
    as_w = dict(device=w.device, dtype=torch.float32)
    dense_b = adapter.dense_B().to(**as_w)
    down, a_bias = adapter.conv_A.weight.squeeze(-1).to(**as_w), adapter.conv_A.bias.to(**as_w)
    up = adapter.scale * (w @ dense_b)
    bias_delta = adapter.scale * (w @ (dense_b @ a_bias + adapter.conv_B.bias.to(**as_w)))
    return up, down, bias_delta


@torch.no_grad()
def merge_into(model, adapters):
    """Fold `adapters` into `model`'s linears in place; returns `model`.

    A linear without bias gains one (= bias_delta), e.g. LLaMA's: a merged LLaMA needs
    attention_bias / mlp_bias in its config to be reloaded by transformers.
    """
    for path, adapter in adapters.items():
        linear = model.get_submodule(path)
        up, down, bias_delta = merge_factors(linear.weight, linear.bias, adapter)
        linear.weight.copy_(linear.weight.float() + up @ down)
        if linear.bias is None:
            linear.bias = nn.Parameter(bias_delta.to(linear.weight.dtype),
                                       requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.copy_(linear.bias.float() + bias_delta)
    return model
