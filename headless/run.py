"""Run a workflow file end to end in a booted host; stand in small built-in models for missing weights."""
import logging
from pathlib import Path

from . import tiny_llm
from .workflow import WorkflowError, load_workflow, to_api

log = logging.getLogger(__name__)
TINY_LLM = "beyond-clip-tiny-llama"
MODEL_DIRECTORIES = ("LLM", "grounding-dino")  # model folders whose entries are Hugging Face folders, not files


def _present(folder_paths, folder, name, directory=False):
    if directory:
        return any((Path(p) / name / "config.json").is_file() for p in folder_paths.get_folder_paths(folder))
    return folder_paths.get_full_path(folder, name) is not None


def use_builtin_models(prompt: dict, arch: str, host, demo_dir: Path):
    """Swap every loader whose file is absent for a small random model of the same layout. Returns what was
    swapped, so the caller can say so plainly."""
    from ..loaders.mappers import save_mapper
    from ..loaders.repadapters import save_repadapter

    fp = host.folder_paths
    swapped = []
    llm_dir = demo_dir / "LLM"
    bridges_dir = demo_dir / "bridges"
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and not _present(fp, "checkpoints", inputs["ckpt_name"]):
            swapped.append(f"checkpoint {inputs['ckpt_name']} -> tiny random {arch} UNet, CLIP and VAE")
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}}
        elif kind == "BeyondCLIP_LLMLoader" and not _present(fp, "LLM", inputs["llm_name"], directory=True):
            if not (llm_dir / TINY_LLM / "config.json").is_file():
                tiny_llm.write_llm_folder(llm_dir / TINY_LLM)
            swapped.append(f"LLM {inputs['llm_name']} -> {TINY_LLM} (2 layers, width 64, random)")
            inputs["llm_name"] = TINY_LLM
        elif kind == "BeyondCLIP_MapperLoader" and not _present(fp, "bridges", inputs["mapper_name"]):
            name = f"beyond-clip-tiny-mapper-{arch}.safetensors"
            if not (bridges_dir / name).is_file():
                save_mapper(bridges_dir / name, tiny_llm.random_mapper(64, "sdxl" if arch == "sdxl" else "sd1"))
            swapped.append(f"mapper {inputs['mapper_name']} -> {name} (random)")
            inputs["mapper_name"] = name
        elif kind == "BeyondCLIP_RepAdapterLoader" and not _present(fp, "bridges", inputs["adapter_name"]):
            name = "beyond-clip-tiny-repadapter.safetensors"
            if not (bridges_dir / name).is_file():
                if not (llm_dir / TINY_LLM / "config.json").is_file():
                    tiny_llm.write_llm_folder(llm_dir / TINY_LLM)
                save_repadapter(bridges_dir / name, tiny_llm.random_repadapters(llm_dir / TINY_LLM), 8, 2, 0.5)
            swapped.append(f"RepAdapter {inputs['adapter_name']} -> {name} (random, for {TINY_LLM})")
            inputs["adapter_name"] = name
    if swapped:
        for folder, path in (("LLM", llm_dir), ("bridges", bridges_dir)):
            path.mkdir(parents=True, exist_ok=True)
            if str(path) not in fp.get_folder_paths(folder):
                fp.add_model_folder_path(folder, str(path))
        for node in prompt.values():  # the tiny UNet is made for small latents
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=128, height=128)
    return swapped


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


def apply_overrides(prompt: dict, overrides):
    for node_id, name, value in overrides:
        if node_id not in prompt:
            raise WorkflowError(f"--set {node_id}.{name}: the workflow has no node {node_id} "
                                f"(its nodes: {', '.join(sorted(prompt, key=str))})")
        prompt[node_id]["inputs"][name] = value


def prepare(path, host, overrides=(), builtin_models=True):
    """(API prompt, missing files, swapped models) for a workflow file, the UI format converted with the
    host's node definitions."""
    workflow = load_workflow(path)
    prompt = to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    apply_overrides(prompt, overrides)
    missing = missing_models(workflow, host.folder_paths)
    swapped = []
    if missing and builtin_models:
        about = (workflow.get("extra") or {}).get("beyond_clip", {})
        demo_dir = Path(host.folder_paths.get_temp_directory()) / "beyond_clip_builtin_models"
        swapped = use_builtin_models(prompt, about.get("arch", "sd15"), host, demo_dir)
    return prompt, missing, swapped
