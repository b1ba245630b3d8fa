"""The Train nodes' trainer from the command line, for long runs and several GPUs (torchrun / accelerate launch).

From the pack's folder:
    python -m headless.train_cli mapper --run-name NAME --out NAME [--llm DIR --checkpoint FILE --captions FILE]
                                       [--steps N --batch-size B --lr LR ...] [--models DIR] [--output DIR]
    torchrun --nproc_per_node 2 -m headless.train_cli mapper --run-name NAME --out NAME ...
    python -m headless.train_cli router --examples FILE --out NAME [--models DIR]

`mapper` trains on the run's target cache (output/beyond_clip_training/<run>/cache/), which the Train node
or this command builds: with --llm (a Hugging Face folder), --checkpoint (the checkpoint whose CLIP is the
teacher) and --captions, the cache is (re)built first; without them the run's newest cache is used. Runs resume
from the run's checkpoint unless --no-resume. Several processes (torchrun sets WORLD_SIZE) train with
torch.distributed DDP (nccl on GPUs, gloo on CPUs): each takes an equal slice of every global batch, rank 0
writes checkpoints and the result, and the ranks' final weights are compared before the command ends.
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
    parser = parser or argparse.ArgumentParser(prog="python -m headless.train_cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="train_command", required=True)
    m = sub.add_parser("mapper", help="distil a Beyond CLIP mapper from a checkpoint's CLIP")
    m.add_argument("--run-name", required=True, help="run name: output/beyond_clip_training/<run>/")
    m.add_argument("--out", required=True, help="models/bridges/<out>.safetensors")
    m.add_argument("--llm", type=Path, help="Hugging Face LLM folder (to build the cache)")
    m.add_argument("--checkpoint", type=Path, help="SD1.x / SDXL checkpoint whose CLIP is the teacher")
    m.add_argument("--captions", type=Path, help="text file, one caption per line")
    m.add_argument("--dtype", default="auto", help="LLM dtype for building the cache (auto, fp32, fp16, bf16)")
    m.add_argument("--cache-precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    m.add_argument("--hidden-layer", type=int, default=-1)
    m.add_argument("--template", default="none")
    m.add_argument("--hidden-dim", type=int, default=512)
    m.add_argument("--depth", type=int, default=2)
    m.add_argument("--activation", default="gelu")
    m.add_argument("--steps", type=int, default=2000)
    m.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--loss", default="mse", choices=("mse", "gill_l2"))
    m.add_argument("--val-fraction", type=float, default=0.1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--eval-every", type=int, default=100)
    m.add_argument("--checkpoint-every", type=int, default=200)
    m.add_argument("--log-every", type=int, default=50)
    m.add_argument("--no-resume", action="store_true")
    m.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when present), cpu, cuda")
    r = sub.add_parser("router", help="train the chat/draw router from a label<TAB>text file")
    r.add_argument("--examples", type=Path, required=True)
    r.add_argument("--out", required=True, help="models/bridges/<out>.router.json")
    r.add_argument("--alpha", type=float, default=1.0)
    for p in (m, r):
        p.add_argument("--comfyui", help="the ComfyUI folder to boot (default: $COMFYUI_PATH or the one the pack is in)")
        p.add_argument("--models", type=Path, help="a models folder laid out like ComfyUI/models (first for bridges)")
        p.add_argument("--output", type=Path, help="ComfyUI's output folder (run folders go in it)")
    return parser


def boot(args, scratch: Path):
    host = Host(args.comfyui, output_dir=args.output, temp_dir=scratch / "temp")
    if args.models:
        names = {p.name for p in args.models.iterdir() if p.is_dir()} | {"bridges", "LLM", "checkpoints"}
        host.add_models_dir(args.models, sorted(names))
    pack = host.load_pack(scratch / "custom_nodes")
    return host, pack


def _mod(pack, name):
    return importlib.import_module(f"{pack.__name__}.{name}")


def _distributed(device_choice):
    """(rank, world, device); initialises torch.distributed when launched with several processes."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or device_choice == "auto" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def _build_cache(args, host, pack, run):
    import torch
    import comfy.sd
    training = _mod(pack, "loaders.training")
    llm_mod, text = _mod(pack, "loaders.llm"), _mod(pack, "bridges.llm_text")
    patcher = _mod(pack, "loaders.patcher")
    captions = training.read_captions(args.captions)
    llm = llm_mod.load_llm(args.llm.name, args.llm, args.dtype)
    clip = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint), output_vae=False, output_clip=True,
                                                 output_model=False)[1]
    if clip is None:
        raise SystemExit(f"error: {args.checkpoint} holds no CLIP text encoder")
    model = patcher.load_to_device(llm.patcher)

    def student(caption):
        with torch.no_grad():
            enc = text.encode(model, llm.tokenizer, caption, hidden_layer=args.hidden_layer, num_tokens=77,
                              template=args.template)
        return enc.hidden.cpu(), enc.last_token

    teacher = training.clip_teacher(clip)
    identity = {"student": "beyond_clip", "llm": llm.identity, "clip": training.clip_identity(clip),
                "hidden_layer": args.hidden_layer, "template": args.template, "num_tokens": 77}

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"cache: {done}/{total} captions", flush=True)

    with torch.no_grad():
        _, path = training.build_cache(run, captions, student, teacher, identity, args.cache_precision, progress)
    return path


