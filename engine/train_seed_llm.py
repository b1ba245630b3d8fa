"""Training a SEED-LLM (the SEED paper's SEED-OPT recipe on the user's own causal LM) and a SEED de-tokenizer head
for an SDXL checkpoint.

SEED-LLM: the pictures' codes are computed once by the SEED tokenizer and kept in the run folder; then two runs of
the one Trainer on the same pictures and the same held-out split:
  stage 1  image to text: <img> codes </img> A photo of | caption  (and the questions where the data has them)
  stage 2  both directions: the above, plus Generate an image: caption <img> | codes
each resumable from its own checkpoint (run/stage1/, run/); stage 2's checkpoint names the weights stage 1 ended
with, so a changed stage 1 is never continued by an old stage 2. The result is a peft LoRA folder and the rows file
(loaders/seed_llm.py).

SDXL head: SEED's own de-tokenizer output (77 x 768, what it feeds SD1.x) -> a token MLP to SDXL's 2048 wide
tokens and a pooled MLP to its 1280 pooled vector, distilled onto the checkpoint's own CLIP encoding of each
picture's caption, as the Beyond CLIP mapper is (DistillTask on cached inputs and targets).
"""
import gc
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..bridges import contract, llm_text
from ..bridges import seed_llm as seed_llm_bridge
from ..bridges.errors import LoadError
from ..bridges.seed_sdxl import SeedSDXLHead, SeedSDXLHeadConfig
from ..bridges.training.data import TrainConfig, seeded_init
from ..bridges.training.lora import LoRASet
from ..bridges.training.tasks import DistillTask, SeedLLMStudent, SeedLLMTask
from ..bridges.training.trainer import Trainer, parameter_checksum
from ..loaders import run_folder
from ..loaders import seed_llm as seed_llm_files
from ..loaders import seed_sdxl as seed_sdxl_files
from ..loaders.encode_cache import file_identity
from ..loaders.images import load_image
from . import seed as seed_engine
from .train_beyond_clip import CacheSpec
from .training import clip_identity, clip_teacher, run_training, target_of


@dataclass
class Picture:
    """One training picture and what is said about it."""
    path: Path
    caption: str = ""  # "" when the picture only has questions
    questions: tuple = ()  # ((question, answer), ...)


def pictures_of(pairs, questions=()) -> list:
    """Pictures from (image path, caption) pairs and (image path, question, answer) rows, in order of first
    appearance; a picture named twice keeps its first caption."""
    found = {}
    for path, caption in pairs:
        found.setdefault(Path(path), Picture(Path(path), caption))
    for path, question, answer in questions:
        picture = found.setdefault(Path(path), Picture(Path(path)))
        picture.questions = picture.questions + ((question, answer),)
    return list(found.values())


def picture_codes(run: Path, seed, paths, progress=None) -> torch.Tensor:
    """(N, 32) codes of the pictures by this SEED tokenizer, computed once and kept in the run folder. Every picture
    is read before the error: unreadable ones are named together."""
    identity = {"seed": seed_llm_files.seed_identity(seed)["fingerprint"],
                "pictures": [f"{p}:{file_identity(p)}" for p in paths]}
    path = run_folder.codes_path(run, identity)
    cached = run_folder.read_tensors(path, run_folder.CODES_FORMAT) if path.is_file() else None
    if cached is not None and cached["codes"].shape[0] == len(paths):
        return cached["codes"]
    codes, bad = [], []
    for i, p in enumerate(paths):
        try:
            image = load_image(p)[None]
        except LoadError as e:
            bad.append(str(e))
            continue
        if not bad:
            codes.append(seed_engine.tokenize(seed, image).codes[0])
        if progress is not None:
            progress(i + 1, len(paths))
    if bad:
        raise LoadError(f"{len(bad)} of the {len(paths)} training pictures cannot be read: " + " | ".join(bad[:5]) +
                        (" | ..." if len(bad) > 5 else "") + " Replace or remove them (with their captions).")
    run_folder.write_tensors(path, {"codes": torch.stack(codes)}, {"format": run_folder.CODES_FORMAT})
    return torch.stack(codes)


