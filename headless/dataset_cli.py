"""Build MUMU's bootstrapped dataset from the command line, in one process or many (torchrun, or any launcher that
sets RANK and WORLD_SIZE: each process takes its own shard and writes its own part; the last one to finish merges
the parts into the dataset one process would have built).

From the pack's folder:
    python -m headless dataset mumu --detector DIR --source photos/ --dataset mumu_dataset --input DIR
                                    [--box-threshold 0.35 --text-threshold 0.25 --seed 0 --crop-max-side 1024]
                                    [--workers 4] [--device auto] [--dtype fp32]
    torchrun --nproc_per_node 8 -m headless dataset mumu --detector DIR --source photos/ --dataset mumu_dataset ...

--input is ComfyUI's input folder: the source (a folder of pictures with same-name .txt captions, or a .tsv
'picture<TAB>caption') is named relative to it, and the dataset is written into it (input/<dataset>/), where the
MUMU Train nodes list its stage1_captions.txt and stage2_pairs.tsv. --detector is a Grounding DINO Hugging Face
folder, or the name of one in models/grounding-dino (--models adds a models folder). Run it again after adding
pictures: only new or changed pictures are searched.
"""
import argparse
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from .host import Host, HostError


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m headless.dataset_cli",
                                               description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="dataset_command", required=True)
    m = sub.add_parser("mumu", help="captioned pictures -> MUMU prompts with crops before their words (Grounding DINO)")
    m.add_argument("--detector", required=True, help="Grounding DINO folder, or its name in models/grounding-dino")
    m.add_argument("--source", required=True, help="folder/ or file.tsv of captioned pictures, in the input folder")
    m.add_argument("--dataset", required=True, help="the dataset folder's name (written as <input>/<name>/)")
    m.add_argument("--input", type=Path, help="ComfyUI's input folder (default: the host's)")
    m.add_argument("--box-threshold", type=float, default=0.35)
    m.add_argument("--text-threshold", type=float, default=0.25)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--crop-max-side", type=int, default=1024)
    m.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    m.add_argument("--workers", type=int, default=4, help="threads reading and preprocessing pictures ahead")
    m.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when present), cpu, cuda, cuda:N")
    m.add_argument("--comfyui", help="the ComfyUI folder to boot (default: $COMFYUI_PATH or the one the pack is in)")
    m.add_argument("--models", type=Path, help="a models folder laid out like ComfyUI/models")
    m.add_argument("--output", type=Path, help="ComfyUI's output folder")
    return parser


def _device(choice):
    import torch
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if choice == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cuda":
        return torch.device(f"cuda:{local}")
    return torch.device(choice)


def build_mumu(args, pack):
    mod = lambda name: importlib.import_module(f"{pack.__name__}.{name}")  # noqa: E731
    detectors, engine = mod("loaders.grounding_dino"), mod("engine.mumu_dataset")
    Settings = mod("bridges.mumu_dataset").Settings
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(args.device)
    path = Path(args.detector)
    handle = detectors.load_grounding_dino(path.name, path if path.is_dir() else None, args.dtype)
    settings = Settings(seed=args.seed, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                        crop_max_side=args.crop_max_side)

    def progress(done, total):
        if done % 100 == 0 or done == total:
            sys.stdout.write(f"rank {rank}/{world}: {done}/{total} pictures\n")
            sys.stdout.flush()

    result = engine.build_dataset(handle, args.source, args.dataset, settings, rank=rank, world=world,
                                  progress=progress, workers=args.workers, device=device)
    # one write per line: several ranks share the pipe
    sys.stdout.write(result.describe() + f" ({result.forwards} detector forwards on {device})\n")
    for key, why in result.skipped:
        sys.stdout.write(f"rank {rank}/{world}: skipped {key}: {why}\n")
    if result.dataset is not None:
        sys.stdout.write(f"merged: {result.dataset.folder} (train with {result.dataset.stage1} and "
                         f"{result.dataset.stage2})\n")
    sys.stdout.flush()
    return 0


def run(args):
    """Entry point shared with `python -m headless dataset ...`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="beyond-clip-dataset-") as scratch:
        try:
            host = Host(args.comfyui, output_dir=args.output, temp_dir=Path(scratch) / "temp", input_dir=args.input)
            if args.models:
                host.add_models_dir(args.models, sorted({p.name for p in args.models.iterdir() if p.is_dir()}
                                                        | {"grounding-dino"}))
            pack = host.load_pack(Path(scratch) / "custom_nodes")
        except HostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        errors = importlib.import_module(f"{pack.__name__}.loaders.errors")
        try:
            return build_mumu(args, pack)
        except (errors.PackError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
