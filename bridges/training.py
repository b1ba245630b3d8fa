"""Training the bridges on cached tensors: losses, deterministic batches, a resumable trainer, DDP.

Pure torch. Distillation is text only: the student is a mapper on frozen LLM hidden states, the teacher the
checkpoint's own CLIP text encoder(s); both are computed once per caption (by the loaders) and kept as
tensors, so a step costs only the mapper's forward and backward.

Determinism and resume: the batch of step s depends only on (seed, s), never on a generator advanced by
earlier steps, so "N steps" and "N/2 steps, stop, resume, N/2 steps" see the same batches and, with the
optimizer state restored, end with the same weights. Under DDP each rank takes an equal slice of the same
global batch and the gradients are averaged, so several processes train what one process would.
"""
import hashlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("mse", "gill_l2")


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 16  # the global batch: split over the ranks under DDP
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999  # GILL used (0.9, 0.95)
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

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resume_key(self):
        """What must match for a checkpoint to be continued (the step count may grow)."""
        d = self.to_dict()
        d.pop("steps")
        d.pop("eval_every")
        return d


# ---- losses -----------------------------------------------------------------------------------------------

def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """mse: mean squared error over every element (Beyond CLIP). gill_l2: the L2 norm of each token's error,
    averaged over tokens and batch (GILL's generation loss; not squared)."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "gill_l2":
        return (pred - target).norm(dim=-1).mean()
    raise ValueError(f"unknown loss {kind!r}")


def distill_loss(pred_tokens, pred_pooled, target_tokens, target_pooled, kind, pooled_weight=1.0):
    loss = token_loss(pred_tokens, target_tokens, kind)
    if pred_pooled is not None and target_pooled is not None:
        loss = loss + pooled_weight * token_loss(pred_pooled, target_pooled, kind)
    return loss


# ---- data -------------------------------------------------------------------------------------------------

@dataclass
class DistillData:
    """Per caption: the student's input and the teacher's output."""
    inputs: torch.Tensor  # (N, T, in_dim): LLM hidden states (Beyond CLIP) or [IMG] states (GILL)
    last_token: torch.Tensor  # (N,) long: index of each prompt's last real token
    targets: torch.Tensor  # (N, 77, width): the CLIP encoder's tokens
    pooled: torch.Tensor = None  # (N, 1280) for SDXL, else None

    def __len__(self):
        return self.inputs.shape[0]

    def batch(self, idx: torch.Tensor, device=None, dtype=torch.float32):
        def take(t):
            return None if t is None else t[idx].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return take(self.inputs), take(self.last_token), take(self.targets), take(self.pooled)


def split_indices(n: int, val_fraction: float, seed: int):
    """(train, val) index tensors: a seeded shuffle; at least one of each when n >= 2 and val_fraction > 0."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n >= 2 else 0
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def batch_for_step(train_idx: torch.Tensor, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """The indices this rank trains on at `step`: its slice of a global batch that depends on (seed, step)
    only. Without replacement inside a batch when the split is large enough."""
    if batch_size % world:
        raise ValueError(f"the batch size {batch_size} must be divisible by the number of processes ({world})")
    g = torch.Generator().manual_seed(_step_seed(seed, step))
    n = len(train_idx)
    pick = torch.randperm(n, generator=g)[:batch_size] if batch_size <= n else torch.randint(n, (batch_size,), generator=g)
    return train_idx[pick[rank::world]]


# ---- students ---------------------------------------------------------------------------------------------

class MapperStudent(nn.Module):
    """A Beyond CLIP mapper over a batch whose prompts end at different tokens (the mapper's own forward
    takes one last-token index for the whole batch). The forward runs through this module so DDP sees it."""

    def __init__(self, mapper):
        super().__init__()
        self.mapper = mapper

    def forward(self, hidden, last_token):
        m = self.mapper
        tokens = m.tokens(hidden)
        pooled = None
        if m.pooled is not None:
            pooled = m.pooled(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token])
        return tokens, pooled


