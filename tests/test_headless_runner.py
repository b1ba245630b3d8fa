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
