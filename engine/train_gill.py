"""Training GILL's parts: GILLMapper (GILL's generation loss, onto the checkpoint's own CLIP), optionally with the 8
[IMG] input rows through the frozen LLM, and the generate-or-retrieve decision model."""
from pathlib import Path

import torch

from ..bridges import contract, llm_text
from ..bridges.errors import LoadError
from ..bridges.gill import GENERATE, RETRIEVE, GILLConfig, GILLMapper, split_prompt
from ..bridges.retrieval import fingerprint
from ..bridges.training.classify import classification_report, train_linear_classifier
from ..bridges.training.data import TrainConfig, seeded_init, split_indices
from ..bridges.training.tasks import DistillTask, GILLStudent, GILLTokensStudent, GILLTokensTask
from ..bridges.training.trainer import Trainer
from ..loaders.bridge_files import save_bridge
from ..loaders.gill import KIND as GILL_KIND
from . import gill as gill_engine
from .train_beyond_clip import CacheSpec
from .training import clip_identity, clip_teacher, run_training


def _base_identity(llm, gill, clip) -> dict:
    return {"student": "gill", "llm": llm.identity, "gill": fingerprint({"img": gill.inner.img_embeddings()}),
            "clip": clip_identity(clip)}


def img_states_cache_spec(llm, gill, clip) -> CacheSpec:
    """Each caption's [IMG] hidden states (the mapper's input; the [IMG] rows stay as they are)."""
    def input_fn(text):
        return gill_engine.img_states(llm, gill, text).cpu(), gill.config.num_img_tokens - 1

    return CacheSpec(input_fn, clip_teacher(clip), _base_identity(llm, gill, clip))


def token_cache_spec(llm, gill, clip, captions) -> CacheSpec:
    """Each caption's token ids as GILL's encoder feeds them (padded to the longest caption): the [IMG] rows train
    with the mapper, so the LLM runs in every step."""
    limit = llm_text.context_length(llm.config) - gill.config.num_img_tokens

    def ids_of(text):
        parts = split_prompt(text)  # the encoder tokenizes the stripped text, BOS first
        if len(parts) != 1 or isinstance(parts[0], int):
            raise LoadError(f"caption {text[:60]!r} has an image placeholder; GILL's mapper trains on text captions")
        ids = llm.tokenizer(parts[0], add_special_tokens=True, return_tensors="pt")["input_ids"][0]
        if len(ids) > limit:
            raise LoadError(f"caption {text[:60]!r} is {len(ids)} tokens; with the {gill.config.num_img_tokens} "
                            f"[IMG] tokens it does not fit {llm.describe()}'s context: shorten it")
        return ids

    length = max(len(ids_of(c)) for c in captions)

    def input_fn(text):
        ids = ids_of(text)
        padded = torch.full((length,), llm_text.pad_id(llm.tokenizer), dtype=torch.long)
        padded[:len(ids)] = ids
        return padded[None], len(ids) - 1

    return CacheSpec(input_fn, clip_teacher(clip), {**_base_identity(llm, gill, clip),
                                                    "student": "gill_token_ids.v2", "length": length})


