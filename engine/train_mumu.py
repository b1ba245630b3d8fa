"""Training MUMU: the connector distilled onto an SDXL checkpoint's own CLIP (stage 1), then the connector with
rank-8 LoRAs on Idefics2 and on the SDXL UNet by the frozen UNet's denoising loss (stage 2)."""
import copy
from pathlib import Path

import torch

from ..bridges import contract
from ..bridges.errors import LoadError
from ..bridges.mumu import MUMUConnector, PromptError
from ..bridges.retrieval import fingerprint
from ..bridges.training.data import DistillData, TrainConfig, seeded_init
from ..bridges.training.lora import LoRASet, linear_paths
from ..bridges.training.losses import make_probes
from ..bridges.training.tasks import ConnectorStudent, DistillTask, MUMUStage2Student, MUMUStage2Task
from ..bridges.training.trainer import Trainer
from ..loaders import mumu as mumu_files
from ..loaders.encode_cache import file_identity
from ..loaders.training_inputs import load_input_image, parse_mumu_caption, resolve_input_file, teacher_text
from . import mumu as mumu_engine
from .train_beyond_clip import CacheSpec
from .training import clip_identity, clip_teacher, run_training, target_of

# Idefics2's text-model attention projections (peft's usual LoRA targets for Mistral-class models; the paper
# gives only the rank). The vision tower stays as it is.
IDEFICS2_LORA_LAYERS = r"^text_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"


def _prepared(vlm, line: str, grid: int, resolution: int):
    """A MUMU caption line ('prompt<TAB>crop...') as a prepared prompt, its crops bound to <image> in order."""
    text, crops = parse_mumu_caption(line)
    try:
        return mumu_engine.prepare_prompt(vlm, text, [("", load_input_image(c)) for c in crops], grid, resolution)
    except PromptError as e:
        raise LoadError(f"caption {text!r}: {e}") from None


def _sequence_length(vlm, line: str, grid: int) -> int:
    text, crops = parse_mumu_caption(line)
    try:
        segments = mumu_engine.mumu_bridge.bind_placeholders(text, [""] * len(crops))
        return mumu_engine.mumu_bridge.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context
                                                      ).input_ids.shape[1]
    except PromptError as e:
        raise LoadError(f"caption {text!r}: {e}") from None


def connector_cache_spec(vlm, clip, lines, hidden_layer: int, image_resolution: int) -> CacheSpec:
    """Idefics2's (no perceiver) states of each caption with its crops in place, zero-padded to the longest
    caption (the trainer masks the padding), against the CLIP's encoding of the words."""
    grid, resolution = mumu_files.grid_for(vlm, image_resolution)
    length = max(_sequence_length(vlm, line, grid) for line in lines)

    def input_fn(line):
        hidden = mumu_engine.hidden_states(vlm, _prepared(vlm, line, grid, resolution), hidden_layer).cpu()
        n = hidden.shape[1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, length - n)), n - 1

    teacher = clip_teacher(clip)
    crops = sorted({c for line in lines for c in parse_mumu_caption(line)[1]})
    lora = vlm.lora.describe() if vlm.lora is not None else None
    identity = {"student": "mumu", "idefics2": f"{vlm.path}:{file_identity(vlm.path)}", "lora": lora,
                "crops": {c: file_identity(resolve_input_file(c)) for c in crops}, "clip": clip_identity(clip),
                "hidden_layer": hidden_layer, "image_resolution": image_resolution, "length": length}
    return CacheSpec(input_fn, lambda line: teacher(teacher_text(parse_mumu_caption(line)[0])), identity)


