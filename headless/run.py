"""Run a workflow file end to end in a booted host; stand in small built-in models for missing weights and put
the pack's example inputs where ComfyUI looks for them."""
import logging
from dataclasses import dataclass
from pathlib import Path

from . import examples
from .workflow import WorkflowError, host_at_least, host_requirement_reason, load_workflow, to_api

log = logging.getLogger(__name__)

# Names of the built-in models (written into the run's temp folder, under folders registered like models/<folder>).
TINY_LLM = "beyond-clip-tiny-llama"
MODEL_DIRECTORIES = ("LLM", "grounding-dino")  # model folders whose entries are Hugging Face folders (or .gguf files)
TINY_OPT = "beyond-clip-tiny-opt"
TINY_GILL = "beyond-clip-tiny-gill"
TINY_SEED = "seed/beyond-clip-tiny/seed_tokenizer.pth"
TINY_SEED_LLM = "beyond-clip-tiny-seed-llm.safetensors"
TINY_IDEFICS2 = "beyond-clip-tiny-idefics2"
TINY_IDEFICS2_LORA = "beyond-clip-tiny-idefics2-lora"
TINY_CONNECTOR = "beyond-clip-tiny-mumu-connector.safetensors"
TINY_UNET_LORA = "beyond-clip-tiny-mumu-unet-lora.safetensors"
TINY_REPADAPTER = "beyond-clip-tiny-repadapter.safetensors"
# The built-in Idefics2 takes pictures up to 504 px in 14-px patches (as idefics2-8b's patches), so the workflows'
# image resolutions (252 and 504) run as written; its text model reads 4096 tokens (three 324-token pictures fit).
TINY_IDEFICS2_SIZE = {"image_size": 504, "patch_size": 14, "context": 4096, "image_seq_len": 64}
TINY_GROUNDING_DINO = "beyond-clip-tiny-grounding-dino"
BUILTIN_FOLDERS = ("LLM", "bridges", "loras", "text_encoders", "grounding-dino")
# Training on built-in random models shows the code path, not a result: each Train node stops after this many
# steps unless --set gives its steps (MUMU stage 2 is a forward and backward pass through Idefics2 and the UNet
# per example: fewer).
BUILTIN_TRAIN_STEPS = {"BeyondCLIP_TrainMapper": {"steps": 60}, "BeyondCLIP_TrainGILLMapper": {"steps": 60},
                       "BeyondCLIP_TrainGILLDecision": {"steps": 60}, "BeyondCLIP_TrainMUMUConnector": {"steps": 30},
                       "BeyondCLIP_TrainRepAdapter": {"steps": 10}, "BeyondCLIP_TrainMUMU": {"steps": 6},
                       "BeyondCLIP_TrainSEEDLLM": {"stage1_steps": 10, "stage2_steps": 20},
                       "BeyondCLIP_TrainSEEDSDXLHead": {"steps": 60}}


