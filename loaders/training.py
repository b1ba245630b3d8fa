"""Training files: caption and labelled files from ComfyUI's input folder, target caches and resumable
checkpoints under output/beyond_clip_training/<run>/, and the trained bridges written into models/bridges.

A run folder holds:
  cache/<key>.safetensors   student inputs + teacher targets per caption (key: LLM, CLIP, captions, layer)
  checkpoint.pt             the trainer's state (weights, optimizer, step, losses), read with weights_only=True
  history.json              losses per step, the held-out loss, where the result was written
"""
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import folder_paths
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..bridges.mapper import BeyondCLIPMapper, MapperConfig
from ..bridges.retrieval import fingerprint
from ..bridges.training import (DistillData, DistillTrainer, MapperStudent, TrainConfig, parameter_checksum,
                                resume_mismatch, seeded_init)
from . import folders
from .bridge_files import writable_path
from .errors import LoadError
from .mappers import KIND as MAPPER_KIND, save_mapper

RUNS_FOLDER = "beyond_clip_training"
CACHE_FORMAT = "beyond_clip.distill_cache"
CHECKPOINT = "checkpoint.pt"
_NAME = re.compile(r"^[\w.\- ]+$")
TEXT_EXTENSIONS = (".txt",)
TABLE_EXTENSIONS = (".tsv", ".txt")


# ---- inputs -----------------------------------------------------------------------------------------------

def input_files(extensions=TEXT_EXTENSIONS):
    """Files in ComfyUI's input folder (and one level of sub-folders) with these extensions, posix names."""
    base = Path(folder_paths.get_input_directory())
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_file() and path.suffix.lower() in extensions and len(rel.parts) <= 2 \
                and not any(p.startswith(".") for p in rel.parts):
            found.append(rel.as_posix())
    return found


def resolve_input_file(name) -> Path:
    base = Path(folder_paths.get_input_directory())
    path = (base / name).resolve()
    if base.resolve() not in path.parents or not path.is_file():
        raise LoadError(f"'{name}' is not a file in ComfyUI's input folder ({base}). Put the file there and "
                        f"refresh the page.")
    return path


def read_captions(path) -> list:
    """One caption per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} could not be read as UTF-8 text ({e}).") from None
    captions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(captions) < 2:
        raise LoadError(f"{path} has {len(captions)} caption(s); write at least two, one per line (more is "
                        f"better: thousands for a usable bridge).")
    return captions


def check_name(name: str, what: str) -> str:
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or not _NAME.match(name) or name.startswith("."):
        raise ValueError(f"{what} {name!r}: use letters, digits, spaces, '.', '-' or '_' only (no folders)")
    return name


def run_dir(run_name: str, output_dir=None) -> Path:
    base = Path(output_dir or folder_paths.get_output_directory())
    return base / RUNS_FOLDER / check_name(run_name, "run name")


def bridge_path(name: str, kind: str = MAPPER_KIND, extension=".safetensors") -> Path:
    """models/bridges/<name><extension>; refuses to replace a file that is not a bridge of this kind."""
    base = Path(folder_paths.get_folder_paths(folders.BRIDGES)[0])
    path = base / f"{check_name(name, 'output name')}{extension}"
    if extension == ".safetensors":
        return writable_path(path, kind)
    return path


# ---- teacher and student encodings ------------------------------------------------------------------------

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


def captions_identity(captions) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_cache(run: Path, captions, student, teacher, identity: dict, cache_dtype="fp32", progress=None):
    """DistillData for the captions, read from run/cache/ when an identical cache is there, else computed
    (student(text) -> (hidden (1, T, D), last_token); teacher(text) -> (tokens, pooled)) and written.
    progress(done, total) after each caption; it may raise to stop (nothing half-written stays)."""
    key = hashlib.sha256(json.dumps({**identity, "captions": captions_identity(captions), "dtype": cache_dtype},
                                    sort_keys=True).encode()).hexdigest()[:20]
    path = run / "cache" / f"{key}.safetensors"
    if path.is_file():
        data = read_cache(path)
        if data is not None and len(data) == len(captions):
            return data, path
    dtype = CACHE_DTYPES[cache_dtype]
    inputs, last, targets, pooled = [], [], [], []
    for i, text in enumerate(captions):
        hidden, last_token = student(text)
        tokens, pool = teacher(text)
        inputs.append(hidden[0].to(dtype))
        last.append(last_token)
        targets.append(tokens[0])
        if pool is not None:
            pooled.append(pool[0])
        if progress is not None:
            progress(i + 1, len(captions))
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1:
        raise LoadError(f"the student gave inputs of different shapes {sorted(shapes)[:3]}; every caption must "
                        f"give the same number of tokens")
    tensors = {"inputs": torch.stack(inputs).contiguous(), "last_token": torch.tensor(last, dtype=torch.long),
               "targets": torch.stack(targets).contiguous()}
    if pooled:
        tensors["pooled"] = torch.stack(pooled).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "about": json.dumps(identity),
                                           "captions": str(len(captions))})
    os.replace(tmp, path)
    return read_cache(path), path


def read_cache(path):
    """DistillData from a cache file, or None when it is absent or not a cache (it is then rebuilt).
    Tensors are cloned: ones read under ComfyUI's inference mode could not take part in autograd."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != CACHE_FORMAT:
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError):
        return None
    with torch.inference_mode(False):
        t = {k: v.clone() for k, v in t.items()}
    return DistillData(inputs=t["inputs"], last_token=t["last_token"], targets=t["targets"], pooled=t.get("pooled"))


