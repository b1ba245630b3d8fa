"""Training settings, data and the deterministic batch schedule.

Determinism and resume: the batch of step s depends only on (seed, s), never on a generator advanced by earlier
steps, so "N steps" and "N/2 steps, stop, resume, N/2 steps" see the same batches and, with the optimizer state
restored, end with the same weights. Under DDP each rank takes an equal slice of the same global batch.
"""
import hashlib
from dataclasses import asdict, dataclass

import torch

from ..config_record import ConfigRecord

LOSSES = ("mse", "gill_l2")


@dataclass
class TrainConfig(ConfigRecord):
    FIELDS_LABEL = "training settings"
    steps: int = 500
    batch_size: int = 16  # the global batch: split over the ranks under DDP
    lr: float = 1e-3
    # The optimizer's fixed settings (no node input sets them; checkpoints record them, so a resume is checked
    # against them too).
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: int = 0  # linear warm-up steps, then constant
    grad_clip: float = 1.0  # 0 = off
    loss: str = "mse"  # "mse" (Beyond CLIP) or "gill_l2" (GILL's mean per-token L2 norm)
    pooled_weight: float = 1.0  # weight of the pooled-vector loss (SDXL) beside the token loss
    seed: int = 0
    val_fraction: float = 0.1
    eval_every: int = 50

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.eval_every < 1:
            raise ValueError(f"invalid training settings {asdict(self)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def resume_key(self):
        """What must match for a checkpoint to be continued (the step count may grow)."""
        d = self.to_dict()
        d.pop("steps")
        d.pop("eval_every")
        return d


@dataclass
class DistillData:
    """Per caption: the student's input (cached LLM, [IMG] or Idefics2 states) and the teacher's output."""
    inputs: torch.Tensor  # (N, T, in_dim) float
    last_token: torch.Tensor  # (N,) long: index of each prompt's last real token
    targets: torch.Tensor  # (N, 77, width): the CLIP encoder's tokens
    pooled: torch.Tensor = None  # (N, 1280) for SDXL, else None

    def __len__(self):
        return self.inputs.shape[0]

    def batch(self, idx: torch.Tensor, device=None, dtype=torch.float32):
        def take(t):
            return None if t is None else t[idx].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return take(self.inputs), take(self.last_token), take(self.targets), take(self.pooled)

    def without_pooled(self) -> "DistillData":
        return DistillData(self.inputs, self.last_token, self.targets, None)


@dataclass
class TokenData:
    """Per caption: the token ids the frozen LLM reads (the student trains through it) and the teacher's output."""
    ids: torch.Tensor  # (N, T) long, padded after last_token
    last_token: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N, 77, width)
    pooled: torch.Tensor = None

    def __len__(self):
        return self.ids.shape[0]

    def batch(self, idx: torch.Tensor, device=None):
        def take(t):
            return None if t is None else t[idx].to(device=device, dtype=torch.float32 if t.is_floating_point()
                                                    else t.dtype)
        return take(self.ids), take(self.last_token), take(self.targets), take(self.pooled)

    def without_pooled(self) -> "TokenData":
        return TokenData(self.ids, self.last_token, self.targets, None)


def split_indices(n: int, val_fraction: float, seed: int):
    """(train, val) index tensors: a seeded shuffle; at least one of each when n >= 2 and val_fraction > 0."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n >= 2 else 0
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def batch_for_step(train_idx: torch.Tensor, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The indices this rank trains on at `step`: its slice of a global batch that depends on (seed, step)
    only. Without replacement inside a batch when the split is large enough."""
    if batch_size % world:
        raise ValueError(f"the batch size {batch_size} must be divisible by the number of processes ({world})")
    g = torch.Generator().manual_seed(step_seed(seed, step))
    n = len(train_idx)
    pick = (torch.randperm(n, generator=g)[:batch_size] if batch_size <= n
            else torch.randint(n, (batch_size,), generator=g))
    return train_idx[pick[rank::world]]


def seeded_init(seed: int, build):
    """Build a module from a seeded RNG without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
