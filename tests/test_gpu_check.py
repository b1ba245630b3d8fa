"""benchmarks/gpu_check.py, the one-call GPU check: its --tiny run (the same code at small sizes on the CPU) must
print a complete table, so the check cannot rot before a GPU is lent; and the pieces that let it boot on a bare
GPU machine (the ComfyUI archive, carried wheels, import-only stand-ins) do what they say."""
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import PACK_DIR, host_module

ROW_LINE = re.compile(r"^\| (?P<row>[^|]+?) \| (?P<measured>[^|]*?) \| (?P<target>[^|]*?) \| (?P<result>[^|]*?) "
                      r"\| (?P<seconds>[^|]*?) \|$")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
# What a GPU machine with only torch + transformers & co. lacks of an in-process ComfyUI's imports.
ABSENT_ON_THE_GPU_MACHINE = ("torchvision", "av", "torchsde")


def gpu_check():
    spec = importlib.util.spec_from_file_location("beyond_clip_gpu_check", PACK_DIR / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_row_with_finite_numbers(tmp_path):
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"the GPU check builds its models with transformers 5's API; this is {transformers.__version__}")
    """The suite's own ComfyUI (both hosts), with torchvision, av and torchsde made absent as on the GPU machine."""
    check = gpu_check()
    absent = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT_ON_THE_GPU_MACHINE)
    code = (f"import runpy, sys; {absent}; sys.argv = sys.argv[1:]; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    args = [str(PACK_DIR / "benchmarks" / "gpu_check.py"), "--tiny", "--comfyui", str(host_module.find_comfyui()),
            "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--wheels", str(tmp_path / "none"),
            "--deadline", "3600"]  # a busy machine must not turn rows into SKIPs
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=PACK_DIR, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rows = {m["row"]: m for m in map(ROW_LINE.match, proc.stdout.splitlines()) if m and m["row"] in check.ROWS}
    assert list(rows) == list(check.ROWS)
    bnb_problem = check.bitsandbytes_problem()
    for name, row in rows.items():
        if name in ("int8 LLM", "nf4 LLM") and bnb_problem:
            assert row["result"].startswith("SKIP: bitsandbytes"), row.group(0)
            continue
        assert not row["result"].startswith(("ERROR", "SKIP", "FAIL")), row.group(0)
        assert NUMBER.search(row["measured"]) and not re.search(r"\b(nan|inf)\b", row["measured"]), row.group(0)
        assert float(row["seconds"]) > 0

    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    for row in report["rows"]:
        for key, value in row["numbers"].items():
            assert value is None or math.isfinite(value), (row["name"], key, value)
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["LLM encode"]["numbers"]["cosine_same"] > 0.9999  # the node encodes what the bare forward does
    # The full-size configs, built on the meta device: LLaMA-2-7B, Idefics2-8B without perceiver, SDXL's UNet.
    plan = report["about"]["plan"]
    assert 6.7e9 < plan["llama-2-7b"] < 6.8e9
    assert 7.5e9 < plan["idefics2-8b without perceiver"] < 7.7e9 and 0.40e9 < plan["idefics2 vision tower"] < 0.44e9
    assert 2.56e9 < plan["sdxl unet"] < 2.58e9
    assert 0.2e9 < plan["mumu connector"] < 0.22e9
    # What the GPU machine lacks got import-only stand-ins, and the header says so.
    assert "torchvision" in report["about"]["stand_ins"]
    assert re.search(r"stand-ins \(not installed, import-only, raise if called\): .*torchvision", proc.stdout)
    assert not (tmp_path / "work" / "host").exists()  # --comfyui: no archive unpacked


# ------------------------------------------------------------------------------------------ the archive

def write_tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


COMFY_FILES = {"ComfyUI/comfy/model_management.py": "", "ComfyUI/execution.py": "", "ComfyUI/nodes.py": ""}


def test_unpacks_a_comfyui_archive(tmp_path):
    check = gpu_check()
    root = check.unpack_comfyui(write_tar(tmp_path / "c.tar.gz", COMFY_FILES), tmp_path / "dest")
    assert root == tmp_path / "dest" / "ComfyUI" and (root / "execution.py").is_file()


