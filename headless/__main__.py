"""Run a workflow file end to end in a real ComfyUI, headless, on the CPU, and write its images.

From the pack's folder:
    python -m headless run workflows/beyond_clip_sd15.json [--set 4.prompt="a red fox"] [--comfyui DIR]
                                                         [--models DIR] [--input DIR] [--output DIR]
                                                         [--no-builtin-models]

ComfyUI: --comfyui, else $COMFYUI_PATH, else the ComfyUI this pack is installed in, else a registry copy.
Workflows: the UI format users share, or the API format. Missing model files are listed before anything
heavy is loaded; unless --no-builtin-models, small random models of the same layout stand in, and the run
says so. The pack's example inputs (data/examples/) that the workflow names are copied into the input folder
unless a file of that name is already there (then that one is used, and the run says so).
"""
import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from . import dataset_cli, train_cli
from .host import PACK_DIR, Host, HostError


def parse_override(text):
    """'12.text=a fox' -> ('12', 'text', 'a fox'); values that parse as JSON (numbers, true) are typed."""
    target, sep, raw = text.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise argparse.ArgumentTypeError(f"--set wants NODE_ID.INPUT=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return node_id, name, value


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m headless", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow file and write its images")
    run.add_argument("workflow", type=Path)
    run.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                     metavar="NODE.INPUT=VALUE", help="override a node input (repeatable)")
    run.add_argument("--comfyui", help="the ComfyUI folder to run in")
    run.add_argument("--models", type=Path, help="an extra models folder (laid out like ComfyUI/models), searched "
                                                 "first; training results are written there")
    run.add_argument("--input", type=Path, help="the input folder (default: the host's input folder)")
    run.add_argument("--output", type=Path, help="folder for the images (default: the host's output folder)")
    run.add_argument("--no-builtin-models", action="store_true",
                     help="stop with the list of missing files instead of using small random models")
    shots = sub.add_parser("screenshots", help="load each workflow in the real frontend (headless Chromium) and "
                                               "save a screenshot of its graph into docs/images/")
    shots.add_argument("--comfyui", help="the ComfyUI folder whose server and frontend to use")
    train_cli.build_parser(sub.add_parser("train",
                                          help="train a bridge (mapper, connector, router) from the command line"))
    dataset_cli.build_parser(sub.add_parser("dataset", help="build a training dataset (MUMU: captioned pictures -> "
                                                            "prompts with crops), one process or under torchrun"))
    docs = sub.add_parser("docs", help="regenerate README.md's node table from the node definitions")
    docs.add_argument("--comfyui", help="the ComfyUI folder to load the nodes in")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "dataset":
        return dataset_cli.run(args)
    if args.command == "screenshots":
        return screenshots(args)
    with tempfile.TemporaryDirectory(prefix="beyond-clip-run-") as scratch:
        if args.command == "docs":
            return write_docs(args, Path(scratch))
        return run_workflow(args, Path(scratch))


def screenshots(args):
    from . import frontend
    out = PACK_DIR / "docs" / "images"
    workflows = sorted((PACK_DIR / "workflows").glob("*.json"))
    inputs = sorted({name for w in workflows for name in frontend.input_images_of(json.loads(w.read_text()))})
    with frontend.comfyui_server(args.comfyui, inputs) as (url, _), frontend.browser() as driver:
        frontend.open_app(driver, url)
        for workflow in workflows:
            result = frontend.load_in_page(driver, workflow, screenshot=out / f"{workflow.stem}.png")
            print(f"{workflow.name}: {result}")
    return 0


def write_docs(args, scratch: Path):
    host = Host(args.comfyui, output_dir=scratch / "output", temp_dir=scratch / "temp")
    pack = host.load_pack(scratch / "custom_nodes")
    docs = importlib.import_module(pack.__name__ + ".headless.docs")
    readme = PACK_DIR / "README.md"
    table = docs.node_table(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)
    readme.write_text(docs.replace_table(readme.read_text(), table))
    print(f"wrote the node table ({len(pack.NODE_CLASS_MAPPINGS)} nodes) into {readme}")
    return 0


# Model folders an explicit --models folder always provides (training writes into the first of each).
MODEL_FOLDERS = ("checkpoints", "loras", "clip_vision", "LLM", "bridges")


def run_workflow(args, scratch: Path):
    try:
        host = Host(args.comfyui, output_dir=args.output, temp_dir=scratch / "temp", input_dir=args.input)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ComfyUI {host.version} at {host.root}")
    if args.models:
        present = {p.name for p in args.models.iterdir() if p.is_dir()} if args.models.is_dir() else set()
        host.add_models_dir(args.models, sorted(present | set(MODEL_FOLDERS)))
    pack = host.load_pack(scratch / "custom_nodes")
    run = importlib.import_module(pack.__name__ + ".headless.run")
    tiny = importlib.import_module(pack.__name__ + ".headless.tiny_models")
    host.register_nodes(tiny.NODE_CLASS_MAPPINGS, tiny.NODE_DISPLAY_NAME_MAPPINGS)
    if args.no_builtin_models:
        try:
            missing = run.missing_models(run.load_workflow(args.workflow), host.folder_paths)
        except run.WorkflowError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if missing:
            print("error: the workflow needs model files that are not here:", file=sys.stderr)
            for line in missing:
                print("  - " + line, file=sys.stderr)
            return 2
    try:
        prompt, _, swapped, placed = run.prepare(args.workflow, host, args.overrides,
                                                 builtin_models=not args.no_builtin_models,
                                                 first_models_dirs=1 if args.models else 0)
    except (run.WorkflowError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if placed:
        print("Example inputs:")
        for line in placed:
            print("  - " + line)
    if swapped:
        print("NOTE: model files are missing, so this run uses SMALL BUILT-IN RANDOM MODELS instead. The code path "
              "is the real one; the picture will not look like the prompt:")
        for line in swapped:
            print("  - " + line)
        if not args.models:
            print("  (anything this run trains is written beside the built-in models and removed when it ends; "
                  "--models DIR keeps it)")
    start = time.perf_counter()
    try:
        ui = host.run(prompt)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    images = host.saved_images(ui)
    print(f"ran {args.workflow} in {time.perf_counter() - start:.1f} s; wrote:")
    for path in images:
        print(f"  {path}")
    for node_id, out in ui.items():
        for text in (out or {}).get("text", []):
            print(f"node {node_id} says: {text}")
    return 0 if images or ui else 1


if __name__ == "__main__":
    sys.exit(main())