class GILLStudent(nn.Module):
    """GILLMapper on cached [IMG] hidden states; the [IMG] input embeddings stay fixed (a buffer)."""

    def __init__(self, mapper, img_embs: torch.Tensor):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("img_embs", img_embs.detach().clone().float(), persistent=False)

    def forward(self, hidden, last_token=None):
        return self.mapper(hidden, self.img_embs[None].expand(hidden.shape[0], -1, -1).to(hidden.dtype))


# ---- MUMU connector: a student whose token count differs from the teacher's ------------------------------

def probe_attention(tokens: torch.Tensor, valid: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """What a cross-attention layer reads from a token set: for each probe query q, softmax(q . LN(k) / sqrt(D))
    weighted sum of the tokens. tokens (B, L, D), valid (B, L) bool or None, probes (P, D) -> (B, P, D).
    Invariant to the number and order of tokens; a zero probe gives the (masked) mean token."""
    keys = F.layer_norm(tokens, tokens.shape[-1:])  # the direction of each token decides its weight
    logits = torch.einsum("pd,bld->bpl", probes.to(tokens.dtype), keys) / tokens.shape[-1] ** 0.5
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bpl,bld->bpd", logits.softmax(-1), tokens)


def make_probes(count: int, dim: int, seed: int, temperature: float = 3.0) -> torch.Tensor:
    """A fixed bank of `count` probe queries: the zero probe (the mean token) and random directions scaled so
    their attention logits have a standard deviation of about `temperature` (peaked, not one-hot)."""
    g = torch.Generator().manual_seed(seed)
    probes = torch.randn(count, dim, generator=g) * temperature
    probes[0] = 0
    return probes


class ConnectorStudent(nn.Module):
    """The MUMU connector on cached Idefics2 states padded to a common length (positions after last_token are
    padding: masked out of every attention, so each caption is encoded as alone; see connector_forward).

    Token alignment: the connector maps Idefics2's L tokens (L varies with the caption, and with its images) to
    L SDXL-wide tokens, the teacher gives CLIP's 77; there is no position-to-position correspondence. The UNet
    reads the conditioning only through cross-attention, softmax(q k^T) v over the token set, which does not
    depend on how many tokens there are or in what order. So the token loss compares the two sets' answers to
    a fixed bank of probe queries (probe_attention: random directions over layer-normalised keys, plus the
    uniform query = the mean token); the pooled vector (SDXL's 1280) is compared directly."""

    def __init__(self, connector, probes: torch.Tensor):
        super().__init__()
        self.connector = connector
        self.register_buffer("probes", probes.detach().clone().float(), persistent=False)

    def forward(self, hidden, last_token):
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] <= last_token[:, None]
        tokens, pooled = connector_forward(self.connector, hidden, valid)
        return tokens, pooled, valid

    def loss(self, prediction, targets, target_pooled, kind, pooled_weight=1.0):
        tokens, pooled, valid = prediction
        loss = token_loss(probe_attention(tokens, valid, self.probes), probe_attention(targets, None, self.probes), kind)
        if pooled is not None and target_pooled is not None:
            loss = loss + pooled_weight * token_loss(pooled, target_pooled, kind)
        return loss


def connector_forward(connector, hidden: torch.Tensor, valid: torch.Tensor):
    """MUMUConnector.forward for a padded batch: the same layers, with the padding masked out of the
    transformer's self-attention and of the pooling attention (equal to the plain forward of each caption
    alone, which the tests check)."""
    pad = ~valid
    x = connector.in_proj(connector.in_norm(hidden.to(connector.in_proj.weight.dtype)))
    for layer in connector.layers:
        x = layer(x, src_key_padding_mask=pad)
    x = connector.out_norm(x)
    pooled = None
    if connector.pool is not None:
        p = connector.pool
        out, _ = p.attn(p.query.expand(x.shape[0], -1, -1), x, x, key_padding_mask=pad, need_weights=False)
        pooled = p.proj(p.norm(out[:, 0]))
    return connector.out_proj(x), pooled


# ---- the trainer ------------------------------------------------------------------------------------------

