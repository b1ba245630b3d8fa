"""The README's main job: `python -m headless run WORKFLOW.json`, a real ComfyUI in a fresh process."""
import os
import subprocess
import sys

from conftest import PACK_DIR


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "headless", "run", *args], cwd=PACK_DIR, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_runs_the_shipped_workflow_with_builtin_models_and_says_so(tmp_path):
    out = os.path.relpath(tmp_path, PACK_DIR)  # a relative --output, as the README's demo passes
    proc = run_cli("workflows/beyond_clip_sd15.json", "--output", out, "--set", "6.steps=3",
                   "--set", '4.prompt="a lighthouse at dusk"')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SMALL BUILT-IN RANDOM MODELS" in proc.stdout
    for expected in ("v1-5-pruned-emaonly.safetensors", "Llama-2-7b-chat-hf", "beyond_clip_llama2_sd15.safetensors"):
        assert expected in proc.stdout
    pngs = list(tmp_path.glob("BeyondCLIP_sd15_*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_files_are_listed_before_anything_loads(tmp_path):
    proc = run_cli("workflows/beyond_clip_sdxl.json", "--output", str(tmp_path), "--no-builtin-models")
    assert proc.returncode == 2
    for expected in ("sd_xl_base_1.0.safetensors", "Llama-2-7b-chat-hf", "beyond_clip_llama2_sdxl.safetensors",
                     "put it in"):
        assert expected in proc.stderr
    assert not list(tmp_path.glob("*.png"))


def test_bad_override_names_the_nodes(tmp_path):
    proc = run_cli("workflows/beyond_clip_sd15.json", "--output", str(tmp_path), "--set", "99.text=x")
    assert proc.returncode == 2 and "no node 99" in proc.stderr


def test_a_family_is_swapped_whole_and_settings_given_with_set_are_kept(host, pack, tiny_llama, tmp_path):
    """A present Llama with a missing mapper: the built-in mapper fits only the built-in Llama, so both are
    swapped (and the run says the Llama was present); fits apply to swapped families only; --set values stay."""
    from conftest import pack_module
    run = pack_module(pack, "headless.run")
    train = {"captions": "captions.txt", "run_name": "r", "output_name": "o", "steps": 20000}
    prompt = {"1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": tiny_llama, "dtype": "auto"}},
              "2": {"class_type": "BeyondCLIP_MapperLoader", "inputs": {"mapper_name": "absent.safetensors"}},
              "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
              "4": {"class_type": "BeyondCLIP_TrainMapper", "inputs": dict(train)},
              "5": {"class_type": "BeyondCLIP_TrainMapper", "inputs": dict(train)}}
    # position 1: the session's own models folder stays first
    said = run.use_builtin_models(prompt, "sd15", host, tmp_path / "builtin", first_models_dirs=1,
                                  fixed={("5", "steps")})
    text = "\n".join(said)
    assert prompt["1"]["inputs"]["llm_name"] == run.TINY_LLM and f"{tiny_llama} (present, but" in text
    assert prompt["2"]["inputs"]["mapper_name"] == "beyond-clip-tiny-mapper-sd15.safetensors"
    assert "absent.safetensors -> beyond-clip-tiny-mapper-sd15.safetensors" in text
    assert (tmp_path / "builtin" / "LLM" / run.TINY_LLM / "config.json").is_file()
    assert prompt["3"]["inputs"]["width"] == 512, "the checkpoint family was not swapped: latents stay as they are"
    assert prompt["4"]["inputs"]["steps"] == run.BUILTIN_TRAIN_STEPS["BeyondCLIP_TrainMapper"]["steps"]
    assert prompt["5"]["inputs"]["steps"] == 20000 and "node 5" not in text
    assert host.folder_paths.get_folder_paths("bridges")[0] == str(host.models_dir / "bridges")
    # everything listed: nothing to swap, nothing said
    assert run.use_builtin_models(prompt, "sd15", host, tmp_path / "builtin") == []
