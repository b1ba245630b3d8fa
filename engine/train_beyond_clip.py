"""Training Beyond CLIP's bridges: the mapper (stage 1, distilled onto the checkpoint's own CLIP), RepAdapters on
the LLM (stage 2, caption loss + the frozen UNet's denoising loss), and the chat/draw router."""
from dataclasses import dataclass
from pathlib import Path

from ..bridges.errors import InputError, LoadError
from ..bridges.mapper import BeyondCLIPMapper, MapperConfig
from ..bridges.repadapter import build_adapters, find_linear_targets
from ..bridges.router import NaiveBayesRouter
from ..bridges.training.classify import classification_report
from ..bridges.training.data import DistillData, TrainConfig, seeded_init, split_indices
from ..bridges.training.tasks import DistillTask, MapperStudent, RepAdapterStudent, RepAdapterTask
from ..bridges.training.trainer import Trainer
from ..loaders.mappers import save_mapper
from ..loaders.repadapters import save_repadapter
from . import llm as llm_engine
from .encoder_identity import record_of
from .training import clip_identity, clip_teacher, run_training

MAPPER_TOKENS = 77  # what the mapper is trained to emit: CLIP's token count


@dataclass
class CacheSpec:
    """What a run's cache is made of: input_fn(text) -> (student input (1, T[, D]), last real token), the teacher,
    and the identity that names the cache (the node and the command line build it here, so either reuses the
    other's cache)."""
    input_fn: object
    teacher: object
    identity: dict


def mapper_cache_spec(llm, clip, hidden_layer: int, template: str) -> CacheSpec:
    """The LLM's hidden states of each caption (padded to 77 tokens) against the CLIP's encoding."""
    def input_fn(text):
        enc = llm_engine.hidden_states(llm, text, hidden_layer=hidden_layer, num_tokens=MAPPER_TOKENS,
                                       template=template)
        return enc.hidden.cpu(), enc.last_token

    # the text encoder's record goes into the cache's identity, so a mapper trained from the cache alone (the
    # command line) still records which encoder it reads
    return CacheSpec(input_fn, clip_teacher(clip), {
        "student": "beyond_clip", "llm": llm.identity, "clip": clip_identity(clip), "hidden_layer": hidden_layer,
        "template": template, "num_tokens": MAPPER_TOKENS,
        "encoder": record_of(llm, hidden_layer, template).to_dict()})


def token_cache_spec(llm, clip, num_tokens: int, template: str) -> CacheSpec:
    """Each caption's token ids (what hidden_states feeds the LLM) against the CLIP's encoding: stage 2 runs the
    LLM with its adapters in every step."""
    def input_fn(text):
        p = llm_engine.prompt_ids(llm, text, num_tokens=num_tokens, template=template)
        return p.ids, p.last_token

    return CacheSpec(input_fn, clip_teacher(clip), {
        "student": "token_ids.v2", "llm": llm.identity, "clip": clip_identity(clip), "template": template,
        "num_tokens": num_tokens})


def train_mapper(run: Path, data: DistillData, mapper_config: MapperConfig, train_config: TrainConfig, out_path,
                 *, device="cpu", ddp=False, **kwargs):
    """A Beyond CLIP mapper distilled on `data`, written to out_path (see run_training for the rest).
    Returns (mapper module, trainer)."""
    if data.inputs.shape[-1] != mapper_config.in_dim:
        raise LoadError(f"the cache holds {data.inputs.shape[-1]}-wide LLM states but the mapper reads "
                        f"{mapper_config.in_dim}; the cache belongs to another LLM")
    if not mapper_config.pooled_dim and data.pooled is not None:
        data = data.without_pooled()  # SD1's pooled output is unused
    mapper = seeded_init(train_config.seed, lambda: BeyondCLIPMapper(mapper_config))
    trainer = Trainer(DistillTask(MapperStudent(mapper), data, train_config), train_config, device=device, ddp=ddp)

    def write():
        save_mapper(out_path, mapper.eval())
        return out_path

    run_training(run, trainer, {"mapper_config": mapper_config.to_dict()}, write, **kwargs)
    return mapper.eval().requires_grad_(False), trainer


def train_repadapter(run: Path, data, latents, llm_module, mapper, denoiser, train_config: TrainConfig,
                     out_path, *, hidden_dim=8, groups=2, scale=1.0, dropout=0.1, hidden_layer=-1,
                     lambda_diffusion=0.1, device="cpu", mapper_identity="", **kwargs):
    """Beyond CLIP stage 2: fresh RepAdapters on every linear of `llm_module` (lm_head excepted) trained with
    L_cap + lambda * L_diffusion, mapper / LLM / UNet frozen; written with save_repadapter. The LLM and the mapper
    module must already sit on `device` as ordinary (non-inference) tensors. data: TokenData.
    Returns (adapters in eval mode, trainer)."""
    if data.targets.shape[-1] != mapper.config.out_dim:
        raise LoadError(f"the CLIP gives {data.targets.shape[-1]}-wide tokens but the mapper writes "
                        f"{mapper.config.out_dim}; connect the CLIP of the checkpoint the mapper was trained for")
    if latents is not None and len(latents) != len(data):
        raise LoadError(f"{len(latents)} latents for {len(data)} captions")
    if mapper.pooled is None and data.pooled is not None:
        data = data.without_pooled()
    targets = find_linear_targets(llm_module)
    adapters = seeded_init(train_config.seed, lambda: build_adapters(llm_module, targets, hidden_dim, groups, scale,
                                                                     dropout))
    task = RepAdapterTask(RepAdapterStudent(llm_module, adapters, mapper, hidden_layer), data, latents, denoiser,
                          train_config, lambda_diffusion)
    trainer = Trainer(task, train_config, device=device)

    def write():
        save_repadapter(out_path, adapters.eval(), hidden_dim, groups, scale)
        return out_path

    info = {"repadapter": {"hidden_dim": hidden_dim, "groups": groups, "scale": scale, "dropout": dropout,
                           "hidden_layer": hidden_layer, "lambda_diffusion": lambda_diffusion,
                           "mapper": mapper_identity, "images": latents is not None}}
    run_training(run, trainer, info, write, **kwargs)
    return adapters.eval().requires_grad_(False), trainer


def train_router(texts, labels, *, alpha=1.0, bigrams=True, val_fraction=0.0, seed=0):
    """(router fitted on every example, held-out report text, held-out accuracy or nan). The held-out figures come
    from a router fitted on the training split only."""
    unknown = sorted(set(labels) - {"chat", "draw"})
    if unknown or len(set(labels)) < 2:
        raise InputError(f"the examples need both labels, 'chat' and 'draw'; found only {sorted(set(labels))}")
    train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
    report, accuracy = "", float("nan")
    if len(val_idx):
        held = NaiveBayesRouter(alpha, bigrams).fit([texts[i] for i in train_idx], [labels[i] for i in train_idx])
        predicted = [int(held.predict(texts[i])[0] == "draw") for i in val_idx]
        stats = classification_report(predicted, [int(labels[i] == "draw") for i in val_idx])
        accuracy = stats["accuracy"]
        report = f"held-out accuracy {accuracy:.3f}, F1(draw) {stats['f1']:.3f} on {stats['n']} examples; "
    return NaiveBayesRouter(alpha, bigrams).fit(texts, labels), report, accuracy

