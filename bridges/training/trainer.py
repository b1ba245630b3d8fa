"""The one trainer: the run loop, the RNG, evaluation, checkpoint state and DDP, for every bridge the pack trains.
A task (tasks.py) supplies what differs: the module that holds what is trained, its examples and its loss."""
import hashlib
import math

import torch
import torch.distributed as dist
from torch import nn

from .data import TrainConfig, batch_for_step, split_indices, step_seed


class Task:
    """What a family gives the trainer.

    module: an nn.Module holding everything trained (its state dict is the checkpoint; under DDP its forward is
    what the processes share). n_examples: how many examples. loss(idx, generator, forward): the mean loss over
    the examples idx (a LongTensor), with random draws from `generator` (seeded per step) and the module called
    through `forward` (the DDP wrapper when there is one). Examples that take their own forward and backward
    (different token counts, or one example through a frozen LLM or UNet at a time) set per_example: the batch's
    gradients are then accumulated example by example."""
    module: nn.Module
    n_examples: int
    per_example = False
    backward_to_trained_only = False  # backward(inputs=trained params): gradients never reach frozen weights

    def loss(self, idx: torch.Tensor, generator: torch.Generator, forward) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self, config: TrainConfig) -> list:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [{"params": params, "base_lr": config.lr}]

    def groups(self, idx: torch.Tensor, evaluating: bool) -> list:
        if self.per_example:
            return [idx[i:i + 1] for i in range(len(idx))]
        if evaluating:
            return [idx[start:start + 64] for start in range(0, len(idx), 64)]
        return [idx]