class BuiltinModels:
    """Writes each built-in model once per run into `root`/<folder>/ and returns the name its loader lists."""

    def __init__(self, root: Path, arch: str):
        self.root, self.arch = Path(root), arch

    def _made(self, folder, name, write):
        path = self.root / folder / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
        return path

    def llama(self):
        from .tiny_llm import write_llm_folder
        return self._made("LLM", TINY_LLM, write_llm_folder)

    def opt(self):
        from .tiny_gill import write_opt_folder
        return self._made("LLM", TINY_OPT, write_opt_folder)

    def mapper(self):
        from ..loaders.mappers import save_mapper
        from .tiny_llm import random_mapper
        target = "sdxl" if self.arch == "sdxl" else "sd1"
        name = f"beyond-clip-tiny-mapper-{self.arch}.safetensors"
        self._made("bridges", name, lambda p: save_mapper(p, random_mapper(64, target)))
        return name

    def repadapter(self):
        from ..loaders.repadapters import save_repadapter
        from .tiny_llm import random_repadapters
        llm = self.llama()
        self._made("bridges", TINY_REPADAPTER, lambda p: save_repadapter(p, random_repadapters(llm), 8, 2, 0.5))
        return TINY_REPADAPTER

    def gill(self):
        from . import tiny_gill
        self._made("bridges", TINY_GILL, lambda p: tiny_gill.write_release(p, tiny_gill.random_state()))
        return TINY_GILL

    def seed(self):
        from .tiny_seed import write_official
        self._made("bridges", str(Path(TINY_SEED).parent), write_official)
        return TINY_SEED

    def seed_llm(self):
        """An untrained SEED-LLM for the built-in Llama and SEED tokenizer, as Train SEED-LLM starts one: the code
        rows from the SEED codebook through a random projection, the LoRA at zero."""
        path = self.root / "bridges" / TINY_SEED_LLM
        if not path.exists():
            from ..engine.train_seed_llm import SeedLLMSettings, build_student
            from ..loaders import seed as seed_files
            from ..loaders import seed_llm as seed_llm_files
            from ..loaders.llm import load_llm
            llm = load_llm(TINY_LLM, self.llama(), "fp32")
            official = self.root / "bridges" / self.seed()
            seed = seed_files.load_seed(seed_files.prepare(official, self.root / "bridges"), name=TINY_SEED)
            codebook = seed.inner.quantize.embedding.weight.detach().float().cpu()
            student = build_student(llm.inner, codebook, SeedLLMSettings())
            paths = {"vocab": path, "lora": self.root / "LLM" / (path.stem + seed_llm_files.LORA_SUFFIX)}
            seed_llm_files.save_seed_llm(paths, student.vocab, student.lora, seed_llm_files.llm_identity(llm),
                                         seed_llm_files.seed_identity(seed), {"built_in": "untrained"})
        return TINY_SEED_LLM

    def idefics2(self):
        from .tiny_mumu import write_idefics2_folder
        return self._made("LLM", TINY_IDEFICS2, lambda p: write_idefics2_folder(p, **TINY_IDEFICS2_SIZE))

    def idefics2_lora(self):
        from .tiny_mumu import write_idefics2_lora
        base = self.idefics2()
        return self._made("LLM", TINY_IDEFICS2_LORA, lambda p: write_idefics2_lora(p, base))

    def connector(self):
        from .tiny_mumu import write_connector
        self._made("bridges", TINY_CONNECTOR, write_connector)
        return TINY_CONNECTOR

    def grounding_dino(self):
        from .tiny_grounding_dino import write_grounding_dino_folder
        return self._made("grounding-dino", TINY_GROUNDING_DINO, write_grounding_dino_folder)

    def text_encoder(self, kind):
        """A small text-encoder file of ComfyUI's own classes for Load CLIP type `kind` (its hidden width is the
        built-in mapper's, 64)."""
        from .tiny_text_encoders import write_text_encoder
        name = f"beyond-clip-tiny-{kind}.safetensors"
        self._made("text_encoders", name, lambda p: write_text_encoder(p, kind))
        return name

    def unet_lora(self):
        from .tiny_models import tiny_checkpoint
        from .tiny_mumu import write_unet_lora
        self._made("loras", TINY_UNET_LORA, lambda p: write_unet_lora(p, tiny_checkpoint("sdxl")[0]))
        return TINY_UNET_LORA


@dataclass(frozen=True)
class StandIn:
    """How one loader node type gets a built-in model: the input naming its file, the family of models that must
    fit together (one missing swaps the whole family), and what stands in."""
    family: str
    input: str
    says: str  # what the built-in model is, for the run's message
    swap: object  # (builtins, node) -> None: points the node at the built-in model (or replaces the node)


def _point(input_name, make):
    def swap(builtins, node):
        made = make(builtins)
        node["inputs"][input_name] = made.name if isinstance(made, Path) else made
    return swap


def _replace(class_type, inputs):
    def swap(builtins, node):
        node["class_type"], node["inputs"] = class_type, inputs(builtins)
    return swap


def _lora(builtins, node):
    node["inputs"]["lora_name"] = builtins.unet_lora()


def _text_encoder(builtins, node):
    """The stock Load CLIP becomes the test loader of the same file layout (ComfyUI's classes are full-size)."""
    from .tiny_text_encoders import KINDS
    kind = node["inputs"].get("type")
    if kind not in KINDS:
        raise WorkflowError(f"no built-in text encoder stands in for Load CLIP type {kind!r} (built-in: "
                            f"{', '.join(KINDS)}); put the workflow's text-encoder file in models/text_encoders")
    node["class_type"], node["inputs"] = "BeyondCLIP_TinyTextEncoderLoader", {
        "clip_name": builtins.text_encoder(kind), "type": kind}


