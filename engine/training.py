"""The host side of training, shared by every Train node and the command line: the teacher (the checkpoint's own
CLIP), the frozen diffusion model as a Denoiser, leaving ComfyUI's inference mode, the pictures' latents, and
run_training, which resumes, checkpoints and writes the result around the one Trainer."""
from contextlib import contextmanager
from pathlib import Path

import torch

from ..bridges import contract
from ..bridges.retrieval import fingerprint
from ..bridges.training.data import TrainConfig
from ..bridges.training.losses import Denoiser
from ..bridges.training.trainer import Trainer, parameter_checksum, resume_mismatch
from ..loaders import run_folder
from ..loaders.encode_cache import file_identity
from ..loaders.errors import LoadError
from ..loaders.training_inputs import load_square_image


@contextmanager
def training_context():
    """Nodes run under inference mode; training must leave it (and turn grad back on)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def clip_teacher(clip):
    """teacher(text) -> (tokens (1, 77, width), pooled (1, P) or None) from the checkpoint's own CLIP object:
    the same tokenize / encode_from_tokens path CLIPTextEncode takes."""
    def teacher(text):
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return cond[:, :77].float().cpu(), (pooled.float().cpu() if pooled is not None else None)
    return teacher


def clip_identity(clip) -> str:
    return fingerprint(dict(clip.cond_stage_model.state_dict()))


def target_of(data) -> str:
    """The model family ('sd1' or 'sdxl') a teacher's cached targets belong to."""
    width = data.targets.shape[-1]
    pooled = data.pooled.shape[-1] if data.pooled is not None else 0
    family = contract.family_of(width, pooled)
    if family is None or family.key not in contract.TRAINABLE:
        raise LoadError(f"the CLIP gives {width}-wide tokens" + (f" and a {pooled}-wide pooled vector" if pooled
                        else "") + f"; bridges are trained for SD1.x ({contract.SD1.width}) or SDXL "
                        f"({contract.SDXL.width} + pooled {contract.SDXL.pooled}). Connect the CLIP of an SD1.x or "
                        f"SDXL checkpoint.")
    return family.key


def leave_inference_mode(module: torch.nn.Module):
    """Weights made under ComfyUI's inference mode cannot be saved for backward, so gradients could not flow
    through the frozen LLM / UNet to the adapters: each such parameter or buffer is replaced by an equal
    ordinary tensor (the same bytes; ComfyUI's own weight patching replaces parameters the same way). This
    changes the shared model objects in place (numerically nothing)."""
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
    return module


@contextmanager
def clone_norm_inputs(module: torch.nn.Module):
    """While training through a ComfyUI UNet: every LayerNorm reads a copy of its input. Older ComfyUI
    transformer blocks add the attention output into the block's input in place (`x += n`) after a norm
    saved that input for backward, which autograd refuses; the copy is what the norm saves instead."""
    handles = [m.register_forward_pre_hook(lambda _, args: (args[0].clone(),) + tuple(args[1:]))
               for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()


class ComfyDenoiser(Denoiser):
    """The frozen diffusion model of a ComfyUI MODEL (loaded by the caller) as the diffusion loss's Denoiser:
    timesteps -> sigmas from its own model_sampling, x0 from its own apply_model (sigma in, denoised latent out)."""

    def __init__(self, model):
        self.base = model.model
        self.sampling = self.base.model_sampling
        self.timesteps = len(self.sampling.sigmas)

    def sigma(self, t):
        return self.sampling.sigma(t.to(self.sampling.sigmas.device))

    def noise_scaling(self, sigma, noise, latent):
        # the 2024 host multiplies noise by sigma without reshaping it
        return self.sampling.noise_scaling(sigma.view(-1, *[1] * (noise.ndim - 1)), noise, latent)

    def denoise(self, x, sigma, tokens, pooled):
        extra = {}
        if pooled is not None:
            # SDXL's vector input: the pooled text vector and the size embeddings, as the sampler builds them for
            # a plain text conditioning (width/height = the latent's size in pixels, no crop)
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            y = self.base.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                                     target_height=h)
            if y is not None:
                extra["y"] = y.to(x)
        return self.base.apply_model(x, sigma, c_crossattn=tokens, **extra)


