"""SEED v1 tokenizer files: the official release, converted once into the pack's safetensors format.

Official files (put them together in a folder under models/bridges, e.g. models/bridges/seed/):
  seed_tokenizer.pth   {"model": codebook, encode/decode task layers, pos_embed_text, blocks_text,
                        Reverse_Qformer, reverse_tokens, distill_text_proj}  (AILab-CVC/seed-tokenizer-1)
  causal_qformer.pth   {"model": Qformer.bert.*, query_tokens, ln_vision, + the stage-1 text branch}
  eva_vit_g.pth        the LAVIS EVA-CLIP ViT-g/14 state dict
All three are pickles, read with torch.load(weights_only=True). The first load checks every tensor by name
(the upstream's strict=False hides missing ones), derives the config from the shapes, and writes
models/bridges/seed-v1[-<folder>].safetensors (kind 'seed_v1', LAVIS key names, config in the metadata);
later loads read that file, memory-mapped.
"""
import gc
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bridges.seed import SeedConfig, SeedTokenizer
from . import patcher as patching
from . import pickles
from .bridge_files import FORMAT, check_layer_counts, read_bridge, read_metadata, save_bridge
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle, shared

KIND = "seed_v1"
TOKENIZER_FILE = "seed_tokenizer.pth"
QFORMER_FILE = "causal_qformer.pth"
VIT_FILE = "eva_vit_g.pth"
SEED2_FILE = "seed_quantizer.pt"  # the SEED-2 / SEED-LLaMA tokenizer: listed so that choosing it explains itself
OFFICIAL_NAMES = (TOKENIZER_FILE, SEED2_FILE)
EVA_G_WIDTH, EVA_G_LAYERS = 1408, 39  # LAVIS builds ViT-g with depth 39: BLIP-2 drops EVA-CLIP's last block
EVA_HEAD_WIDTH, BERT_HEAD_WIDTH = 88, 64  # per-head widths: 1408 / 16 and 768 / 12 (shapes do not say)
SEARCH_DEPTH = 3
log = logging.getLogger(__name__)