class Trainer:
    """Trains a Task. Only parameters with requires_grad are optimised. ddp=True wraps the task's module in
    DistributedDataParallel (torch.distributed must be initialised, e.g. by torchrun); the caller then runs one
    trainer per rank, each on its slice of every global batch.

    Determinism: the batch, the random draws and dropout of step s come from (seed, s) only, so a resumed run
    equals an uninterrupted one."""

    def __init__(self, task: Task, config: TrainConfig, device="cpu", ddp=False):
        self.task, self.config = task, config
        self.device = torch.device(device)
        self.student = task.module.to(self.device).train()
        self.train_idx, self.val_idx = split_indices(task.n_examples, config.val_fraction, config.seed)
        if len(self.train_idx) == 0:
            raise ValueError("no training examples: give at least two")
        self.rank, self.world = 0, 1
        self.forward = self.student
        if ddp:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        groups = task.param_groups(config)
        for group in groups:
            group["lr"] = group["base_lr"]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.history = []  # {"step", "train_loss", "val_loss"?}
        self.initial_val_loss = None

    def _rng(self):
        """Forks the global RNG, so the caller's state is left as it was."""
        return torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else [])

    def train_step(self) -> float:
        c = self.config
        idx = batch_for_step(self.train_idx, self.step, c.batch_size, c.seed, self.rank, self.world)
        warm = min(1.0, (self.step + 1) / c.warmup) if c.warmup else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("base_lr", c.lr) * warm  # checkpoints of earlier versions have no base_lr
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        seed = step_seed(c.seed, self.step)
        groups = self.task.groups(idx, evaluating=False)
        total = 0.0
        with self._rng():
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)  # noise and timesteps
            for group in groups:
                loss = self.task.loss(group, generator, self.forward)
                if len(groups) > 1:
                    loss = loss / len(groups)
                if self.task.backward_to_trained_only:
                    loss.backward(inputs=params)
                else:
                    loss.backward()
                total += float(loss.detach())
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.world > 1:  # report the global batch's loss, the same on every rank
            value = torch.tensor(total, device=self.device)
            dist.all_reduce(value)
            total = float(value / self.world)
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the held-out split (every rank computes it whole: it is small), with a fixed draw of any
        noise, the same at every evaluation."""
        idx_all = self.val_idx if len(self.val_idx) else self.train_idx
        was_training = self.student.training
        self.student.eval()
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, -1))
        total = 0.0
        for group in self.task.groups(idx_all, evaluating=True):
            total += float(self.task.loss(group, generator, self.student)) * len(group)
        self.student.train(was_training)
        return total / len(idx_all)

    def run(self, on_step=None, should_stop=None):
        """Train up to config.steps. on_step(step, train_loss, val_loss or None) after every step (it may
        raise to stop: the state stays consistent, the last finished step counts)."""
        c = self.config
        if self.initial_val_loss is None:
            self.initial_val_loss = self.evaluate()
            self.history.append({"step": self.step, "val_loss": self.initial_val_loss})
        while self.step < c.steps:
            train_loss = self.train_step()
            val = self.evaluate() if self.step % c.eval_every == 0 or self.step == c.steps else None
            entry = {"step": self.step, "train_loss": train_loss}
            if val is not None:
                entry["val_loss"] = val
            self.history.append(entry)
            if on_step is not None:
                on_step(self.step, train_loss, val)
            if should_stop is not None and should_stop():
                break
        return self.history

    def last_val_loss(self):
        return next((h["val_loss"] for h in reversed(self.history) if "val_loss" in h), None)

    # -- checkpoints: plain containers of tensors and numbers (loadable with weights_only=True) --
    def state_dict(self) -> dict:
        return {"step": self.step, "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "history": list(self.history),
                "initial_val_loss": self.initial_val_loss, "train_config": self.config.resume_key()}

    def load_state_dict(self, state: dict):
        """Everything is checked before anything changes: a checkpoint of another run is refused whole (ValueError
        saying what differs), never half-loaded."""
        check_state(self, state)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.initial_val_loss = state["initial_val_loss"]


def _shape(t):
    return tuple(t.shape) if torch.is_tensor(t) else type(t).__name__


def check_state(trainer: Trainer, state) -> None:
    """ValueError naming what a checkpoint lacks or holds in another shape than this run's trainer: its entries,
    the student's tensors, the optimizer's groups and per-parameter state."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a trainer state")
    lacking = [k for k in ("step", "student", "optimizer", "history", "initial_val_loss") if k not in state]
    if lacking:
        raise ValueError(f"it lacks the entries {lacking}")
    student, own = state["student"], trainer.student.state_dict()
    if not isinstance(student, dict):
        raise ValueError("its 'student' entry is not a state dict")
    missing, unexpected = sorted(set(own) - set(student)), sorted(set(student) - set(own))
    wrong = [f"{k}: {_shape(student[k])} saved, {tuple(v.shape)} now" for k, v in own.items()
             if k in student and _shape(student[k]) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = ([f"lacks {len(missing)} trained tensor(s) e.g. {missing[:3]}"] if missing else []) + \
                ([f"holds {len(unexpected)} other tensor(s) e.g. {unexpected[:3]}"] if unexpected else []) + \
                ([f"holds tensors of other shapes: {wrong[:3]}"] if wrong else [])
        raise ValueError("its trained weights are another model's: " + "; ".join(parts))
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not isinstance(optimizer.get("state"), dict):
        raise ValueError("its 'optimizer' entry is not an optimizer state")
    groups = trainer.optimizer.param_groups
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in optimizer["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise ValueError(f"its optimizer holds parameter groups of sizes {sizes}, this run's "
                         f"{[len(g['params']) for g in groups]}")
    params = [p for g in groups for p in g["params"]]
    ids = [i for g in optimizer["param_groups"] for i in g["params"]]
    for index, param in zip(ids, params):
        for name, value in (optimizer["state"].get(index) or {}).items():
            if torch.is_tensor(value) and value.ndim and tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"its optimizer state '{name}' of parameter {index} is {tuple(value.shape)}, the "
                                 f"parameter {tuple(param.shape)}")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"its step {state['step']!r} is not a step count")
    if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
        raise ValueError("its history is not a list of loss records")
    if state["initial_val_loss"] is not None and not isinstance(state["initial_val_loss"], (int, float)):
        raise ValueError(f"its initial_val_loss {state['initial_val_loss']!r} is not a number")


def resume_mismatch(saved: dict, current: dict, prefix: str = "") -> list:
    """Names of the settings that differ between a checkpoint and this run, e.g. 'train_config.lr (0.001 vs
    0.01)', nested dicts followed."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_mismatch(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} then, {b!r} now)")
    return out


def fell_by(history) -> float:
    """How many times the held-out loss fell from its first to its last measurement."""
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    if len(vals) < 2 or vals[-1] <= 0:
        return math.inf if vals and vals[-1] == 0 else 1.0
    return vals[0] / vals[-1]


def parameter_checksum(module: nn.Module) -> str:
    """Exact hash of every parameter's bytes: equal on two ranks only if their weights are identical."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