def seeded_init(seed: int, build):
    """Build a module from a seeded RNG without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def parameter_checksum(module: nn.Module) -> str:
    """Exact hash of every parameter's bytes: equal on two ranks only if their weights are identical."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class DistillTrainer:
    """Trains `student` (a MapperStudent / GILLStudent) on DistillData. Only parameters with requires_grad
    are optimised. `ddp=True` wraps the student in DistributedDataParallel (torch.distributed must be
    initialised, e.g. by torchrun); the caller then runs one trainer per rank."""

    def __init__(self, student: nn.Module, data: DistillData, config: TrainConfig, device="cpu", ddp=False):
        self.config = config
        self.device = torch.device(device)
        self.student = student.to(self.device).train()
        self.data = data
        self.train_idx, self.val_idx = split_indices(len(data), config.val_fraction, config.seed)
        if len(self.train_idx) == 0:
            raise ValueError("no training examples: give at least two captions")
        self.rank, self.world = 0, 1
        self.model = self.student
        if ddp:
            import torch.distributed as dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.history = []  # {"step", "train_loss", "val_loss"?}
        self.initial_val_loss = None

    def _lr(self, step):
        c = self.config
        return c.lr * min(1.0, (step + 1) / c.warmup) if c.warmup else c.lr

    def _loss(self, prediction, targets, pooled):
        """A student with its own `loss` (e.g. ConnectorStudent, whose token count is not the teacher's) computes
        it; the others give (tokens, pooled) compared position by position."""
        own = getattr(self.student, "loss", None)
        if own is not None:
            return own(prediction, targets, pooled, self.config.loss, self.config.pooled_weight)
        return distill_loss(*prediction, targets, pooled, self.config.loss, self.config.pooled_weight)

    def train_step(self) -> float:
        c = self.config
        idx = batch_for_step(self.train_idx, self.step, c.batch_size, c.seed, self.rank, self.world)
        inputs, last, targets, pooled = self.data.batch(idx, self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.model(inputs, last), targets, pooled)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        self.optimizer.step()
        self.step += 1
        value = loss.detach()
        if self.world > 1:  # report the global batch's loss, the same on every rank
            import torch.distributed as dist
            dist.all_reduce(value)
            value = value / self.world
        return float(value)

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> float:
        """Mean loss over the held-out split (every rank computes it whole: it is small)."""
        idx_all = self.val_idx if len(self.val_idx) else self.train_idx
        was_training = self.student.training
        self.student.eval()
        total, count = 0.0, 0
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            inputs, last, targets, pooled = self.data.batch(idx, self.device)
            loss = self._loss(self.student(inputs, last), targets, pooled)
            total += float(loss) * len(idx)
            count += len(idx)
        self.student.train(was_training)
        return total / count

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
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.initial_val_loss = state["initial_val_loss"]


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


# ---- the GILL decision model ------------------------------------------------------------------------------

