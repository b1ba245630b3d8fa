"""What a user sees on install: the pack imports into a real ComfyUI cleanly, with no model files at all."""
import json
import subprocess
import sys

import pytest
from conftest import PACK_DIR, pack_module

BOOT = r"""
import importlib.util, json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(name)s: %(message)s")
spec = importlib.util.spec_from_file_location("host", sys.argv[1])
host_module = importlib.util.module_from_spec(spec); spec.loader.exec_module(host_module)
tmp = sys.argv[2]
host = host_module.Host(output_dir=tmp + "/output", temp_dir=tmp + "/temp", input_dir=tmp + "/input")
fp = host.folder_paths
fp.models_dir = tmp + "/models"  # a fresh ComfyUI: empty models folder
for name in ("LLM", "bridges"):
    fp.folder_names_and_paths.pop(name, None)
print("BOOTED")
pack = host.load_pack(tmp + "/custom_nodes")
inputs = {name: cls.INPUT_TYPES() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
print("RESULT " + json.dumps({"nodes": sorted(pack.NODE_CLASS_MAPPINGS),
      "display": pack.NODE_DISPLAY_NAME_MAPPINGS,
      "folders": {n: fp.get_folder_paths(n) for n in ("LLM", "bridges")},
      "llm_choices": inputs["BeyondCLIP_LLMLoader"]["required"]["llm_name"][0]}))
"""


def test_pack_imports_cleanly_into_a_fresh_comfyui(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BOOT, str(PACK_DIR / "headless" / "host.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after_boot = proc.stdout.split("BOOTED", 1)[1]
    result = json.loads(after_boot.split("RESULT ", 1)[1])
    noise = [line for line in after_boot.splitlines() + proc.stderr.splitlines()
             if ("WARNING" in line or "ERROR" in line or "Traceback" in line)]
    assert noise == [], "loading the pack must not log warnings or errors:\n" + "\n".join(noise)
    assert result["nodes"] and all(n.startswith("BeyondCLIP_") for n in result["nodes"])
    assert set(result["display"]) == set(result["nodes"])
    assert result["folders"]["LLM"] == [str(tmp_path / "models" / "LLM")]
    assert result["folders"]["bridges"] == [str(tmp_path / "models" / "bridges")]
    assert result["llm_choices"] == []


def test_requirements_never_install_torch():
    for line in (PACK_DIR / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert name not in {"torch", "torchvision", "torchaudio"}, line


def _requirement_lines(path):
    return sorted(line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip())


def test_requirements_txt_and_pyproject_list_the_same_dependencies():
    """ComfyUI-Manager installs requirements.txt, the Comfy Registry reads pyproject.toml: they must agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == _requirement_lines(PACK_DIR / "requirements.txt")


def test_registry_fields_are_set():
    """What `comfy node validate` / the Comfy Registry read (comfy-cli's extract_node_configuration)."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] and project["description"] and project["version"]
    assert project["license"] and (PACK_DIR / "LICENSE").is_file()
    assert project["urls"]["Repository"] and comfy["PublisherId"] and comfy["DisplayName"]


def test_the_published_pack_never_installs_or_downloads():
    """No package manager or download in the code the registry archive carries (.comfyignore keeps tests/, scripts/,
    benchmarks/ and CI out): the runner finds a ComfyUI but never fetches one."""
    kept_out = {"tests", "scripts", "benchmarks", ".ci"}
    shipped = [p for p in PACK_DIR.rglob("*.py")
               if p.relative_to(PACK_DIR).parts[0] not in kept_out
               and not p.relative_to(PACK_DIR).parts[0].startswith(".")]
    assert shipped
    for path in shipped:
        text = path.read_text()
        for needle in ('"pip"', "'pip'", "pip download", "ensurepip", "urlretrieve", "hf_hub_download",
                       "snapshot_download"):
            assert needle not in text, f"{path.relative_to(PACK_DIR)} contains {needle}"
    ignored = (PACK_DIR / ".comfyignore").read_text().split()
    for folder in ("tests/", "scripts/", "benchmarks/", ".ci/"):
        assert folder in ignored


def test_shipped_ui_workflow_converts_with_the_host_node_definitions(host, pack):
    wf = pack_module(pack, "headless.workflow")
    prompt = wf.to_api(wf.load_workflow(PACK_DIR / "workflows" / "beyond_clip_sd15.json"),
                       host.nodes.NODE_CLASS_MAPPINGS)
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    # The seed widget is followed by its 'control after generate' value, which is not an input.
    assert {k: sampler[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    encode_id = next(i for i, n in prompt.items() if n["class_type"] == "BeyondCLIP_TextEncode")
    assert sampler["positive"] == [encode_id, 0] and sampler["negative"] == [encode_id, 1]
    encode = prompt[encode_id]["inputs"]
    assert encode["negative"] == "encode negative text" and encode["hidden_layer"] == -1
    assert encode["model"][1] == 0 and encode["llm"][1] == 0


def test_workflow_with_unknown_nodes_names_them(host, pack):
    wf = pack_module(pack, "headless.workflow")
    workflow = wf.load_workflow(PACK_DIR / "workflows" / "beyond_clip_sd15.json")
    workflow["nodes"][0]["type"] = "SomeoneElsesLoader"
    try:
        wf.to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    except wf.WorkflowError as e:
        assert "SomeoneElsesLoader" in str(e)
    else:
        raise AssertionError("an unknown node type must be reported")


def test_conversion_follows_reroutes_primitives_and_bypassed_nodes(host, pack):
    """Frontend-only nodes vanish in the API format: reroutes and bypassed nodes pass their input through, a
    primitive's value already sits in its target's widgets, muted nodes are dropped."""
    wf = pack_module(pack, "headless.workflow")
    workflow = {
        "nodes": [
            {"id": 1, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "widgets_values": [64, 64, 1]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}]},
            {"id": 3, "type": "LatentUpscaleBy", "mode": 4, "widgets_values": ["nearest-exact", 2.0],
             "inputs": [{"name": "samples", "type": "LATENT", "link": 2}]},
            {"id": 4, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": [7, "fixed"]},
            {"id": 5, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "latent_image", "type": "LATENT", "link": 3},
                        {"name": "seed", "type": "INT", "link": 4, "widget": {"name": "seed"}}],
             "widgets_values": [7, "fixed", 3, 5.0, "euler", "normal", 1.0]},
            {"id": 6, "type": "Note", "mode": 0, "inputs": [], "widgets_values": ["a note"]},
            {"id": 7, "type": "SaveImage", "mode": 2, "inputs": [], "widgets_values": ["muted"]},
        ],
        "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 3, 0, 5, 0, "LATENT"],
                  [4, 4, 0, 5, 1, "INT"]],
    }
    prompt = wf.to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    assert set(prompt) == {"1", "5"}
    sampler = prompt["5"]["inputs"]
    assert sampler["latent_image"] == ["1", 0]
    assert sampler["seed"] == 7 and sampler["steps"] == 3 and sampler["cfg"] == 5.0 and sampler["denoise"] == 1.0