@pytest.mark.parametrize("case", ["not comfyui", "truncated", "not a tar"])
def test_refuses_a_wrong_archive_with_what_to_do(tmp_path, case):
    check = gpu_check()
    archive = tmp_path / "c.tar.gz"
    if case == "not comfyui":
        write_tar(archive, {"SomethingElse/setup.py": "print()"})
    elif case == "truncated":
        write_tar(archive, {**COMFY_FILES, "ComfyUI/big.py": os.urandom(50_000).hex()})
        data = archive.read_bytes()
        archive.write_bytes(data[:len(data) // 2])
    else:
        archive.write_bytes(b"PK\x03\x04 this is a zip header, not a tar")
    with pytest.raises(check.CheckError, match=re.escape(str(archive))):
        check.unpack_comfyui(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "ComfyUI" / "execution.py").exists()


def test_missing_archive_lists_where_it_looked(tmp_path):
    check = gpu_check()
    with pytest.raises(check.CheckError, match="--comfyui DIR") as e:
        check.find_archive(tmp_path / "absent.tar.gz")
    assert "absent.tar.gz" in str(e.value)


def test_the_shared_archive_unpacks_to_the_host_it_names(tmp_path):
    check = gpu_check()
    try:
        archive = check.find_archive()
    except check.CheckError:
        pytest.skip("no comfyui-0.3.64.tar.gz beside or inside this checkout (CI has it in ../shared/hosts/)")
    root = check.unpack_comfyui(archive, tmp_path)
    assert 'version__ = "0.3.64"' in (root / "comfyui_version.py").read_text().replace("'", '"')


# ------------------------------------------------------------------------------- wheels and stand-ins

def write_wheel(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_carried_wheels_are_used_only_for_what_is_not_installed(tmp_path, monkeypatch):
    check = gpu_check()
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels / "beyond_clip_carried-1.0-py3-none-any.whl",
                {"beyond_clip_carried/__init__.py": "VALUE = 42\n",
                 "beyond_clip_carried-1.0.dist-info/METADATA": "Name: beyond_clip_carried\n"})
    write_wheel(wheels / "json-9.9-py3-none-any.whl", {"json/__init__.py": "raise ImportError('not this one')\n"})
    used = check.add_wheels(wheels, tmp_path / "site")
    assert used == ["beyond_clip_carried-1.0-py3-none-any.whl"]  # the installed json wins
    import beyond_clip_carried
    assert beyond_clip_carried.VALUE == 42
    sys.modules.pop("beyond_clip_carried")

    write_wheel(wheels / "evil-1.0-py3-none-any.whl", {"../escaped.py": "x = 1\n"})
    with pytest.raises(check.CheckError, match="evil-1.0"):
        check.add_wheels(wheels, tmp_path / "site2")
    assert not (tmp_path / "escaped.py").exists()


def test_stand_ins_serve_the_host_only_and_raise_when_called(tmp_path):
    check = gpu_check()
    host = tmp_path / "host"
    host.mkdir()
    (host / "uses_absent.py").write_text(
        "import beyond_clip_absent_module as absent\n"
        "from beyond_clip_absent_module.video import Container\n"
        "import beyond_clip_absent_module.transforms as transforms\n"
        "def annotated(x: Container) -> absent.Stream:\n    return x\n"
        "def calls():\n    return transforms.Compose([])\n")
    stand_ins = check.StandIns(host, {"beyond_clip_absent_module": "a test module", "json": "installed"})
    assert stand_ins.absent == {"beyond_clip_absent_module"}  # an installed module never gets one
    stand_ins.install()
    try:
        spec = importlib.util.spec_from_file_location("beyond_clip_uses_absent", host / "uses_absent.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert stand_ins.used == ["beyond_clip_absent_module"]
        with pytest.raises(RuntimeError, match="import-only stand-in"):
            module.calls()
        # Everything outside the host still sees the module as absent.
        assert "beyond_clip_absent_module" not in sys.modules
        assert importlib.util.find_spec("beyond_clip_absent_module") is None
        with pytest.raises(ModuleNotFoundError):
            import beyond_clip_absent_module  # noqa: F401
    finally:
        stand_ins.uninstall()