def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                            lr: float = 1e-2, seed: int = 0, weight_decay: float = 1e-4, dropout: float = 0.5):
    """GILL's decision model, nn.Sequential(Dropout(0.5), Linear(in, classes)), fitted full-batch with AdamW
    and class-balanced cross-entropy. Returns the module (eval mode)."""
    model = seeded_init(seed, lambda: nn.Sequential(nn.Dropout(dropout), nn.Linear(features.shape[1], classes)))
    counts = torch.bincount(labels, minlength=classes).float().clamp(min=1)
    weight = counts.sum() / (classes * counts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # standardised inputs train faster; the scaling is folded back into the Linear at the end
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones(features.shape[1])
    x = (features - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels, weight=weight).backward()
            opt.step()
    with torch.no_grad():
        lin = model[1]
        lin.weight.div_(std)
        lin.bias.sub_(lin.weight @ mean)
    return model.eval()


def classification_report(predicted, labels, positive: int = 1) -> dict:
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    tp = int(((predicted == positive) & (labels == positive)).sum())
    fp = int(((predicted == positive) & (labels != positive)).sum())
    fn = int(((predicted != positive) & (labels == positive)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((predicted == labels).float().mean()) if len(labels) else 0.0, "f1": f1,
            "precision": precision, "recall": recall, "n": len(labels)}


# ---- Beyond CLIP stage 2: RepAdapter on the LLM, mapper frozen, L_cap + lambda * L_diffusion ---------------

class RepAdapterStudent(nn.Module):
    """LLM + RepAdapters (unmerged, the only trainable weights) -> frozen mapper, on token ids (B, T).

    The LLM and the mapper are held outside the module tree, so parameters(), state_dict() and checkpoints
    hold the adapters only and nothing the optimiser could touch is frozen weight."""

    def __init__(self, llm, adapters, mapper, hidden_layer: int = -1):
        super().__init__()
        self.adapters = adapters
        self._frozen = (llm, mapper)
        self.hidden_layer = hidden_layer

    def forward(self, ids, last_token):
        from .repadapter import attached
        llm, mapper = self._frozen
        device = next(llm.parameters()).device
        ids = ids.to(device)
        decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
        with attached(llm, self.adapters):
            # every position attended to, as llm_text.encode does for one prompt padded to the mapper's tokens
            out = (decoder or llm)(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                                   use_cache=False)
        hidden = out.hidden_states[self.hidden_layer].float()
        tokens = mapper.tokens(hidden)
        pooled = None
        if mapper.pooled is not None:
            pooled = mapper.pooled(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token.to(device)])
        return tokens, pooled


class Denoiser:
    """What stage 2 needs from the frozen diffusion model (the loaders wrap ComfyUI's MODEL in one):
    sigma(t) for integer timesteps t in [0, timesteps), noise_scaling(sigma, noise, latent) -> x_noisy, and
    denoise(x_noisy, sigma, tokens, pooled) -> the predicted clean latent."""
    timesteps: int = 1000

    def sigma(self, t):
        raise NotImplementedError

    def noise_scaling(self, sigma, noise, latent):
        raise NotImplementedError

    def denoise(self, x, sigma, tokens, pooled):
        raise NotImplementedError


def diffusion_loss(denoiser: Denoiser, latents, tokens, pooled, generator: torch.Generator):
    """Denoising loss of the conditioning: a random timestep and Gaussian noise per example (drawn from
    `generator` on the CPU, so a step's draw does not depend on the device), x0 predicted by the frozen UNet.
    Weighted by 1/sigma^2 per example: for an epsilon-prediction model (SD1.x) that is exactly the
    epsilon-MSE SD is trained with (x0 error = sigma * epsilon error), so no noise level swamps the others."""
    n = latents.shape[0]
    t = torch.randint(denoiser.timesteps, (n,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    sigma = denoiser.sigma(t.float()).to(latents)
    x = denoiser.noise_scaling(sigma, noise, latents)
    denoised = denoiser.denoise(x, sigma, tokens, pooled)
    per_example = (denoised.float() - latents.float()).pow(2).flatten(1).mean(1)
    return (per_example / sigma.float().pow(2)).mean()


class RepAdapterTrainer(DistillTrainer):
    """Stage 2 of Beyond CLIP: DistillData holds token ids (inputs (N, T, 1), exact in float32) and the CLIP
    targets; `latents` (N, C, h, w) the cached VAE latents of each caption's image (None: caption loss
    only). loss = L_cap + lambda_diffusion * L_diffusion. Noise, timesteps and adapter dropout of step s come
    from (seed, s) only, so resuming is exact."""

    def __init__(self, student: RepAdapterStudent, data: DistillData, latents, denoiser: Denoiser,
                 config: TrainConfig, lambda_diffusion: float = 0.1, device="cpu"):
        super().__init__(student, data, config, device=device)
        self.latents = latents
        self.denoiser = denoiser
        self.lambda_diffusion = float(lambda_diffusion)
        self.last_parts = {}

    def _losses(self, idx, generator):
        ids, last, targets, pooled = self.data.batch(idx, self.device)
        tokens, pred_pooled = self.student(ids[..., 0].round().long(), last)
        cap = distill_loss(tokens, pred_pooled, targets, pooled, self.config.loss, self.config.pooled_weight)
        diff = torch.zeros((), device=cap.device)
        if self.latents is not None and self.lambda_diffusion:
            latents = self.latents[idx].to(self.device)
            diff = diffusion_loss(self.denoiser, latents, tokens, pred_pooled, generator).to(cap.device)
        return cap, diff

    def _rng(self):
        """The global RNG is forked so the caller's state is left as it was."""
        return torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else [])

    def train_step(self) -> float:
        c = self.config
        idx = batch_for_step(self.train_idx, self.step, c.batch_size, c.seed)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.student.parameters() if p.requires_grad]
        seed = _step_seed(c.seed, self.step)
        with self._rng():
            torch.manual_seed(seed)  # the adapters' dropout
            cap, diff = self._losses(idx, torch.Generator().manual_seed(seed))
            loss = cap + self.lambda_diffusion * diff
            # gradients into the adapters only: the LLM, the mapper and the UNet stay untouched
            loss.backward(inputs=params)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.last_parts = {"caption": float(cap.detach()), "diffusion": float(diff.detach())}
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> float:
        """Held-out loss with a fixed draw of noise and timesteps (the same at every evaluation)."""
        idx_all = self.val_idx if len(self.val_idx) else self.train_idx
        was_training = self.student.training
        self.student.eval()
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, -1))
        total = 0.0
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            cap, diff = self._losses(idx, generator)
            total += float(cap + self.lambda_diffusion * diff) * len(idx)
        self.student.train(was_training)
        return total / len(idx_all)


