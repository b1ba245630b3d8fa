"""Run a workflow file end to end in a real ComfyUI, headless, on the CPU, and write its images.

    python scripts/run_workflow.py workflows/beyond_clip_sd15.json [--comfyui DIR] [--output DIR]

ComfyUI: --comfyui, else $COMFYUI_PATH, else the ComfyUI this pack is installed in, else a registry copy.
Models: the host's models folders; any weights that are missing are replaced by small random models of the
same layout, and the run says so.
"""
import argparse
import importlib
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def load_host_module():
    spec = importlib.util.spec_from_file_location("beyond_clip_headless_host", PACK_DIR / "headless" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--comfyui", help="ComfyUI folder to run in")
    parser.add_argument("--output", type=Path, help="folder for the images (default: the host's output folder)")
    parser.add_argument("--no-builtin-models", action="store_true", help="fail instead of using small models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    host_module = load_host_module()
    scratch = Path(tempfile.mkdtemp(prefix="beyond-clip-run-"))
    host = host_module.Host(args.comfyui, output_dir=args.output, temp_dir=scratch / "temp")
    print(f"ComfyUI {host.version} at {host.root}")
    pack = host.load_pack(scratch / "custom_nodes")
    tiny = importlib.import_module(pack.__name__ + ".headless.tiny_models")
    run = importlib.import_module(pack.__name__ + ".headless.run")
    host.register_nodes(tiny.NODE_CLASS_MAPPINGS, tiny.NODE_DISPLAY_NAME_MAPPINGS)

    prompt, swapped = run.prepare(args.workflow, host, builtin_models=not args.no_builtin_models)
    if swapped:
        print("NOTE: model files are missing, so this run uses SMALL BUILT-IN RANDOM MODELS instead. The code path "
              "is the real one; the picture will not look like the prompt:")
        for line in swapped:
            print("  - " + line)
    start = time.perf_counter()
    ui = host.run(prompt)
    images = host.saved_images(ui)
    print(f"ran {args.workflow} in {time.perf_counter() - start:.1f} s; wrote:")
    for path in images:
        print(f"  {path}")
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