def cache_about(path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {}).get("about", "{}"))


def find_cache(run: Path) -> Path:
    """The newest cache of a run (the command line trains on a cache the node or an earlier run built)."""
    caches = sorted((run / "cache").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not caches:
        raise LoadError(f"{run} has no target cache (cache/*.safetensors). Build one first: give --llm and "
                        f"--checkpoint, or run the Train node once with this run name.")
    return caches[-1]


# ---- checkpoints ------------------------------------------------------------------------------------------

def save_checkpoint(run: Path, state: dict):
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / (CHECKPOINT + ".tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, run / CHECKPOINT)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(run: Path):
    path = run / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:  # truncated file, zip errors, refused objects
        raise LoadError(f"{path} could not be read ({type(e).__name__}: {str(e)[:200]}); delete it to start the "
                        f"run again, or switch 'resume' off.") from None


def write_history(run: Path, info: dict):
    run.mkdir(parents=True, exist_ok=True)
    (run / "history.json").write_text(json.dumps(info, indent=1))


# ---- the Beyond CLIP mapper -------------------------------------------------------------------------------

def target_of(data: DistillData) -> str:
    width = data.targets.shape[-1]
    if width == 768:
        return "sd1"
    if width == 2048 and data.pooled is not None and data.pooled.shape[-1] == 1280:
        return "sdxl"
    raise LoadError(f"the CLIP gives {width}-wide tokens" + (f" and a {data.pooled.shape[-1]}-wide pooled vector"
                    if data.pooled is not None else "") + "; mappers are trained for SD1.x (768) or SDXL "
                    "(2048 + pooled 1280). Connect the CLIP of an SD1.x or SDXL checkpoint.")


def train_distill(run: Path, data: DistillData, student, start_info: dict, train_config: TrainConfig, write_result,
                  resume=True, device="cpu", ddp=False, on_step=None, checkpoint_every=100, is_main=True,
                  cache_path=None, make_trainer=None):
    """Distil `student` on `data`, resuming from run/checkpoint.pt when asked and its settings match
    `start_info` and the training settings. Checkpoints every `checkpoint_every` steps, at the end, and when
    on_step raises (interruption): the exception propagates once the checkpoint is safe. The main process
    then calls write_result() and writes history.json. make_trainer() gives another trainer (stage 2) in
    place of DistillTrainer(student, ...). Returns the trainer."""
    trainer = make_trainer() if make_trainer else DistillTrainer(student, data, train_config, device=device, ddp=ddp)
    start_info = {**start_info, "train_config": train_config.resume_key(), "examples": len(data)}
    if resume:
        saved = load_checkpoint(run)
        if saved is not None:
            differ = resume_mismatch({k: saved.get(k) for k in start_info}, start_info)
            if differ:
                raise LoadError(f"{run / CHECKPOINT} was made with other settings ({', '.join(differ)} differ); "
                                f"use the same settings to resume, another run name, or switch 'resume' off.")
            if int(saved["step"]) > train_config.steps:
                raise LoadError(f"{run / CHECKPOINT} is at step {saved['step']}, past the {train_config.steps} "
                                f"steps asked for; ask for more steps or switch 'resume' off.")
            trainer.load_state_dict(saved)

    def checkpoint():
        if is_main:
            save_checkpoint(run, {**trainer.state_dict(), **start_info})

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
        write_history(run, {"result": str(out_path), "steps": trainer.step, "history": trainer.history,
                            "initial_val_loss": trainer.initial_val_loss, "final_val_loss": trainer.last_val_loss(),
                            "train_examples": len(trainer.train_idx), "val_examples": len(trainer.val_idx),
                            "cache": str(cache_path) if cache_path else None, **start_info,
                            "checksum": parameter_checksum(trainer.student)})
    return trainer


def train_mapper(run: Path, data: DistillData, mapper_config: MapperConfig, train_config: TrainConfig, out_path,
                 **kwargs):
    """A Beyond CLIP mapper distilled on `data`, written to out_path (see train_distill for the rest).
    Returns (mapper, trainer)."""
    if data.inputs.shape[-1] != mapper_config.in_dim:
        raise LoadError(f"the cache holds {data.inputs.shape[-1]}-wide LLM states but the mapper reads "
                        f"{mapper_config.in_dim}; the cache belongs to another LLM")
    if mapper_config.target == "sd1" and data.pooled is not None:
        data = DistillData(data.inputs, data.last_token, data.targets, None)  # SD1's pooled output is unused
    mapper = seeded_init(train_config.seed, lambda: BeyondCLIPMapper(mapper_config))

    def write():
        save_mapper(out_path, mapper.eval())
        return out_path

    trainer = train_distill(run, data, MapperStudent(mapper), {"mapper_config": mapper_config.to_dict()},
                            train_config, write, **kwargs)
    return mapper.eval().requires_grad_(False), trainer


# ---- the GILLMapper ---------------------------------------------------------------------------------------

def train_gill_mapper(run: Path, data: DistillData, base, train_config: TrainConfig, out_path, llm_module=None,
                      **kwargs):
    """A fresh GILLMapper distilled onto the teacher (SD1.x 768, or SDXL 2048 + pooled 1280); the rest of the
    `base` GILL model (a LoadedGILL) is kept. Without `llm_module`, `data` holds cached [IMG] states and the
    base's [IMG] embeddings stay fixed. With it (the frozen LLM, on the trainer's device as ordinary tensors),
    `data` holds each caption's token ids and the 8 [IMG] embedding rows train with the mapper, through the LLM.
    Writes the GILL file. Returns (state dict written, trainer)."""
    from ..bridges.gill import GILLConfig, GILLMapper
    from ..bridges.training import GILLStudent
    from .gill import KIND as GILL_KIND

    cfg = GILLConfig.from_dict({**base.config.to_dict(), "out_dim": data.targets.shape[-1], "out_tokens":
                                data.targets.shape[1], "pooled_dim": data.pooled.shape[-1] if data.pooled is not None else 0})
    if cfg.out_dim == 768:
        cfg.pooled_dim = 0
        data = DistillData(data.inputs, data.last_token, data.targets, None)

    def build():
        m = GILLMapper(cfg.llm_dim, cfg.out_dim, cfg.out_tokens, cfg.mapper_hidden, cfg.mapper_heads,
                       cfg.encoder_layers, cfg.decoder_layers, cfg.mapper_ffn, cfg.pooled_dim)
        with torch.no_grad():  # distinct queries from the start (the reference draws them from randn)
            m.query_embs.normal_()
        return m

    mapper = seeded_init(train_config.seed, build)
    img_embs = base.module.img_embeddings().detach().float().cpu()
    written = {}
    make_trainer = None
    if llm_module is None:
        student = GILLStudent(mapper, img_embs)
    else:
        from ..bridges.training import GILLTokensStudent, GILLTokensTrainer
        student = GILLTokensStudent(mapper, img_embs, llm_module)
        device = kwargs.get("device", "cpu")

        def make_trainer():
            return GILLTokensTrainer(student, data, train_config, device=device)

    def write():
        state = {k: v for k, v in base.module.state_dict().items() if not k.startswith("gen_text_hidden_fcs.0.")}
        state.update({f"gen_text_hidden_fcs.0.{k}": v for k, v in mapper.state_dict().items()})
        if llm_module is not None:
            state["input_embeddings.weight"] = student.img_embs.detach().to(state["input_embeddings.weight"].dtype)
        from .bridge_files import save_bridge
        save_bridge(out_path, GILL_KIND, cfg.to_dict(), state)
        written.update(state)
        return out_path

    trainer = train_distill(run, data, student, {"gill_config": cfg.to_dict(), "img_tokens_trained": llm_module
                                                 is not None}, train_config, write, make_trainer=make_trainer, **kwargs)
    return written, trainer


def gill_token_student(llm, captions, num_img_tokens: int):
    """(student(text) -> (the caption's token ids as GILL's encoder feeds them, (1, length, 1) float padded,
    last real token), length) for training the [IMG] rows: the ids are cached, the LLM runs in every step."""
    from ..bridges import llm_text
    from ..bridges.gill import split_prompt
    limit = llm_text.context_length(llm.patcher.model.inner) - num_img_tokens

    def ids_of(text):
        parts = split_prompt(text)  # the encoder tokenizes the stripped text, BOS first
        if len(parts) != 1 or isinstance(parts[0], int):
            raise LoadError(f"caption {text[:60]!r} has an image placeholder; GILL's mapper trains on text captions")
        ids = llm.tokenizer(parts[0], add_special_tokens=True, return_tensors="pt")["input_ids"][0]
        if len(ids) > limit:
            raise LoadError(f"caption {text[:60]!r} is {len(ids)} tokens; with the {num_img_tokens} [IMG] tokens it "
                            f"does not fit {llm.describe()}'s context: shorten it")
        return ids

    length = max(len(ids_of(c)) for c in captions)

    def student(text):
        ids = ids_of(text)
        padded = torch.full((length,), llm_text._pad_id(llm.tokenizer), dtype=torch.long)
        padded[:len(ids)] = ids
        return padded[None, :, None].float(), len(ids) - 1
    return student, length


# ---- the MUMU connector (MUMU stage 1, distilled) ---------------------------------------------------------

_NAMED_CROP = re.compile(r"^([A-Za-z0-9_\-]+)=(.+)$")


def split_named_crops(text: str, crops: list) -> tuple:
    """([names], [paths]) of a caption's crops: with named placeholders in the prompt ('a <man> man'), a crop may
    be given as 'man=path' (bound to <man>); other crops bind to <image> in order (name ""). A prompt with only
    <image> placeholders reads every crop as a path, as before."""
    from ..bridges.mumu import PLACEHOLDER, POSITIONAL
    if all(m.group(1) == POSITIONAL for m in PLACEHOLDER.finditer(text)):
        return [""] * len(crops), list(crops)
    pairs = [(m.group(1), m.group(2).strip()) if m else ("", c) for c, m in ((c, _NAMED_CROP.match(c)) for c in crops)]
    return [n for n, _ in pairs], [c for _, c in pairs]


def parse_mumu_caption(line: str, where: str = "") -> tuple:
    """'prompt' or 'prompt<TAB>crop.png<TAB>...' -> (prompt, [crop names]). The crops are files in ComfyUI's
    input folder, bound in order to the prompt's <image> placeholders (written before the words they show), or
    by name: 'a <man> man<TAB>man=crops/man.png'. Named placeholders come back as <image> with the crops in
    placeholder order (a name used twice gives its crop twice), so everything downstream binds by position."""
    from ..bridges import mumu as mumu_bridge
    parts = [p.strip() for p in line.split("\t")]
    text, crops = parts[0], [p for p in parts[1:] if p]
    names, crops = split_named_crops(text, crops)
    try:
        segments = mumu_bridge.bind_placeholders(text, names)
    except mumu_bridge.PromptError as e:
        raise LoadError(f"{where}caption {text!r} with {len(crops)} crop(s): {e}") from None
    if any(names):
        text = "".join(s if isinstance(s, str) else mumu_bridge.IMAGE_TOKEN for s in segments)
        crops = [crops[s] for s in segments if not isinstance(s, str)]
    return text, crops


def teacher_text(prompt: str) -> str:
    """What CLIP reads of a MUMU prompt: the words, without the image placeholders."""
    from ..bridges.mumu import PLACEHOLDER
    return " ".join(PLACEHOLDER.sub(" ", prompt).split())


def load_input_image(name) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] from a picture in ComfyUI's input folder."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    path = resolve_input_file(name)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise LoadError(f"the crop '{name}' ({path}) could not be read as a picture ({e}).") from None
    return torch.from_numpy(rgb.copy())


def mumu_identity(vlm, lines) -> dict:
    """What the cached Idefics2 states depend on besides the captions: the model folder, its LoRA, the crops."""
    from .encode_cache import file_identity
    crops = sorted({c for line in lines for c in parse_mumu_caption(line)[1]})
    stamps = {c: file_identity(resolve_input_file(c)) for c in crops}
    lora = vlm.lora.describe() if vlm.lora is not None else None
    return {"idefics2": f"{vlm.path}:{file_identity(vlm.path)}", "lora": lora, "crops": stamps}


def mumu_student(vlm, lines, hidden_layer: int, image_resolution: int):
    """(student(line) -> (hidden (1, length, D) zero-padded, last real token), length): Idefics2 (no perceiver)
    states of each caption with its crops in place; `length` is the longest caption's token count, so the
    cache holds one tensor and the trainer masks the padding."""
    from ..bridges import mumu as mumu_bridge
    from .mumu import grid_for
    from .patcher import load_to_device
    grid, resolution = grid_for(vlm, image_resolution)

    def sequence(line):
        text, crops = parse_mumu_caption(line)
        try:
            segments = mumu_bridge.bind_placeholders(text, [""] * len(crops))
            return mumu_bridge.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context), crops
        except mumu_bridge.PromptError as e:
            raise LoadError(f"caption {text!r}: {e}") from None

    length = max(sequence(line)[0].input_ids.shape[1] for line in lines)

    def student(line):
        seq, crops = sequence(line)
        pixels = (torch.stack([mumu_bridge.prepare_image(load_input_image(c), resolution, vlm.image_mean,
                                                         vlm.image_std) for c in crops]) if crops else None)
        model = load_to_device(vlm.patcher)
        with torch.no_grad(), vlm.attach(model):
            hidden = mumu_bridge.encode(model, seq, pixels, hidden_layer).cpu()
        n = hidden.shape[1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, length - n)), n - 1
    return student, length