# Tensors the official files carry that SEED does not use (the reference discards them with strict=False or
# by setting the modules to None). They are left out of the converted file, and said so.
IGNORED = [
    (re.compile(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.|Qformer\.bert\.embeddings\.position_ids$"
                r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|Qformer\.cls\.|(vision_proj|text_proj|itm_head)\.|temp$"),
     "the Q-Former's text branch and stage-1 heads (SEED sets them to None)"),
    (re.compile(r"(pos_embed|blocks\.\d+\..*)$"), "the training-only reconstruction head (pos_embed, blocks)"),
    # BERT's position_ids buffer (0, 1, 2, ...): saved by the transformers of SEED's time, computed, never learnt
    (re.compile(r"Reverse_Qformer\.bert\.embeddings\.position_ids$"), "the reverse Q-Former's position_ids buffer"),
]
SEED2_MARKERS = ("distill_image_proj.", "blocks_image.", "pos_embed_image", "image_down.")


# ---------------------------------------------------------------------------------------------- reading files

def read_pickle(path: Path, what: str) -> dict:
    """A state dict from an official .pth/.pt file, unpickled with weights_only=True only."""
    where = (f"SEED v1 needs {TOKENIZER_FILE}, {QFORMER_FILE} and {VIT_FILE} in one folder under "
             f"models/bridges/")
    if not path.is_file():
        raise LoadError(f"{path}: no such file. Put the {what} there ({where}).")
    obj = pickles.load(path, f"Download the {what} of the official release again ({where}).")
    for nest in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise LoadError(f"{path} is not a state dict of tensors (under 'model' or at the top); it is not the {what}.")
    return obj


def _some(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def check_tokenizer_file(sd: dict, path: Path):
    has = lambda prefix: any(k.startswith(prefix) for k in sd)  # noqa: E731
    if any(has(m) for m in SEED2_MARKERS) and "distill_text_proj.weight" not in sd:
        raise LoadError(f"{path} is a SEED-2 (SEED-LLaMA) tokenizer: its de-tokenizer "
                        f"({_some(k for k in sd if k.startswith(SEED2_MARKERS))}) "
                        f"makes a 1024-wide image embedding for Stable Diffusion 2.1 unCLIP, not the SD1.x text "
                        f"conditioning of SEED v1. These nodes read SEED v1: {TOKENIZER_FILE} and {QFORMER_FILE} "
                        f"from AILab-CVC/seed-tokenizer-1 (github AILab-CVC/SEED, branch v1).")
    if not any(k in sd for k in ("quantize.embedding.weight", "distill_text_proj.weight", "reverse_tokens")):
        raise LoadError(f"{path} is not a SEED tokenizer file: it has none of quantize.embedding.weight, "
                        f"reverse_tokens, distill_text_proj.weight (its tensors: {_some(sd)}). It belongs to another "
                        f"model; choose the {TOKENIZER_FILE} of SEED v1.")


def check_qformer_file(sd: dict, path: Path):
    if "query_tokens" not in sd and not any(k.startswith("Qformer.bert.encoder.") for k in sd):
        raise LoadError(f"{path} is not SEED's causal Q-Former: it has no query_tokens and no Qformer.bert.* tensors "
                        f"(its tensors: {_some(sd)}). Put the {QFORMER_FILE} of SEED v1 beside {TOKENIZER_FILE}.")


def vit_state(sd: dict, path: Path) -> dict:
    """EVA ViT tensors under the 'visual_encoder.' prefix (the LAVIS model's own naming)."""
    if any(k.startswith("visual_encoder.") for k in sd):
        sd = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    if not all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")):
        raise LoadError(f"{path} is not the EVA-CLIP ViT-g of LAVIS: it lacks cls_token / pos_embed / "
                        f"patch_embed.proj.weight (its tensors: {_some(sd)}). Use LAVIS's {VIT_FILE}.")
    return {"visual_encoder." + k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- config

def _layer_indices(sd, prefix):
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pattern.match(k)] if m})


def _cross_frequency(sd, prefix, layers, what):
    cross = [i for i in range(layers) if f"{prefix}{i}.crossattention.self.query.weight" in sd]
    if not cross or cross[0] != 0:
        raise LoadError(f"the {what} has no cross-attention in its first layer; this is not a SEED Q-Former.")
    freq = cross[1] - cross[0] if len(cross) > 1 else layers
    if cross != list(range(0, layers, freq)):
        raise LoadError(f"the {what} has cross-attention in layers {cross}, not every n-th layer as a Q-Former does.")
    return freq


def _heads(width, head_width, what):
    if width % head_width:
        raise LoadError(f"the {what} is {width} wide, not a multiple of its {head_width}-wide heads; "
                        f"this is not the SEED v1 architecture.")
    return width // head_width