# ---- trainable LoRA on named Linear layers of a frozen model (forward hooks; the model is never modified) ----

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
        from contextlib import ExitStack
        stack = ExitStack()
        scale = self.scale

        def hook_for(down, up):
            def hook(module, args, output):
                x = args[0]
                return output + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)) * scale
            return hook

        for path, down, up in zip(self.paths, self.down, self.up):
            stack.callback(model.get_submodule(path).register_forward_hook(hook_for(down, up)).remove)
        return stack


def linear_paths(model: nn.Module, pattern: str) -> list:
    """Paths of the nn.Linear layers of `model` whose path matches the regular expression."""
    import re
    rx = re.compile(pattern)
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(name))


# ---- MUMU stage 2: connector + LoRA on Idefics2 and on the UNet, trained with the UNet's denoising loss ------

class MUMUStage2Student(nn.Module):
    """Idefics2 (+ LoRA) -> connector -> (tokens, pooled) for one interleaved prompt. The trainable parts are
    submodules (connector, idefics2_lora, unet_lora); the frozen Idefics2 and UNet are held outside the module
    tree, so checkpoints and the optimiser see only what is trained."""

    def __init__(self, vlm, connector, idefics2_lora: LoRASet, unet, unet_lora: LoRASet, hidden_layer: int = -1):
        super().__init__()
        self.connector = connector
        self.idefics2_lora = idefics2_lora
        self.unet_lora = unet_lora
        self._frozen = (vlm, unet)
        self.hidden_layer = hidden_layer

    def forward(self, seq, pixels):
        from .mumu import encode
        vlm, _ = self._frozen
        with self.idefics2_lora.attached(vlm):
            hidden = encode(vlm, seq, pixels, self.hidden_layer)
        return self.connector(hidden.to(next(self.connector.parameters()).dtype))

    def unet_attached(self):
        return self.unet_lora.attached(self._frozen[1])