def mumu_teacher(clip):
    teacher = clip_teacher(clip)
    return lambda line: teacher(teacher_text(parse_mumu_caption(line)[0]))


def train_connector(run: Path, data: DistillData, connector_config, train_config: TrainConfig, out_path,
                    probes: int = 64, **kwargs):
    """A MUMU connector distilled on `data` (ConnectorStudent: probe-attention loss on the tokens + MSE on the
    pooled vector), written to out_path as a mumu_connector bridge. Returns (connector, trainer)."""
    from ..bridges.mumu import MUMUConnector
    from ..bridges.training import ConnectorStudent, make_probes
    from .mumu import save_connector
    if data.inputs.shape[-1] != connector_config.in_dim:
        raise LoadError(f"the cache holds {data.inputs.shape[-1]}-wide Idefics2 states but the connector reads "
                        f"{connector_config.in_dim}; the cache belongs to another model")
    if target_of(data) != "sdxl":
        raise LoadError("the MUMU connector conditions SDXL (77x2048 tokens + pooled 1280): connect the CLIP of an "
                        "SDXL checkpoint as the teacher.")
    connector = seeded_init(train_config.seed, lambda: MUMUConnector(connector_config))
    probe_bank = make_probes(probes, connector_config.out_dim, train_config.seed)

    def write():
        save_connector(out_path, connector.eval())
        return out_path

    trainer = train_distill(run, data, ConnectorStudent(connector, probe_bank),
                            {"connector_config": connector_config.to_dict(), "probes": probes}, train_config, write,
                            **kwargs)
    return connector.eval().requires_grad_(False), trainer