def _examples(config, tokenizer, pictures, codes, with_draw: bool, context: int) -> list:
    """Each picture's sequences for one stage; a sequence longer than the LLM's context is an error naming it."""
    examples = []
    for picture, row in zip(pictures, codes):
        seqs = []
        if picture.caption:
            seqs.append(seed_llm_bridge.caption_sequence(config, tokenizer, row, picture.caption))
            if with_draw:
                seqs.append(seed_llm_bridge.text_to_image(config, tokenizer, picture.caption, row))
        seqs += [seed_llm_bridge.question_sequence(config, tokenizer, row, q, a) for q, a in picture.questions]
        for s in seqs:
            if len(s.ids) > context:
                raise LoadError(f"{picture.path.name}: its {s.kind} sequence takes {len(s.ids)} tokens with the 34 "
                                f"image tokens, more than the LLM's context of {context}; shorten its caption or "
                                f"questions.")
        examples.append(seqs)
    return examples


@dataclass
class SeedLLMSettings:
    stage1_steps: int = 1000
    stage2_steps: int = 2000
    batch_size: int = 8  # pictures per step (each brings its caption, its drawing and its questions)
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    val_fraction: float = 0.1
    seed: int = 0
    eval_every: int = 100

    def stage(self, steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           val_fraction=self.val_fraction, eval_every=self.eval_every)


def build_student(llm_module, codebook: torch.Tensor, settings: SeedLLMSettings):
    """A fresh visual vocabulary and LoRA for the LLM (seeded), around the frozen LLM module."""
    emb = llm_module.get_input_embeddings().weight
    config = seed_llm_bridge.SeedLLMConfig(base_vocab=int(emb.shape[0]), width=int(emb.shape[1]),
                                           codebook_size=int(codebook.shape[0]), code_dim=int(codebook.shape[1]),
                                           rank=settings.rank, alpha=settings.alpha)
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = seed_llm_bridge.VisualVocabulary(config, codebook).initialise(
        emb, llm_module.get_output_embeddings().weight, generator)
    lora = seeded_init(settings.seed + 1, lambda: LoRASet.for_linears(llm_module, seed_llm_files.lora_layers(
        llm_module), settings.rank, settings.alpha))
    return SeedLLMStudent(llm_module, vocab, lora)


def code_frequency_prior(codes: torch.Tensor, train_idx, val_idx, codebook_size: int) -> float:
    """Held-out codes' cross-entropy (nats per code) under the training codes' frequencies (add-one smoothed): what
    a model that ignores the caption can reach at best from this data."""
    counts = torch.bincount(codes[train_idx].reshape(-1), minlength=codebook_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[codes[val_idx].reshape(-1)].mean())


def train_seed_llm(run: Path, llm_module, tokenizer, pictures, codes, codebook, settings: SeedLLMSettings, *,
                   write=None, device="cpu", ddp=False, is_main=True, on_step=None, resume=True,
                   checkpoint_every=100, start_info=None):
    """Both stages on `pictures` with their `codes` (N, 32). The LLM module must sit on `device` as ordinary
    (non-inference) tensors. write(student) -> path writes the result (main process). on_step(done, total, loss,
    val) counts over both stages. Returns (student, last trainer, report: held-out losses by kind before and after,
    and the priors)."""
    if len(pictures) < 2:
        raise LoadError(f"{len(pictures)} picture(s): give at least two captioned pictures.")
    student = build_student(llm_module, codebook, settings)
    config = student.vocab.config
    context = llm_text.context_length(llm_module)
    pad = llm_text.pad_id(tokenizer)
    stages = [(1, settings.stage1_steps, False), (2, settings.stage2_steps, True)]
    stages = [s for s in stages if s[1] > 0]
    if not stages:
        raise LoadError("stage 1 and stage 2 both have 0 steps: nothing to train.")
    total = sum(s[1] for s in stages)
    examples = {with_draw: _examples(config, tokenizer, pictures, codes, with_draw, context) for with_draw in
                (False, True)}
    eval_batch = max(1, settings.batch_size)
    final_task = SeedLLMTask(student, examples[True], pad, eval_batch)
    split = Trainer(final_task, settings.stage(1), device=device)  # the split every stage shares; no training here
    untrained = final_task.losses_by_kind(split.val_idx if len(split.val_idx) else split.train_idx)
    del split
    info = {**(start_info or {}), "seed_llm": config.to_dict(), "settings": asdict(settings)}
    done = 0
    trainer = None
    for number, steps, with_draw in stages:
        task = SeedLLMTask(student, examples[with_draw], pad, eval_batch)
        student.vocab.out_rows.requires_grad_(with_draw)  # stage 1 writes no codes: their output rows wait
        trainer = None
        gc.collect()  # a previous stage's DDP wrapper lets go of the parameters' hooks
        trainer = Trainer(task, settings.stage(steps), device=device, ddp=ddp)
        folder = run / "stage1" if number == 1 and len(stages) == 2 else run
        stage_info = {**info, "stage": number}
        if number == 2 and len(stages) == 2:
            stage_info["stage1_weights"] = parameter_checksum(student)

        def step(s, loss, val, offset=done):
            if on_step is not None:
                on_step(offset + s, total, loss, val)

        last = number == stages[-1][0]
        result = (lambda: write(student)) if last and write else (lambda where=folder: where)
        run_training(folder, trainer, stage_info, result, resume=resume, on_step=step,
                     checkpoint_every=checkpoint_every, is_main=is_main)
        done += steps
    val_idx = trainer.val_idx if len(trainer.val_idx) else trainer.train_idx
    report = {"untrained_val": untrained, "final_val": final_task.losses_by_kind(val_idx),
              "uniform_code_loss": math.log(config.codebook_size),
              "code_frequency_prior": code_frequency_prior(codes, trainer.train_idx, val_idx, config.codebook_size)}
    return student, trainer, report