def train_mapper(args, host, pack):
    import torch.distributed as dist
    training = _mod(pack, "loaders.training")
    bt = _mod(pack, "bridges.training")
    MapperConfig = _mod(pack, "bridges.mapper").MapperConfig
    rank, world, device = _distributed(args.device)
    run = training.run_dir(args.run_name)
    cache_path = None
    if rank == 0:
        if args.llm or args.checkpoint or args.captions:
            if not (args.llm and args.checkpoint and args.captions):
                raise SystemExit("error: building a cache needs --llm, --checkpoint and --captions together")
            cache_path = _build_cache(args, host, pack, run)
        else:
            cache_path = training.find_cache(run)
    if world > 1:
        box = [str(cache_path) if cache_path else None]
        dist.broadcast_object_list(box, src=0)
        cache_path = Path(box[0])
    data = training.read_cache(cache_path)
    about = training.cache_about(cache_path)
    hidden_layer = int(about.get("hidden_layer", args.hidden_layer))
    config = MapperConfig(in_dim=data.inputs.shape[-1], target=training.target_of(data), hidden_dim=args.hidden_dim,
                          depth=args.depth, activation=args.activation, num_tokens=data.targets.shape[1],
                          hidden_layer=hidden_layer)
    settings = bt.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                              val_fraction=args.val_fraction, seed=args.seed, eval_every=args.eval_every)
    out_path = training.bridge_path(args.out) if rank == 0 else None

    def on_step(step, loss, val):
        if rank == 0 and (step % args.log_every == 0 or val is not None or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss:.6f}" + (f" held-out {val:.6f}" if val is not None else ""),
                  flush=True)

    mapper, trainer = training.train_mapper(run, data, config, settings, out_path, resume=not args.no_resume,
                                            device=device, ddp=world > 1, on_step=on_step,
                                            checkpoint_every=args.checkpoint_every, is_main=rank == 0,
                                            cache_path=cache_path)
    checksum = bt.parameter_checksum(mapper)
    print(f"rank {rank}/{world}: weights {checksum}, held-out loss {trainer.initial_val_loss:.6f} -> "
          f"{trainer.last_val_loss():.6f}, step {trainer.step}", flush=True)
    status = 0
    if world > 1:
        sums = [None] * world
        dist.all_gather_object(sums, checksum)
        if len(set(sums)) != 1:
            print(f"error: the ranks ended with different weights: {sums}", file=sys.stderr, flush=True)
            status = 3
        elif rank == 0:
            print(f"all {world} ranks hold identical weights ({checksum})", flush=True)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {out_path}")
    return status


def train_router(args, host, pack):
    routers, training = _mod(pack, "loaders.routers"), _mod(pack, "loaders.training")
    texts, labels = routers.read_labelled_tsv(args.examples)
    router = _mod(pack, "bridges.router").NaiveBayesRouter(alpha=args.alpha).fit(texts, labels)
    path = training.bridge_path(args.out, extension=routers.EXTENSION)
    routers.save_router(path, router)
    print(f"wrote {path} ({len(texts)} examples)")
    return 0


def run(args):
    """Entry point shared with `python -m headless train ...`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="beyond-clip-train-") as scratch:
        try:
            host, pack = boot(args, Path(scratch))
        except HostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        loaders_errors = _mod(pack, "loaders.errors")
        try:
            if args.train_command == "mapper":
                return train_mapper(args, host, pack)
            return train_router(args, host, pack)
        except (loaders_errors.LoadError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