# ---- Beyond CLIP stage 2: RepAdapter trained with the caption loss and the frozen UNet's denoising loss -----

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PAIRS_EXTENSIONS = (".tsv",)


def _caption_beside(image: Path):
    text = image.with_suffix(".txt")
    return text if text.is_file() else None


def pair_sources():
    """Image-caption sets in ComfyUI's input folder: folders (and sub-folders one level down) holding images
    with same-stem .txt captions, and .tsv files 'image<TAB>caption'."""
    base = Path(folder_paths.get_input_directory())
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if len(rel.parts) > 2 or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS and _caption_beside(p) for p in path.iterdir()):
            found.append(rel.as_posix() + "/")
        elif path.is_file() and path.suffix.lower() in PAIRS_EXTENSIONS:
            found.append(rel.as_posix())
    return found


def read_pairs(name, crops=False) -> list:
    """[(image path, caption)] from a pair source (see pair_sources); at least two pairs. crops=True (MUMU):
    .tsv lines may go on with crops, 'image<TAB>caption<TAB>crop.png...', paths beside the .tsv; the caption
    is then given as a MUMU caption line, 'caption<TAB>crop...' with the crops named from the input folder."""
    base = Path(folder_paths.get_input_directory()).resolve()
    path = (base / name.rstrip("/")).resolve()
    if base not in path.parents or not path.exists():
        raise LoadError(f"'{name}' is not in ComfyUI's input folder ({base}). Put a folder of images with same-name "
                        f".txt captions, or a .tsv 'image<TAB>caption' file, there and refresh the page.")
    pairs = []
    if path.is_dir():
        for image in sorted(path.iterdir()):
            if image.suffix.lower() in IMAGE_EXTENSIONS and _caption_beside(image):
                text = " ".join(_caption_beside(image).read_text(encoding="utf-8").split())
                if text:
                    pairs.append((image, text))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise LoadError(f"{path} could not be read as UTF-8 text ({e}).") from None
        for i, line in enumerate(lines):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.split("\t")]
            if len(parts) < 2 or not parts[1] or len(parts) > 2 and not crops:
                raise LoadError(f"{path}, line {i + 1}: expected 'image<TAB>caption"
                                f"{'[<TAB>crop...]' if crops else ''}', got {line[:80]!r}")
            files = []
            names, crop_parts = split_named_crops(parts[1], [c for c in parts[2:] if c])
            for part in [parts[0]] + crop_parts:
                file = (path.parent / part).resolve()
                if base not in file.parents or not file.is_file():
                    raise LoadError(f"{path}, line {i + 1}: '{part}' is not a file beside the .tsv in ComfyUI's "
                                    f"input folder")
                files.append(file)
            caption = "\t".join([parts[1]] + [f"{n}={f.relative_to(base).as_posix()}" if n else
                                               f.relative_to(base).as_posix() for n, f in zip(names, files[1:])])
            pairs.append((files[0], caption))
    if len(pairs) < 2:
        raise LoadError(f"'{name}' gives {len(pairs)} image-caption pair(s); give at least two (images with a "
                        f"same-name .txt caption, or 'image<TAB>caption' lines).")
    return pairs