def build_latent_cache(run: Path, images, vae, model, resolution: int, progress=None) -> torch.Tensor:
    """(N, C, h, w) latents of the pictures as the UNet sees them (vae.encode, then the model's
    process_latent_in), computed once per (pictures, VAE, resolution) and kept in the run folder."""
    identity = {"images": [f"{p}:{file_identity(p)}" for p in images], "resolution": resolution,
                "vae": fingerprint(dict(vae.first_stage_model.state_dict())),
                "latent_format": type(model.model.latent_format).__name__}
    path = run_folder.latents_path(run, identity)
    cached = run_folder.read_tensors(path, run_folder.LATENTS_FORMAT) if path.is_file() else None
    if cached is not None:
        return cached["latents"]
    latents = []
    for i, image in enumerate(images):
        # seeded: some hosts' VAE encode draws from the posterior, and runs must agree on their latents
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(i)
            raw = vae.encode(load_square_image(image, resolution))
            latents.append(model.model.process_latent_in(raw.float().cpu())[0])
        if progress is not None:
            progress(i + 1, len(images))
    run_folder.write_tensors(path, {"latents": torch.stack(latents)}, {"format": run_folder.LATENTS_FORMAT})
    return run_folder.read_tensors(path, run_folder.LATENTS_FORMAT)["latents"]


def run_training(run: Path, trainer: Trainer, start_info: dict, write_result, *, resume=True, on_step=None,
                 checkpoint_every=100, is_main=True, cache_path=None) -> Trainer:
    """Train, resuming from run/checkpoint.pt when asked and its settings match `start_info` and the training
    settings. Checkpoints every `checkpoint_every` steps, at the end, and when on_step raises (interruption): the
    exception propagates once the checkpoint is safe. The main process then calls write_result() (-> the path
    written) and writes history.json."""
    config: TrainConfig = trainer.config
    start_info = {**start_info, "train_config": config.resume_key(), "examples": trainer.task.n_examples}
    if resume:
        saved = run_folder.load_checkpoint(run)
        if saved is not None:
            _resume(run, trainer, saved, start_info)

    def checkpoint():
        if is_main:
            run_folder.save_checkpoint(run, {**trainer.state_dict(), **start_info})

    def step(s, loss, val):
        if on_step is not None:
            try:
                on_step(s, loss, val)
            except BaseException:
                checkpoint()
                raise
        if checkpoint_every and s % checkpoint_every == 0:
            checkpoint()

    trainer.run(on_step=step)
    checkpoint()
    if is_main:
        out_path = write_result()
        run_folder.write_history(run, {
            "result": str(out_path), "steps": trainer.step, "history": trainer.history,
            "initial_val_loss": trainer.initial_val_loss, "final_val_loss": trainer.last_val_loss(),
            "train_examples": len(trainer.train_idx), "val_examples": len(trainer.val_idx),
            "cache": str(cache_path) if cache_path else None, **start_info,
            "checksum": parameter_checksum(trainer.student)})
    return trainer


# The start_info entry that says which kind of run a checkpoint belongs to (one per trainer).
RUN_KINDS = {"mapper_config": "Beyond CLIP mapper", "repadapter": "RepAdapter (stage 2)", "gill_config": "GILL mapper",
             "connector_config": "MUMU connector", "mumu_stage2": "MUMU stage 2"}


def _kind(info: dict):
    return next((label for key, label in RUN_KINDS.items() if key in info), None)


def _resume(run: Path, trainer: Trainer, saved: dict, start_info: dict):
    where = run / run_folder.CHECKPOINT
    saved_kind, kind = _kind(saved), _kind(start_info)
    if saved_kind != kind:
        raise LoadError(f"{where} holds the state of {'a ' + saved_kind if saved_kind else 'another kind of'} "
                        f"training run, not of this {kind or ''} run. {run_folder.RESUME_ADVICE}")
    differ = resume_mismatch({k: saved.get(k) for k in start_info}, start_info)
    if differ:
        raise LoadError(f"{where} was made with other settings ({', '.join(differ)} differ); use the same settings to "
                        f"resume. {run_folder.RESUME_ADVICE}")
    if int(saved["step"]) > trainer.config.steps:
        raise LoadError(f"{where} is at step {saved['step']}, past the {trainer.config.steps} steps asked for; ask "
                        f"for more steps or switch 'resume' off.")
    try:
        trainer.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise LoadError(f"{where} does not hold this run's training state: {str(e)[:300]}. "
                        f"{run_folder.RESUME_ADVICE}") from None