class _Count:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class PerExampleTrainer(DistillTrainer):
    """A trainer whose examples each take their own forward and backward (their token counts differ; it also
    bounds memory to one example through a frozen LLM or UNet), the batch's gradients accumulated. Subclasses give
    _example_loss(i, generator); noise drawn from `generator` and dropout come from (seed, step), so resuming is
    exact. The optimiser holds the parameters that require grad (subclasses may build their own)."""

    def _example_loss(self, i: int, generator) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self) -> float:
        c = self.config
        idx = batch_for_step(self.train_idx, self.step, c.batch_size, c.seed)
        warm = min(1.0, (self.step + 1) / c.warmup) if c.warmup else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("base_lr", c.lr) * warm
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        seed = _step_seed(c.seed, self.step)
        total = 0.0
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            for i in idx.tolist():
                loss = self._example_loss(i, generator) / len(idx)
                loss.backward(inputs=params)  # gradients into the trained parts only
                total += float(loss.detach())
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64) -> float:
        """Mean loss over the held-out examples (with a fixed draw of any noise)."""
        idx_all = self.val_idx if len(self.val_idx) else self.train_idx
        was_training = self.student.training
        self.student.eval()
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, -1))
        total = sum(float(self._example_loss(i, generator)) for i in idx_all.tolist())
        self.student.train(was_training)
        return total / len(idx_all)


class MUMUStage2Trainer(PerExampleTrainer):
    """MUMU's second stage: examples [(Sequence, crop pixels or None)] with the cached latents of their pictures,
    one forward and backward each. Three learning rates (MUMU: connector 1e-5,
    Idefics2 LoRA 3e-6, UNet LoRA 5e-6). Noise and timesteps of step s come from (seed, s): resume is exact."""

    def __init__(self, student: MUMUStage2Student, examples, latents, denoiser: Denoiser, config: TrainConfig,
                 lrs: dict, device="cpu"):
        if len(examples) != len(latents):
            raise ValueError(f"{len(examples)} examples for {len(latents)} latents")
        super().__init__(student, _Count(len(examples)), config, device=device)
        self.examples, self.latents, self.denoiser = examples, latents, denoiser
        groups = [{"params": list(getattr(student, part).parameters()), "base_lr": float(lrs[part]),
                   "lr": float(lrs[part]), "name": part}
                  for part in ("connector", "idefics2_lora", "unet_lora") if lrs.get(part)]
        for part in ("connector", "idefics2_lora", "unet_lora"):
            if not lrs.get(part):
                getattr(student, part).requires_grad_(False)  # learning rate 0: that part stays as it is
        if not groups:
            raise ValueError("every learning rate is 0: nothing to train")
        self.optimizer = torch.optim.AdamW(groups, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)

    def _example_loss(self, i: int, generator) -> torch.Tensor:
        seq, pixels = self.examples[i]
        tokens, pooled = self.student(seq, pixels)
        with self.student.unet_attached():
            return diffusion_loss(self.denoiser, self.latents[i:i + 1].to(self.device), tokens, pooled, generator)


# ---- GILL: the [IMG] input embeddings trained with the mapper, through the frozen LLM -----------------------

class GILLTokensStudent(nn.Module):
    """GILLMapper and GILL's learnt [IMG] input embeddings, both trained: a caption's token embeddings and the
    [IMG] rows go into the frozen LLM (held outside the module tree) every step, and its last-layer states at the
    [IMG] positions, plus the rows, into the mapper, as the encode node does."""

    def __init__(self, mapper, img_embs: torch.Tensor, llm):
        super().__init__()
        self.mapper = mapper
        self.img_embs = nn.Parameter(img_embs.detach().clone().float())
        self._frozen = (llm,)

    def forward(self, ids: torch.Tensor):
        llm = self._frozen[0]
        embed = llm.get_input_embeddings()
        rows = self.img_embs.to(embed.weight.dtype)[None]
        x = torch.cat([embed(ids.to(embed.weight.device)), rows], dim=1)
        out = llm(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                  output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, -rows.shape[1]:].float()
        return self.mapper(hidden, self.img_embs[None].to(hidden.device))


class GILLTokensTrainer(PerExampleTrainer):
    """DistillData whose inputs are each caption's token ids ((N, T, 1) float, exact; positions after
    last_token are padding and are not fed) and whose targets are the CLIP encodings."""

    def _example_loss(self, i: int, generator) -> torch.Tensor:
        ids, last, targets, pooled = self.data.batch(torch.tensor([i]), self.device)
        tokens, pred_pooled = self.student(ids[:, :int(last[0]) + 1, 0].round().long())
        return distill_loss(tokens, pred_pooled, targets, pooled, self.config.loss, self.config.pooled_weight)