def write_report(run: Path, report: dict):
    """The held-out losses by kind and the priors, added to the run's history.json."""
    import json
    path = run / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else {}
    history["seed_llm"] = report
    run_folder.write_history(run, history)


# ---------------------------------------------------------------------------------------------- SDXL head

SDXL_ONLY = ("the SEED head for SDXL learns an SDXL checkpoint's CLIP: connect the CLIP of an SDXL checkpoint (SD1.x "
             "already has SEED's own de-tokenizer).")


def check_sdxl_teacher(clip):
    """Before anything is cached: the teacher must be an SDXL CLIP (tokens 2048 wide and a pooled vector)."""
    tokens, pooled = clip_teacher(clip)("")
    if contract.family_of(tokens.shape[-1], pooled.shape[-1] if pooled is not None else 0) is not contract.SDXL:
        raise LoadError(SDXL_ONLY)


def head_cache_spec(seed, clip, pairs) -> CacheSpec:
    """Per pair, keyed 'picture<TAB>caption': SEED's de-tokenizer output for the picture's codes (the head's input)
    against the CLIP's encoding of the caption."""
    by_key = {f"{p}\t{c}": (Path(p), c) for p, c in pairs}
    teacher = clip_teacher(clip)

    def input_fn(key):
        path, _ = by_key[key]
        codes = seed_engine.tokenize(seed, load_image(path)[None]).codes
        return seed_engine.detokenize(seed, codes).float().cpu(), seed.config.reverse_queries - 1

    identity = {"student": "seed_sdxl_head", "seed": seed_llm_files.seed_identity(seed)["fingerprint"],
                "clip": clip_identity(clip), "pictures": {k: file_identity(v[0]) for k, v in by_key.items()}}
    return CacheSpec(input_fn, lambda key: teacher(by_key[key][1]), identity)


def pair_keys(pairs) -> list:
    return [f"{p}\t{c}" for p, c in pairs]


def train_sdxl_head(run: Path, data, head_config: SeedSDXLHeadConfig, train_config: TrainConfig, out_path, seed_id,
                    *, device="cpu", ddp=False, **kwargs):
    """A SEED de-tokenizer head distilled on `data` (DistillData: SEED embeddings -> SDXL CLIP tokens + pooled),
    written to out_path. Returns (head, trainer)."""
    if target_of(data) != contract.SDXL.key:
        raise LoadError(SDXL_ONLY)
    if data.inputs.shape[-1] != head_config.in_dim:
        raise LoadError(f"the cache holds {data.inputs.shape[-1]}-wide SEED embeddings, the head reads "
                        f"{head_config.in_dim}")
    head = seeded_init(train_config.seed, lambda: SeedSDXLHead(head_config))
    trainer = Trainer(DistillTask(head, data, train_config), train_config, device=device, ddp=ddp)

    def write():
        seed_sdxl_files.save_head(out_path, head.eval(), seed_id)
        return out_path

    run_training(run, trainer, {"seed_sdxl_head": head_config.to_dict(), "seed": seed_id["fingerprint"]}, write,
                 **kwargs)
    return head.eval().requires_grad_(False), trainer