def derive_config(sd: dict) -> SeedConfig:
    """Every size from the tensors' shapes (LAVIS naming); head counts from the fixed head widths."""
    try:
        width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        blocks = _layer_indices(sd, "visual_encoder.blocks.")
        layers = min(len(blocks), EVA_G_LAYERS) if width == EVA_G_WIDTH else len(blocks)
        hidden = sd["query_tokens"].shape[-1]
        q_layers = len(_layer_indices(sd, "Qformer.bert.encoder.layer."))
        r_layers = len(_layer_indices(sd, "Reverse_Qformer.bert.encoder.layer."))
        cross_width = sd["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1]
        if cross_width != width:
            raise LoadError(f"the causal Q-Former reads {cross_width}-wide image features, but the EVA ViT file is "
                            f"{width} wide: the two files do not belong together.")
        codebook = sd["quantize.embedding.weight"]
        return SeedConfig(
            vision_width=width, vision_layers=layers, vision_heads=_heads(width, EVA_HEAD_WIDTH, "EVA ViT"),
            vision_mlp=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch,
            image_size=grid * patch,
            hidden=hidden, num_queries=sd["query_tokens"].shape[1], qformer_layers=q_layers,
            qformer_heads=_heads(hidden, BERT_HEAD_WIDTH, "Q-Former"),
            qformer_mlp=sd["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            cross_attention_freq=_cross_frequency(sd, "Qformer.bert.encoder.layer.", q_layers, "causal Q-Former"),
            codebook_size=codebook.shape[0], code_dim=codebook.shape[1],
            decoder_blocks=len(_layer_indices(sd, "blocks_text.")),
            decoder_heads=_heads(hidden, BERT_HEAD_WIDTH, "de-tokenizer"),
            decoder_mlp=sd["blocks_text.0.mlp.fc1.weight"].shape[0],
            reverse_queries=sd["reverse_tokens"].shape[1], reverse_layers=r_layers,
            reverse_heads=_heads(hidden, BERT_HEAD_WIDTH, "reverse Q-Former"),
            reverse_mlp=sd["Reverse_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            reverse_cross_attention_freq=_cross_frequency(sd, "Reverse_Qformer.bert.encoder.layer.", r_layers,
                                                          "reverse Q-Former"),
            out_dim=sd["distill_text_proj.weight"].shape[0])
    except KeyError as e:
        raise LoadError(f"the SEED files lack the tensor {e.args[0]!r}, which fixes the model's size; a file is "
                        f"incomplete or from another model.") from None
    except (IndexError, TypeError, ValueError, ZeroDivisionError) as e:  # tensors of the wrong rank or size
        raise LoadError(f"the SEED files hold tensors of shapes no SEED v1 model has ({type(e).__name__}: {e}); a "
                        f"file is damaged or from another model.") from None


# ---------------------------------------------------------------------------------------------- key mapping

_TO_LAVIS = [  # module key (transformers naming) -> LAVIS key
    (r"vision\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"vision\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"vision\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"vision\.encoder\.layers\.(\d+)\.self_attn\.", r"visual_encoder.blocks.\1.attn."),
    (r"vision\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"vision\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"vision\.post_layernorm\.", "ln_vision."),
    (r"(qformer|reverse_qformer)\.layernorm\.", r"\1.bert.embeddings.LayerNorm."),
    (r"(qformer|reverse_qformer)\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"\1.bert.encoder.layer.\2.\3.self."),
    (r"(qformer|reverse_qformer)\.encoder\.", r"\1.bert.encoder."),
]
_TO_LAVIS = [(re.compile(p), r) for p, r in _TO_LAVIS]
_FUSED_QKV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.bias$")


def lavis_name(module_key: str) -> str:
    for pattern, repl in _TO_LAVIS:
        if pattern.match(module_key):
            module_key = pattern.sub(repl, module_key, count=1)
            break
    return module_key.replace("reverse_qformer.", "Reverse_Qformer.", 1).replace("qformer.", "Qformer.", 1) \
        if module_key.startswith(("qformer.", "reverse_qformer.")) else module_key


def module_sources(module_keys):
    """module key -> the LAVIS key(s) it is made of. Recent transformers fuse EVA's q_bias/v_bias into one
    qkv bias [q, 0, v]; older ones keep them apart, as LAVIS does."""
    sources = {}
    for key in module_keys:
        name = lavis_name(key)
        m = _FUSED_QKV_BIAS.match(name)
        sources[key] = [f"visual_encoder.blocks.{m.group(1)}.attn.q_bias",
                        f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] if m else [name]
    return sources


def to_module_state(sources: dict, sd: dict) -> dict:
    out = {}
    for key, names in sources.items():
        if len(names) == 2:
            q, v = sd[names[0]], sd[names[1]]
            out[key] = torch.cat([q, torch.zeros_like(v), v])
        else:
            out[key] = sd[names[0]]
    return out


def _meta_model(config: SeedConfig) -> SeedTokenizer:
    with torch.device("meta"):
        return SeedTokenizer(config)


def classify(sd: dict, config: SeedConfig, model: SeedTokenizer = None):
    """(sources {module key: its LAVIS keys}, expected LAVIS keys, missing, ignored {reason: keys}, unexpected) for
    a merged LAVIS state dict (model: the config's model on the meta device, when the caller has it)."""
    sources = module_sources((model or _meta_model(config)).state_dict().keys())
    expected = {n for names in sources.values() for n in names}
    missing = sorted(expected - set(sd))
    ignored, unexpected = {}, []
    for key in sorted(set(sd) - expected):
        m = re.match(r"visual_encoder\.blocks\.(\d+)\.", key)
        if m and int(m.group(1)) >= config.vision_layers:
            ignored.setdefault(f"EVA blocks after the first {config.vision_layers} (BLIP-2 and SEED drop them)",
                               []).append(key)
            continue
        reason = next((r for p, r in IGNORED if p.match(key)), None)
        if reason:
            ignored.setdefault(reason, []).append(key)
        else:
            unexpected.append(key)
    return sources, expected, missing, ignored, unexpected


# ---------------------------------------------------------------------------------------------- conversion

def _fingerprint(paths):
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def official_paths(tokenizer_path: Path):
    folder = tokenizer_path.parent
    return tokenizer_path, folder / QFORMER_FILE, folder / VIT_FILE


def convert_official(tokenizer_path: Path, out_path: Path, progress=None) -> dict:
    """Read the three official files, check them tensor by tensor, write the pack's file. Returns a report."""
    tokenizer_path, qformer_path, vit_path = official_paths(Path(tokenizer_path))
    tok = read_pickle(tokenizer_path, f"SEED tokenizer ({TOKENIZER_FILE})")
    check_tokenizer_file(tok, tokenizer_path)
    progress and progress(1)
    qf = read_pickle(qformer_path, f"SEED causal Q-Former ({QFORMER_FILE})")
    check_qformer_file(qf, qformer_path)
    progress and progress(2)
    vit = vit_state(read_pickle(vit_path, f"EVA-CLIP ViT-g ({VIT_FILE})"), vit_path)
    progress and progress(3)
    # The reference loads causal_qformer.pth, then seed_tokenizer.pth over it.
    origin = {**{k: VIT_FILE for k in vit}, **{k: QFORMER_FILE for k in qf}, **{k: TOKENIZER_FILE for k in tok}}
    merged = {**vit, **qf, **tok}
    del tok, qf, vit
    config = derive_config(merged)
    try:
        model = _meta_model(config)
    except Exception as e:  # sizes no SEED model has
        raise LoadError(f"the SEED files in {tokenizer_path.parent} describe a model no SEED v1 is "
                        f"({type(e).__name__}: {str(e)[:200]}); a file is damaged or from another model.") from None
    sources, expected, missing, ignored, unexpected = classify(merged, config, model)
    again = f"download {TOKENIZER_FILE}, {QFORMER_FILE} and {VIT_FILE} again"
    if missing:
        raise LoadError(f"the SEED files in {tokenizer_path.parent} lack {len(missing)} tensor(s) the model needs: "
                        f"{_some(missing, 6)}. A file is incomplete or belongs to another release; {again}.")
    # Names and shapes are all checked before anything is written: a file that would not load is never made.
    wrong = wrong_shapes(config, sources, merged, model)
    if wrong:
        named = "; ".join(f"'{name}' in {origin.get(name, '?')}: {got} vs {need}" for name, got, need in wrong[:3])
        raise LoadError(f"the SEED files in {tokenizer_path.parent} do not fit together: {len(wrong)} tensor(s) have "
                        f"other shapes than the model their other tensors describe ({named}"
                        f"{' ...' if len(wrong) > 3 else ''}). A file is damaged or belongs to another release; "
                        f"{again}. Nothing was written.")
    for reason, keys in ignored.items():
        log.info("SEED: %d tensor(s) not used: %s (e.g. %s)", len(keys), reason, keys[0])
    if unexpected:
        log.warning("SEED: %d tensor(s) in %s are not part of SEED v1 and were left out: %s",
                    len(unexpected), tokenizer_path.parent, _some(unexpected, 8))
    report = {"sources": _fingerprint([tokenizer_path, qformer_path, vit_path]),
              "ignored": {reason: len(keys) for reason, keys in ignored.items()}, "unexpected": unexpected}
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        save_bridge(tmp, KIND, {"seed": config.to_dict(), "conversion": report}, {k: merged[k] for k in expected})
        os.replace(tmp, out_path)
    except OSError as e:
        raise LoadError(f"could not write the converted SEED file {out_path} ({e}). Free some disk space or make "
                        f"models/bridges writable.") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return report


def converted_path(tokenizer_path: Path, root: Path) -> Path:
    rel = tokenizer_path.parent.relative_to(root)
    parts = [p for p in rel.parts if p != "seed"]
    return root / ("-".join(["seed-v1", *parts]) + ".safetensors")


def is_fresh(converted: Path, tokenizer_path: Path) -> bool:
    if not converted.is_file():
        return False
    try:
        config, _ = read_bridge_config(converted)
    except LoadError:
        return False
    sources = [p for p in official_paths(tokenizer_path) if p.is_file()]
    return config.get("conversion", {}).get("sources") == _fingerprint(sources)


def read_bridge_config(path: Path):
    """(config, metadata) of a converted SEED file, from its header only; LoadError when it is not one."""
    meta = read_metadata(path)
    if meta is None:
        raise LoadError(f"{path}: not a readable safetensors file")
    if meta.get("format") != FORMAT or meta.get("kind") != KIND:
        raise LoadError(f"{path} is not a SEED v1 file")
    try:
        return json.loads(meta["config"]), meta
    except (KeyError, ValueError) as e:
        raise LoadError(f"{path}: its config metadata is missing or not JSON ({e})") from None


# ---------------------------------------------------------------------------------------------- loading

@dataclass(eq=False)
class LoadedSeed(Handle):
    """What the SEED_MODEL socket carries: tokenizer and de-tokenizer (the vision tower in `vision_dtype`)."""
    path: Path = None
    vision_dtype: torch.dtype = torch.float32
    what = "SEED tokenizer"


def wrong_shapes(config: SeedConfig, sources: dict, lavis_sd: dict, model: SeedTokenizer = None) -> list:
    """(LAVIS name, its shape, the shape the model needs) of every tensor that would not fit the model `config`
    describes, read from the shapes alone (nothing is built: the model is on the meta device)."""
    meta_state = (model or _meta_model(config)).state_dict()
    wrong = []
    for key, names in sources.items():
        need = tuple(meta_state[key].shape)
        if len(names) == 2:  # a fused [q, 0, v] bias from two LAVIS biases, a third each
            need = (need[0] // 3,) + need[1:]
        for name in names:
            got = tuple(lavis_sd[name].shape)
            if got != need:
                wrong.append((name, got, need))
    return wrong


def build_model(config: SeedConfig, lavis_sd: dict, path, vision_dtype=torch.float32) -> SeedTokenizer:
    """A SeedTokenizer from LAVIS-named tensors; anything missing or unexpected is an error naming it."""
    try:
        model = _meta_model(config)  # no memory: only shapes, whatever sizes the config claims
    except Exception as e:  # sizes the modules refuse (heads that do not divide, negative widths, ...)
        raise LoadError(f"{path}: its SEED config is not valid ({type(e).__name__}: {str(e)[:200]}). Delete it; it "
                        f"is converted again from the official files.") from None
    sources, expected, missing, ignored, unexpected = classify(lavis_sd, config, model)
    wrong = [] if missing else [f"{name}: file {got} vs expected {need}"
                                for name, got, need in wrong_shapes(config, sources, lavis_sd, model)]
    extra = unexpected + [k for keys in ignored.values() for k in keys]
    if missing or extra or wrong:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"unexpected {_some(extra)}"] if extra else []) \
            + ([f"wrong shapes: {wrong[:3]}"] if wrong else [])
        raise LoadError(f"{path} does not match the SEED model its config describes: " + "; ".join(parts) +
                        ". The file is damaged or was edited; delete it and it is converted again from the "
                        "official files.")
    state = to_module_state(sources, lavis_sd)
    state = {k: (v.to(vision_dtype) if k.startswith("vision.") else v.float()) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_seed(path: Path, vision_dtype=torch.float32, name=None, progress=None) -> LoadedSeed:
    """A converted SEED file (see prepare() for official files) as a ModelPatcher-hosted model; the vision
    tower in `vision_dtype`, everything else fp32."""
    path = Path(path)
    if not path.is_file():
        read_bridge(path, KIND)  # raises the missing-file message
    key = ("seed", str(path.resolve()), vision_dtype, file_identity(path))
    return shared(key, lambda: _load(path, vision_dtype, name, progress))


def _load(path: Path, vision_dtype, name, progress) -> LoadedSeed:
    try:
        seed_config, model = _read(path, vision_dtype, progress)
    except LoadError as e:  # refused by the checks: raised out here, no frame keeps the file's tensors alive
        message = str(e)
    except BaseException:
        gc.collect()  # nothing half-loaded stays in memory
        raise
    else:
        progress and progress(5)
        return LoadedSeed(patcher=patching.wrap(model), config=seed_config, source=str(path),
                          name=name or path.name, path=path, vision_dtype=vision_dtype,
                          identity=f"{file_identity(path)}:{vision_dtype}")
    raise LoadError(message)


def _read(path: Path, vision_dtype, progress):
    """(SeedConfig, SeedTokenizer) of a converted file: every count and shape checked before anything is built."""
    config, lavis_sd = read_bridge(path, KIND)
    progress and progress(4)
    redo = "Delete it; it is converted again from the official files."
    try:
        seed_config = SeedConfig.from_dict(config["seed"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise LoadError(f"{path}: its SEED config is not valid ({e}). {redo}") from None
    c = seed_config  # the layer counts it claims, against the tensors it holds, before anything is built
    check_layer_counts({"vision_layers": (c.vision_layers, "visual_encoder.blocks."),
                        "qformer_layers": (c.qformer_layers, "Qformer.bert.encoder.layer."),
                        "decoder_blocks": (c.decoder_blocks, "blocks_text."),
                        "reverse_layers": (c.reverse_layers, "Reverse_Qformer.bert.encoder.layer.")},
                       lavis_sd, path, "SEED", redo)
    return seed_config, build_model(seed_config, lavis_sd, path, vision_dtype)


def find_official(roots, depth=SEARCH_DEPTH):
    """(label, path, root) for every seed_tokenizer.pth / seed_quantizer.pt under the bridges folders."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            for name in OFFICIAL_NAMES:
                if name in filenames:
                    found.append(((rel / name).as_posix(), Path(dirpath) / name, root))
            if len(rel.parts) >= depth:
                dirnames.clear()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def prepare(path: Path, root: Path, progress=None) -> Path:
    """The converted file for an official tokenizer path (converting when absent or stale)."""
    if path.name == SEED2_FILE:
        check_tokenizer_file(read_pickle(path, "SEED-2 tokenizer"), path)  # raises the SEED-2 explanation
    out = converted_path(path, root)
    if not is_fresh(out, path):
        log.info("SEED: converting %s (+ %s, %s) into %s, once", path, QFORMER_FILE, VIT_FILE, out)
        convert_official(path, out, progress)
    return out