def load_square_image(path: Path, resolution: int) -> torch.Tensor:
    """(1, R, R, 3) float in [0, 1]: the picture's centre square, resized (what SD is trained on)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
            rgb = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise LoadError(f"{path} could not be read as a picture ({e}).") from None
    return torch.from_numpy(rgb.copy())[None]


def build_latent_cache(run: Path, images, vae, model, resolution: int, progress=None) -> torch.Tensor:
    """(N, C, h, w) latents of the images as the UNet sees them (vae.encode, then the model's
    process_latent_in), computed once per (images, VAE, resolution) and kept in run/cache/."""
    from .encode_cache import file_identity
    identity = {"images": [f"{p}:{file_identity(p)}" for p in images], "resolution": resolution,
                "vae": fingerprint(dict(vae.first_stage_model.state_dict())),
                "latent_format": type(model.model.latent_format).__name__}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    path = run / "cache" / f"latents-{key}.safetensors"
    if not path.is_file():
        latents = []
        for i, image in enumerate(images):
            # seeded: some hosts' VAE encode draws from the posterior, and runs must agree on their latents
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(i)
                raw = vae.encode(load_square_image(image, resolution))
                latents.append(model.model.process_latent_in(raw.float().cpu())[0])
            if progress is not None:
                progress(i + 1, len(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"latents": torch.stack(latents).contiguous()}, str(tmp), metadata={"format": "beyond_clip.latents"})
        os.replace(tmp, path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        latents = f.get_tensor("latents")
    with torch.inference_mode(False):
        return latents.clone()


def leave_inference_mode(module: torch.nn.Module):
    """Weights made under ComfyUI's inference mode cannot be saved for backward, so gradients could not flow
    through the frozen LLM / UNet to the adapters: each such parameter or buffer is replaced by an equal
    ordinary tensor (the same bytes; ComfyUI's own weight patching replaces parameters the same way)."""
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


class ComfyDenoiser:
    """The frozen diffusion model of a ComfyUI MODEL (loaded by the caller) as stage 2's Denoiser: timesteps
    -> sigmas from its own model_sampling, x0 from its own apply_model (sigma in, denoised latent out)."""

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


def token_id_student(llm, num_tokens: int, template: str):
    """student(text) -> (token ids as a (1, T, 1) float tensor (exact below 2^24), last real token): the ids
    llm_text.encode feeds the LLM (cut to the context, padded with the attended pad token to num_tokens)."""
    from ..bridges import llm_text
    model = llm.patcher.model.inner
    limit = min(llm_text.context_length(model), num_tokens)

    def student(text):
        ids, _, _ = llm_text.tokenize(llm.tokenizer, llm_text.apply_template(text, template), limit)
        last = ids.shape[1] - 1
        if ids.shape[1] < num_tokens:
            ids = torch.cat([ids, torch.full((1, num_tokens - ids.shape[1]), llm_text._pad_id(llm.tokenizer),
                                             dtype=ids.dtype)], dim=1)
        if int(ids.max()) >= 2 ** 24:
            raise LoadError(f"{llm.describe()}: token ids past 2^24 cannot be cached exactly")
        return ids[..., None].float(), last
    return student


def train_repadapter(run: Path, data: DistillData, latents, llm_module, mapper, denoiser, train_config: TrainConfig,
                     out_path, *, hidden_dim=8, groups=2, scale=1.0, dropout=0.1, hidden_layer=-1,
                     lambda_diffusion=0.1, device="cpu", **kwargs):
    """Beyond CLIP stage 2: fresh RepAdapters on every linear of `llm_module` (lm_head excepted) trained with
    L_cap + lambda * L_diffusion, mapper / LLM / UNet frozen; written with save_repadapter. The LLM and mapper
    must already sit on `device` as ordinary (non-inference) tensors. Returns (adapters in eval mode, trainer)."""
    from ..bridges.repadapter import build_adapters, find_linear_targets
    from ..bridges.training import RepAdapterStudent, RepAdapterTrainer
    from .repadapters import save_repadapter
    if data.targets.shape[-1] != mapper.config.out_dim:
        raise LoadError(f"the CLIP gives {data.targets.shape[-1]}-wide tokens but the mapper "
                        f"{getattr(mapper, 'source', '')} writes {mapper.config.out_dim}; connect the CLIP of the "
                        f"checkpoint the mapper was trained for")
    if latents is not None and len(latents) != len(data):
        raise LoadError(f"{len(latents)} latents for {len(data)} captions")
    if mapper.pooled is None and data.pooled is not None:
        data = DistillData(data.inputs, data.last_token, data.targets, None)
    targets = find_linear_targets(llm_module)
    adapters = seeded_init(train_config.seed, lambda: build_adapters(llm_module, targets, hidden_dim, groups, scale,
                                                                     dropout))
    student = RepAdapterStudent(llm_module, adapters, mapper, hidden_layer)

    def make_trainer():
        return RepAdapterTrainer(student, data, latents, denoiser, train_config, lambda_diffusion, device=device)

    def write():
        save_repadapter(out_path, adapters.eval(), hidden_dim, groups, scale)
        return out_path

    info = {"repadapter": {"hidden_dim": hidden_dim, "groups": groups, "scale": scale, "dropout": dropout,
                           "hidden_layer": hidden_layer, "lambda_diffusion": lambda_diffusion,
                           "mapper": getattr(mapper, "identity", ""), "images": latents is not None}}
    trainer = train_distill(run, data, student, info, train_config, write, device=device,
                            make_trainer=make_trainer, **kwargs)
    return adapters.eval().requires_grad_(False), trainer


# ---- MUMU stage 2: connector + LoRA on Idefics2 and on the SDXL UNet, the UNet's denoising loss ------------

# Idefics2's text-model attention projections (peft's usual LoRA targets for Mistral-class models; the paper
# gives only the rank). The vision tower stays as it is.
IDEFICS2_LORA_LAYERS = r"^text_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"


def mumu_examples(vlm, captions, image_resolution: int):
    """[(Sequence, crop pixels (n, 3, R, R) or None)] of MUMU caption lines (crops bound to their <image>)."""
    from ..bridges import mumu as mumu_bridge
    from .mumu import grid_for
    grid, resolution = grid_for(vlm, image_resolution)
    examples = []
    for line in captions:
        text, crops = parse_mumu_caption(line)
        try:
            segments = mumu_bridge.bind_placeholders(text, [""] * len(crops))
            seq = mumu_bridge.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context)
        except mumu_bridge.PromptError as e:
            raise LoadError(f"caption {text!r}: {e}") from None
        pixels = (torch.stack([mumu_bridge.prepare_image(load_input_image(c), resolution, vlm.image_mean,
                                                         vlm.image_std) for c in crops]) if crops else None)
        examples.append((seq, pixels))
    return examples