STAND_INS = {
    "CheckpointLoaderSimple": StandIn("checkpoint", "ckpt_name", "small random {arch} UNet, CLIP and VAE",
                                      _replace("BeyondCLIP_TinyCheckpoint", lambda b: {"arch": b.arch})),
    "LoraLoaderModelOnly": StandIn("checkpoint", "lora_name", f"{TINY_UNET_LORA} (random, for the small UNet)",
                                   _lora),
    "BeyondCLIP_LLMLoader": StandIn("beyond_clip", "llm_name", f"{TINY_LLM} (Llama, 2 layers, width 64, random)",
                                    _point("llm_name", BuiltinModels.llama)),
    "BeyondCLIP_MapperLoader": StandIn("beyond_clip", "mapper_name", "beyond-clip-tiny-mapper-{arch}.safetensors "
                                       "(random)", _point("mapper_name", BuiltinModels.mapper)),
    "BeyondCLIP_RepAdapterLoader": StandIn("beyond_clip", "adapter_name", f"{TINY_REPADAPTER} (random, for "
                                           f"{TINY_LLM})", _point("adapter_name", BuiltinModels.repadapter)),
    "BeyondCLIP_GILLLoader": StandIn("gill", "gill_name", f"{TINY_GILL}/ (random, official release layout, for "
                                     f"{TINY_OPT})", _point("gill_name", BuiltinModels.gill)),
    "CLIPVisionLoader": StandIn("gill", "clip_name", "small random CLIP vision tower (width 64, 224 px)",
                                _replace("BeyondCLIP_TinyCLIPVision", lambda b: {"seed": 0})),
    "BeyondCLIP_SEEDLoader": StandIn("seed", "seed_model", f"{TINY_SEED} (random, official file layout, small "
                                     f"widths)", _point("seed_model", BuiltinModels.seed)),
    "BeyondCLIP_SEEDLLMLoader": StandIn("seed_llm", "seed_llm", f"{TINY_SEED_LLM} (untrained: code rows from the "
                                        f"SEED codebook through a random layer, LoRA at zero; for {TINY_LLM} and "
                                        f"the built-in SEED tokenizer)", _point("seed_llm", BuiltinModels.seed_llm)),
    "BeyondCLIP_MUMULoadIdefics2": StandIn("mumu", "idefics2_name", f"{TINY_IDEFICS2} (random, 14-px patches up to "
                                           f"504 px, text width 64)", _point("idefics2_name", BuiltinModels.idefics2)),
    "BeyondCLIP_MUMUIdefics2LoRA": StandIn("mumu", "lora_name", f"{TINY_IDEFICS2_LORA} (random peft LoRA, for "
                                           f"{TINY_IDEFICS2})", _point("lora_name", BuiltinModels.idefics2_lora)),
    "BeyondCLIP_MUMULoadConnector": StandIn("mumu", "connector_name", f"{TINY_CONNECTOR} (random, 2 layers)",
                                            _point("connector_name", BuiltinModels.connector)),
    "BeyondCLIP_LoadGroundingDINO": StandIn("dataset", "detector_name", f"{TINY_GROUNDING_DINO} (random Grounding "
                                            f"DINO, small Swin and BERT)", _point("detector_name",
                                                                                  BuiltinModels.grounding_dino)),
    # a mapper is trained for one text encoder: the encoder and the mapper stand in together
    "CLIPLoader": StandIn("beyond_clip", "clip_name", "a small random text encoder of ComfyUI's own classes, in "
                          "its file layout (width 64)", _text_encoder),
}
# GILL's LLM is OPT: with a GILL model in the graph, Load LLM belongs to GILL's family and gets the small OPT.
GILL_LLM = StandIn("gill", "llm_name", f"{TINY_OPT} (OPT, 2 layers, width 64, random)",
                   _point("llm_name", BuiltinModels.opt))