def train_gill_mapper(run: Path, data, base, train_config: TrainConfig, out_path, llm_module=None, *, device="cpu",
                      **kwargs):
    """A fresh GILLMapper distilled onto the teacher (SD1.x 768, or SDXL 2048 + pooled 1280); the rest of the
    `base` GILL model (a LoadedGILL) is kept. Without `llm_module`, `data` (DistillData) holds cached [IMG] states
    and the base's [IMG] embeddings stay fixed. With it (the frozen LLM, on `device` as ordinary tensors), `data`
    (TokenData) holds each caption's token ids and the 8 [IMG] embedding rows train with the mapper, through the
    LLM. Writes the GILL file. Returns (state dict written, trainer)."""
    cfg = GILLConfig.from_dict({**base.config.to_dict(), "out_dim": data.targets.shape[-1],
                                "out_tokens": data.targets.shape[1],
                                "pooled_dim": data.pooled.shape[-1] if data.pooled is not None else 0})
    if contract.family_of(cfg.out_dim) is contract.SD1:  # SD1's pooled output is unused
        cfg.pooled_dim = 0
        data = data.without_pooled()

    def build():
        m = GILLMapper(cfg.llm_dim, cfg.out_dim, cfg.out_tokens, cfg.mapper_hidden, cfg.mapper_heads,
                       cfg.encoder_layers, cfg.decoder_layers, cfg.mapper_ffn, cfg.pooled_dim)
        with torch.no_grad():  # distinct queries from the start (the reference draws them from randn)
            m.query_embs.normal_()
        return m

    mapper = seeded_init(train_config.seed, build)
    img_embs = base.inner.img_embeddings().detach().float().cpu()
    if llm_module is None:
        student = GILLStudent(mapper, img_embs)
        task = DistillTask(student, data, train_config)
    else:
        student = GILLTokensStudent(mapper, img_embs, llm_module)
        task = GILLTokensTask(student, data, train_config)
    trainer = Trainer(task, train_config, device=device)
    written = {}

    def write():
        state = {k: v for k, v in base.inner.state_dict().items() if not k.startswith("gen_text_hidden_fcs.0.")}
        state.update({f"gen_text_hidden_fcs.0.{k}": v for k, v in mapper.state_dict().items()})
        if llm_module is not None:
            state["input_embeddings.weight"] = student.img_embs.detach().to(state["input_embeddings.weight"].dtype)
        save_bridge(out_path, GILL_KIND, cfg.to_dict(), state)
        written.update(state)
        return out_path

    run_training(run, trainer, {"gill_config": cfg.to_dict(), "img_tokens_trained": llm_module is not None}, write,
                 **kwargs)
    return written, trainer


def decision_labels(labels, source):
    wanted = {GENERATE: 0, RETRIEVE: 1}
    bad = sorted(set(labels) - set(wanted))
    if bad or len(set(labels)) < 2:
        raise LoadError(f"{source}: labels must be '{GENERATE}' and '{RETRIEVE}' (both present); found "
                        f"{sorted(set(labels))}")
    return torch.tensor([wanted[label] for label in labels])


def train_decision(llm, gill, texts, labels, out_path, *, steps, learning_rate, val_fraction, seed, source="",
                   progress=None):
    """GILL's decision model (Dropout + Linear on the [IMG0] state, as the reference) fitted on labelled prompts;
    the GILL model with it written to out_path. Returns (report text, held-out F1 of 'retrieve' or nan)."""
    y = decision_labels(labels, source)
    features = []
    for text in texts:
        features.append(gill_engine.img_states(llm, gill, text)[0, 0].float().cpu())
        progress and progress()
    with torch.inference_mode(False), torch.enable_grad():
        x, y = torch.stack(features).clone(), y.clone()  # tensors made under inference mode cannot enter autograd
        train_idx, val_idx = split_indices(len(texts), val_fraction, seed)
        f1, report = float("nan"), ""
        if len(val_idx):
            held = train_linear_classifier(x[train_idx], y[train_idx], 2, steps, learning_rate, seed)
            with torch.no_grad():
                stats = classification_report(held(x[val_idx]).argmax(-1), y[val_idx])
            f1 = stats["f1"]
            report = f"held-out F1(retrieve) {f1:.3f}, accuracy {stats['accuracy']:.3f} on {stats['n']}; "
        model = train_linear_classifier(x, y, 2, steps, learning_rate, seed)
    config = gill.config.to_dict()
    config["decision_in"] = gill.config.llm_dim
    state = {k: v for k, v in gill.inner.state_dict().items() if not k.startswith("decision_model.")}
    state.update({f"decision_model.{k}": v for k, v in model.state_dict().items()})
    save_bridge(out_path, GILL_KIND, config, state)
    return report, f1