def mumu_output_paths(output_name: str) -> dict:
    """Where MUMU stage 2 writes, each listed by its loader at once: the connector in models/bridges, the Idefics2
    LoRA as a peft folder in models/LLM, the UNet LoRA in models/loras. Files of others are never replaced."""
    from .mumu import IDEFICS2_LORA_KIND, KIND, PEFT_WEIGHTS, UNET_LORA_KIND, check_replaceable
    name = check_name(output_name, "output name")
    paths = {"connector": bridge_path(name, kind=KIND),
             "idefics2_lora": Path(folder_paths.get_folder_paths(folders.LLM)[0]) / f"{name}-idefics2-lora",
             "unet_lora": Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}-unet-lora.safetensors"}
    check_replaceable(paths["unet_lora"], UNET_LORA_KIND)
    check_replaceable(paths["idefics2_lora"] / PEFT_WEIGHTS[0], IDEFICS2_LORA_KIND)
    return paths


def train_mumu(run: Path, examples, latents, vlm_module, connector, model, denoiser, train_config: TrainConfig,
               out_paths: dict, *, rank=8, lrs=None, hidden_layer=-1, device="cpu", **kwargs):
    """MUMU stage 2: the connector (from stage 1) trained on with fresh rank-`rank` LoRAs on Idefics2's text
    attention and on the UNet's attention projections (the MUMU UNet LoRA targets), by the frozen UNet's
    denoising loss. Idefics2 and the UNet must sit on `device` as ordinary (non-inference) tensors.
    out_paths: {"connector": bridge file, "idefics2_lora": peft folder, "unet_lora": kohya file}.
    Returns (connector, idefics2 LoRASet, unet LoRASet, trainer)."""
    import copy
    from ..bridges.training import LoRASet, MUMUStage2Student, MUMUStage2Trainer, linear_paths
    from .mumu import save_connector, save_idefics2_lora, save_unet_lora, unet_lora_targets
    lrs = {"connector": 1e-5, "idefics2_lora": 3e-6, "unet_lora": 5e-6, **(lrs or {})}
    unet = model.model.diffusion_model
    unet_paths = [k[len("diffusion_model."):-len(".weight")] for k in unet_lora_targets(model.model.state_dict())]
    vlm_paths = linear_paths(vlm_module, IDEFICS2_LORA_LAYERS)
    if not unet_paths or not vlm_paths:
        raise LoadError(f"found {len(vlm_paths)} Idefics2 and {len(unet_paths)} UNet attention layers to adapt; "
                        f"MUMU stage 2 needs an Idefics2 and an SDXL MODEL")
    trained = copy.deepcopy(connector).float().requires_grad_(True).train()
    vlm_lora = seeded_init(train_config.seed, lambda: LoRASet.for_linears(vlm_module, vlm_paths, rank))
    unet_lora = seeded_init(train_config.seed + 1, lambda: LoRASet.for_linears(unet, unet_paths, rank))
    student = MUMUStage2Student(vlm_module, trained, vlm_lora, unet, unet_lora, hidden_layer)

    def make_trainer():
        return MUMUStage2Trainer(student, examples, latents, denoiser, train_config, lrs, device=device)

    def write():
        save_connector(out_paths["connector"], trained.eval())
        save_idefics2_lora(out_paths["idefics2_lora"], vlm_lora.factors(), vlm_lora.alpha)
        save_unet_lora(out_paths["unet_lora"], {f"diffusion_model.{p}.weight": f for p, f in unet_lora.factors().items()},
                       unet_lora.alpha, {"beyond_clip_run": run.name})
        return out_paths["connector"]

    info = {"mumu_stage2": {"rank": rank, "lrs": lrs, "hidden_layer": hidden_layer,
                            "connector": fingerprint(connector.state_dict()),
                            "unet_layers": len(unet_paths), "idefics2_layers": len(vlm_paths)}}
    trainer = train_distill(run, examples, student, info, train_config, write, device=device,
                            make_trainer=make_trainer, **kwargs)
    return trained.eval().requires_grad_(False), vlm_lora.eval(), unet_lora.eval(), trainer