# A SEED-LLM is trained for one LLM and one SEED tokenizer: with Load SEED-LLM in the graph, the three stand in
# together.
SEED_LLM_FAMILY = {"BeyondCLIP_LLMLoader": StandIn("seed_llm", "llm_name", STAND_INS["BeyondCLIP_LLMLoader"].says,
                                                   _point("llm_name", BuiltinModels.llama)),
                   "BeyondCLIP_SEEDLoader": StandIn("seed_llm", "seed_model", STAND_INS["BeyondCLIP_SEEDLoader"].says,
                                                    _point("seed_model", BuiltinModels.seed))}


@dataclass(frozen=True)
class Fit:
    """A setting made for full-size models that the built-in ones cannot take in reasonable time on a CPU."""
    family: str  # applied when this family runs on built-in models
    values: dict
    why: str


FITS = {
    "EmptyLatentImage": Fit("checkpoint", {"width": 128, "height": 128}, "the small UNet is made for small latents"),
    "BeyondCLIP_TrainRepAdapter": Fit("checkpoint", {"resolution": 128}, "the small UNet is made for small latents"),
}
# Second fits of the same node types, for another family.
FITS_MUMU = {
    "BeyondCLIP_TrainMUMUConnector": Fit("mumu", {"width": 64, "depth": 2, "heads": 4, "image_resolution": 126},
                                         "a small connector, 81 tokens per crop: training on a CPU"),
    "BeyondCLIP_TrainMUMU": Fit("mumu", {"image_resolution": 126}, "81 tokens per crop: training on a CPU"),
}
FITS_CHECKPOINT = {
    "BeyondCLIP_TrainMUMU": Fit("checkpoint", {"resolution": 128}, "the small UNet is made for small latents"),
}


def _stand_in(prompt, node):
    if node["class_type"] == "BeyondCLIP_LLMLoader" and any(
            n["class_type"] == "BeyondCLIP_GILLLoader" for n in prompt.values()):
        return GILL_LLM
    if node["class_type"] in SEED_LLM_FAMILY and any(
            n["class_type"] == "BeyondCLIP_SEEDLLMLoader" for n in prompt.values()):
        return SEED_LLM_FAMILY[node["class_type"]]
    return STAND_INS.get(node["class_type"])


def _listed(host, node, input_name) -> bool:
    """Whether the node's dropdown lists the chosen name: what the host's validation checks."""
    node_class = host.nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
    spec = node_class.INPUT_TYPES().get("required", {}).get(input_name)
    value = node["inputs"].get(input_name)
    return spec is not None and isinstance(spec[0], (list, tuple)) and value in spec[0]


def use_builtin_models(prompt: dict, arch: str, host, demo_dir: Path, first_models_dirs=0, fixed=()):
    """Swap every loader whose model is not listed for a small random model of the same layout, and with it every
    loader of the same family (the built-in models fit one another, not full-size ones). Settings the built-in
    models cannot take are fitted (except those in `fixed`, (node id, input) pairs set by the user). Returns the
    lines to show, so the caller can say plainly what was swapped and changed."""
    builtins = BuiltinModels(demo_dir, arch)
    rows = {node_id: _stand_in(prompt, node) for node_id, node in prompt.items()}
    rows = {node_id: row for node_id, row in rows.items() if row is not None}
    missing = {node_id for node_id, row in rows.items() if not _listed(host, prompt[node_id], row.input)}
    families = {rows[node_id].family for node_id in missing}
    if not families:
        return []
    for folder in BUILTIN_FOLDERS:  # before ComfyUI's own folders: training results of built-in runs land here
        host.add_models_dir(demo_dir, [folder], position=first_models_dirs)
    said = []
    for node_id in sorted(rows, key=_node_order):
        row, node = rows[node_id], prompt[node_id]
        if row.family not in families:
            continue
        old = node["inputs"].get(row.input)
        why = "" if node_id in missing else " (present, but the built-in models of its family need their own)"
        row.swap(builtins, node)
        said.append(f"{old}{why} -> {row.says.format(arch=arch)}")
    for node_id in sorted(prompt, key=_node_order):
        node = prompt[node_id]
        for table in (FITS, FITS_CHECKPOINT, FITS_MUMU):
            fit = table.get(node["class_type"])
            if fit is None or fit.family not in families:
                continue
            changed = {k: v for k, v in fit.values.items()
                       if (node_id, k) not in fixed and k in node["inputs"] and node["inputs"][k] != v}
            if changed:
                node["inputs"].update(changed)
                said.append(f"node {node_id} ({node['class_type']}): " + ", ".join(
                    f"{k} {v}" for k, v in changed.items()) + f" ({fit.why})")
        for name, cap in BUILTIN_TRAIN_STEPS.get(node["class_type"], {}).items():
            steps = node["inputs"].get(name)
            if (node_id, name) not in fixed and isinstance(steps, int) and steps > cap:
                node["inputs"][name] = cap
                which = "" if name == "steps" else f" ({name})"
                said.append(f"node {node_id} ({node['class_type']}): {cap} training steps instead of {steps}{which} "
                            f"(random models: this shows the code path; --set {node_id}.{name}=N trains longer)")
    return said


