"""The losses the bridges are trained with."""
import torch
import torch.nn.functional as F


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


class Denoiser:
    """What the diffusion loss needs from the frozen diffusion model (engine/training.py wraps ComfyUI's MODEL in
    one): sigma(t) for integer timesteps t in [0, timesteps), noise_scaling(sigma, noise, latent) -> x_noisy, and
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