def train_connector(run: Path, data: DistillData, connector_config, train_config: TrainConfig, out_path,
                    probes: int = 64, *, device="cpu", ddp=False, **kwargs):
    """A MUMU connector distilled on `data` (ConnectorStudent: probe-attention loss on the tokens + MSE on the
    pooled vector), written to out_path as a mumu_connector bridge. Returns (connector module, trainer)."""
    if data.inputs.shape[-1] != connector_config.in_dim:
        raise LoadError(f"the cache holds {data.inputs.shape[-1]}-wide Idefics2 states but the connector reads "
                        f"{connector_config.in_dim}; the cache belongs to another model")
    if target_of(data) != contract.SDXL.key:
        raise LoadError(f"the MUMU connector conditions SDXL ({contract.SDXL.width}-wide tokens + pooled "
                        f"{contract.SDXL.pooled}): connect the CLIP of an SDXL checkpoint as the teacher.")
    connector = seeded_init(train_config.seed, lambda: MUMUConnector(connector_config))
    probe_bank = make_probes(probes, connector_config.out_dim, train_config.seed)
    trainer = Trainer(DistillTask(ConnectorStudent(connector, probe_bank), data, train_config), train_config,
                      device=device, ddp=ddp)

    def write():
        mumu_files.save_connector(out_path, connector.eval())
        return out_path

    run_training(run, trainer, {"connector_config": connector_config.to_dict(), "probes": probes}, write, **kwargs)
    return connector.eval().requires_grad_(False), trainer


def stage2_examples(vlm, captions, image_resolution: int):
    """[(Sequence, crop pixels (n, 3, R, R) or None)] of MUMU caption lines (crops bound to their <image>)."""
    grid, resolution = mumu_files.grid_for(vlm, image_resolution)
    prepared = [_prepared(vlm, line, grid, resolution) for line in captions]
    return [(p.sequence, p.pixels) for p in prepared]


def train_mumu(run: Path, examples, latents, vlm_module, connector, model, denoiser, train_config: TrainConfig,
               out_paths: dict, *, rank=8, lrs=None, hidden_layer=-1, device="cpu", **kwargs):
    """MUMU stage 2: the connector (from stage 1, a module on `device`) trained on with fresh rank-`rank` LoRAs on
    Idefics2's text attention and on the UNet's attention projections (the MUMU UNet LoRA targets), by the frozen
    UNet's denoising loss. Idefics2 and the UNet must sit on `device` as ordinary (non-inference) tensors.
    out_paths: {"connector": bridge file, "idefics2_lora": peft folder, "unet_lora": kohya file}.
    Returns (connector, idefics2 LoRASet, unet LoRASet, trainer)."""
    lrs = {"connector": 1e-5, "idefics2_lora": 3e-6, "unet_lora": 5e-6, **(lrs or {})}
    unet = model.model.diffusion_model
    unet_paths = [k[len("diffusion_model."):-len(".weight")]
                  for k in mumu_files.unet_lora_targets(model.model.state_dict())]
    vlm_paths = linear_paths(vlm_module, IDEFICS2_LORA_LAYERS)
    if not unet_paths or not vlm_paths:
        raise LoadError(f"found {len(vlm_paths)} Idefics2 and {len(unet_paths)} UNet attention layers to adapt; "
                        f"MUMU stage 2 needs an Idefics2 and an SDXL MODEL")
    trained = copy.deepcopy(connector).float().requires_grad_(True).train()
    vlm_lora = seeded_init(train_config.seed, lambda: LoRASet.for_linears(vlm_module, vlm_paths, rank))
    unet_lora = seeded_init(train_config.seed + 1, lambda: LoRASet.for_linears(unet, unet_paths, rank))
    student = MUMUStage2Student(vlm_module, trained, vlm_lora, unet, unet_lora, hidden_layer)
    trainer = Trainer(MUMUStage2Task(student, examples, latents, denoiser, lrs), train_config, device=device)

    def write():
        mumu_files.save_connector(out_paths["connector"], trained.eval())
        mumu_files.save_idefics2_lora(out_paths["idefics2_lora"], vlm_lora.factors(), vlm_lora.alpha)
        mumu_files.save_unet_lora(out_paths["unet_lora"], {f"diffusion_model.{p}.weight": f
                                                           for p, f in unet_lora.factors().items()},
                                  unet_lora.alpha, {"beyond_clip_run": run.name})
        return out_paths["connector"]

    info = {"mumu_stage2": {"rank": rank, "lrs": lrs, "hidden_layer": hidden_layer,
                            "connector": fingerprint(connector.state_dict()),
                            "unet_layers": len(unet_paths), "idefics2_layers": len(vlm_paths)}}
    run_training(run, trainer, info, write, **kwargs)
    return trained.eval().requires_grad_(False), vlm_lora.eval(), unet_lora.eval(), trainer