def _node_order(node_id):
    return (0, int(node_id)) if str(node_id).isdigit() else (1, str(node_id))


def missing_models(workflow: dict, folder_paths) -> list:
    """What the workflow declares it needs (extra.beyond_clip.models: {folder: [names]}) that is not here,
    each with where to put it. Checked before anything is loaded."""
    declared = ((workflow.get("extra") or {}).get("beyond_clip") or {}).get("models") or {}
    missing = []
    for folder, names in declared.items():
        for name in names:
            if not _present(folder_paths, folder, name, directory=(folder in MODEL_DIRECTORIES)):
                try:
                    where = folder_paths.get_folder_paths(folder)
                except KeyError:
                    where = [f"models/{folder}"]
                kind = "a Hugging Face model folder" if folder in MODEL_DIRECTORIES else "a file"
                missing.append(f"{name} ({kind}) in {folder}: put it in {where[0]}")
    return missing


def _present(folder_paths, folder, name, directory=False):
    try:
        paths = folder_paths.get_folder_paths(folder)
    except KeyError:
        return False
    if directory and not name.endswith(".gguf"):  # a model folder (config.json), or a peft LoRA folder
        return any((Path(p) / name / marker).is_file() for p in paths for marker in ("config.json",
                                                                                     "adapter_config.json"))
    return any((Path(p) / name).exists() for p in paths)


def apply_overrides(prompt: dict, overrides):
    for node_id, name, value in overrides:
        if node_id not in prompt:
            raise WorkflowError(f"--set {node_id}.{name}: the workflow has no node {node_id} "
                                f"(its nodes: {', '.join(sorted(prompt, key=str))})")
        prompt[node_id]["inputs"][name] = value


def check_host(workflow: dict, host):
    """A workflow that needs a newer ComfyUI than the one running says so (extra.beyond_clip.requires_comfyui)."""
    needed = ((workflow.get("extra") or {}).get("beyond_clip") or {}).get("requires_comfyui")
    if needed and not host_at_least(host.version, needed):
        raise WorkflowError(f"this workflow needs ComfyUI {needed} or newer ({host_requirement_reason(workflow)}); "
                            f"this is ComfyUI {host.version}")


def prepare(path, host, overrides=(), builtin_models=True, first_models_dirs=0):
    """(API prompt, missing files, swapped models and fitted settings, example inputs placed) for a workflow file,
    the UI format converted with the host's node definitions. Example inputs the workflow names are put in the
    host's input folder first (a file of the same name there is kept and used)."""
    workflow = load_workflow(path)
    check_host(workflow, host)
    prompt = to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    apply_overrides(prompt, overrides)
    placed = examples.place(prompt, Path(host.folder_paths.get_input_directory()))
    missing = missing_models(workflow, host.folder_paths)
    swapped = []
    if builtin_models:
        about = (workflow.get("extra") or {}).get("beyond_clip", {})
        demo_dir = Path(host.folder_paths.get_temp_directory()) / "beyond_clip_builtin_models"
        swapped = use_builtin_models(prompt, about.get("arch", "sd15"), host, demo_dir, first_models_dirs,
                                     fixed={(node_id, name) for node_id, name, _ in overrides})
    return prompt, missing, swapped, placed
