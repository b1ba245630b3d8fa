"""The Train nodes' trainers from the command line, for long runs and several GPUs (torchrun / accelerate launch).

From the pack's folder:
    python -m headless.train_cli mapper --run-name NAME --out NAME [--llm DIR --checkpoint FILE --captions FILE]
                                       [--steps N --batch-size B --lr LR ...] [--models DIR] [--output DIR]
    torchrun --nproc_per_node 2 -m headless.train_cli mapper --run-name NAME --out NAME ...
    python -m headless.train_cli connector --run-name NAME --out NAME [--idefics2 DIR --checkpoint FILE
                                       --captions FILE] [--width W --depth D --heads H --probes P ...]
    python -m headless.train_cli router --examples FILE --out NAME [--models DIR]
    python -m headless.train_cli seed-llm --run-name NAME --out NAME --llm DIR --seed-tokenizer FILE --pairs NAME
                                       [--questions NAME] [--input DIR] [--stage1-steps N --stage2-steps N ...]
    torchrun --nproc_per_node 2 -m headless.train_cli seed-llm ...
    python -m headless.train_cli seed-sdxl-head --run-name NAME --out NAME --seed-tokenizer FILE
                                       [--checkpoint FILE --pairs NAME --input DIR] [--steps N ...]

The other Train nodes (RepAdapter stage 2, MUMU stage 2, GILL) run from the command line as the training
workflows they ship in, through the same host and node: `python -m headless run workflows/<train workflow>.json
--set NODE.steps=50000 ...` (one process).

`seed-llm` trains a SEED-LLM (both stages) on an image-caption set in ComfyUI's input folder (--input, or the
host's), the names as the Train SEED-LLM node lists them (a folder 'shapes/' or a .tsv); rank 0 computes the
pictures' codes into the run folder, every rank trains its slice of each batch (DDP), rank 0 writes the LoRA folder
and the rows file. `seed-sdxl-head` distils a SEED de-tokenizer head onto an SDXL checkpoint's CLIP (one process or
several), on the run's cache as `mapper` does (built first with --checkpoint and --pairs). --seed-tokenizer is the
official seed_tokenizer.pth (beside causal_qformer.pth and eva_vit_g.pth) or a converted seed-v1*.safetensors.

`mapper` and `connector` train on the run's target cache (output/beyond_clip_training/<run>/cache/), which the Train
node or this command builds: with --llm (a Hugging Face folder), --checkpoint (the checkpoint whose CLIP is the
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
    m.add_argument("--loss", default="mse", choices=("mse", "gill_l2"))
    c = sub.add_parser("connector", help="distil a MUMU connector (stage 1) from an SDXL checkpoint's CLIP")
    c.add_argument("--run-name", required=True, help="run name: output/beyond_clip_training/<run>/")
    c.add_argument("--out", required=True, help="models/bridges/<out>.safetensors")
    c.add_argument("--idefics2", type=Path, help="Idefics2 folder (to build the cache)")
    c.add_argument("--checkpoint", type=Path, help="the SDXL checkpoint whose CLIP is the teacher")
    c.add_argument("--captions", type=Path, help="captions, one per line: 'prompt' or 'a <image> man<TAB>man.png' "
                                                 "(crops in ComfyUI's input folder)")
    c.add_argument("--dtype", default="auto", help="Idefics2 dtype for building the cache (auto, fp32, fp16, bf16)")
    c.add_argument("--cache-precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    c.add_argument("--hidden-layer", type=int, default=-1)
    c.add_argument("--image-resolution", type=int, default=252)
    c.add_argument("--width", type=int, default=1024)
    c.add_argument("--depth", type=int, default=16)
    c.add_argument("--heads", type=int, default=16)
    c.add_argument("--probes", type=int, default=64)
    for p in (m, c):
        p.add_argument("--steps", type=int, default=2000)
        p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
        p.add_argument("--lr", type=float, default=1e-3 if p is m else 3e-4)
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--eval-every", type=int, default=100)
        p.add_argument("--checkpoint-every", type=int, default=200)
        p.add_argument("--log-every", type=int, default=50)
        p.add_argument("--no-resume", action="store_true")
        p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when present), cpu, cuda")
    s = sub.add_parser("seed-llm", help="teach a causal LM SEED's codes (SEED-OPT recipe: LoRA + new tokens)")
    s.add_argument("--run-name", required=True, help="run name: output/beyond_clip_training/<run>/")
    s.add_argument("--out", required=True, help="models/bridges/<out>.safetensors + models/LLM/<out>-seed-llm-lora/")
    s.add_argument("--llm", type=Path, required=True, help="Hugging Face causal-LM folder")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="the LLM's dtype in training")
    s.add_argument("--pairs", required=True, help="image-caption set in the input folder: 'folder/' or 'pairs.tsv'")
    s.add_argument("--questions", help="'image<TAB>question<TAB>answer' .tsv in the input folder")
    s.add_argument("--stage1-steps", type=int, default=1000)
    s.add_argument("--stage2-steps", type=int, default=2000)
    s.add_argument("--rank", type=int, default=8, help="LoRA rank")
    s.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    h = sub.add_parser("seed-sdxl-head", help="distil a SEED de-tokenizer head onto an SDXL checkpoint's CLIP")
    h.add_argument("--run-name", required=True, help="run name: output/beyond_clip_training/<run>/")
    h.add_argument("--out", required=True, help="models/bridges/<out>.safetensors")
    h.add_argument("--checkpoint", type=Path, help="the SDXL checkpoint whose CLIP is the teacher (with --pairs: "
                                                   "the cache is built; without: the run's newest cache is used)")
    h.add_argument("--pairs", help="image-caption set in the input folder: 'folder/' or 'pairs.tsv'")
    h.add_argument("--steps", type=int, default=2000)
    h.add_argument("--hidden-dim", type=int, default=1024)
    h.add_argument("--depth", type=int, default=2)
    h.add_argument("--activation", default="gelu")
    for p in (s, h):
        p.add_argument("--seed-tokenizer", type=Path, required=True,
                       help="SEED v1: seed_tokenizer.pth (official files side by side) or a converted .safetensors")
        p.add_argument("--input", type=Path, help="ComfyUI's input folder holding --pairs (default: the host's)")
        p.add_argument("--batch-size", type=int, default=8 if p is s else 32,
                       help="global batch (pictures), split over the processes")
        p.add_argument("--lr", type=float, default=2e-4 if p is s else 1e-3)
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--eval-every", type=int, default=100)
        p.add_argument("--checkpoint-every", type=int, default=200)
        p.add_argument("--log-every", type=int, default=50)
        p.add_argument("--no-resume", action="store_true")
        p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when present), cpu, cuda")
    r = sub.add_parser("router", help="train the chat/draw router from a label<TAB>text file")
    r.add_argument("--examples", type=Path, required=True)
    r.add_argument("--out", required=True, help="models/bridges/<out>.router.json")
    r.add_argument("--alpha", type=float, default=1.0)
    for p in (m, c, r, s, h):
        p.add_argument("--comfyui",
                       help="the ComfyUI folder to boot (default: $COMFYUI_PATH or the one the pack is in)")
        p.add_argument("--models", type=Path, help="a models folder laid out like ComfyUI/models (first for bridges)")
        p.add_argument("--output", type=Path, help="ComfyUI's output folder (run folders go in it)")
    return parser


def boot(args, scratch: Path):
    host = Host(args.comfyui, output_dir=args.output, temp_dir=scratch / "temp", input_dir=getattr(args, "input", None))
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


def _checkpoint_clip(path):
    import comfy.sd
    clip = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True, output_model=False)[1]
    if clip is None:
        raise SystemExit(f"error: {path} holds no CLIP text encoder")
    return clip


def _build_cache(args, pack, run):
    """The run's cache from --llm/--idefics2, --checkpoint and --captions, through the same spec the Train node
    uses (so either reuses the other's cache)."""
    import torch
    inputs, run_folder = _mod(pack, "loaders.training_inputs"), _mod(pack, "loaders.run_folder")
    captions = inputs.read_captions(args.captions)
    clip = _checkpoint_clip(args.checkpoint)
    if args.train_command == "connector":
        for i, line in enumerate(captions):
            inputs.parse_mumu_caption(line, f"{args.captions}, caption {i + 1}: ")
        vlm = _mod(pack, "loaders.mumu").load_idefics2(args.idefics2.name, args.idefics2, args.dtype)
        spec = _mod(pack, "engine.train_mumu").connector_cache_spec(vlm, clip, captions, args.hidden_layer,
                                                                    args.image_resolution)
    else:
        llm = _mod(pack, "loaders.llm").load_llm(args.llm.name, args.llm, args.dtype)
        spec = _mod(pack, "engine.train_beyond_clip").mapper_cache_spec(llm, clip, args.hidden_layer, args.template)

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"cache: {done}/{total} captions", flush=True)

    with torch.no_grad():
        _, path = run_folder.build_cache(run, captions, spec.input_fn, spec.teacher, spec.identity,
                                         args.cache_precision, progress)
    return path


def _resolve_cache(args, pack, run, rank, world):
    """Rank 0 builds the cache (or finds the run's newest); every rank gets its path."""
    import torch.distributed as dist
    run_folder = _mod(pack, "loaders.run_folder")
    cache_path = None
    if rank == 0:
        source = args.idefics2 if args.train_command == "connector" else args.llm
        if source or args.checkpoint or args.captions:
            if not (source and args.checkpoint and args.captions):
                what = "--idefics2" if args.train_command == "connector" else "--llm"
                raise SystemExit(f"error: building a cache needs {what}, --checkpoint and --captions together")
            cache_path = _build_cache(args, pack, run)
        else:
            cache_path = run_folder.find_cache(run)
    if world > 1:
        box = [str(cache_path) if cache_path else None]
        dist.broadcast_object_list(box, src=0)
        cache_path = Path(box[0])
    return cache_path


def _training_for(args, pack, data, about, cache_path, rank):
    """(train function, model config, output path, extra arguments) of the command."""
    folders = _mod(pack, "loaders.folders")
    hidden_layer = int(about.get("hidden_layer", args.hidden_layer))
    if args.train_command == "connector":
        if about.get("student") != "mumu":
            raise SystemExit(f"error: {cache_path} holds {about.get('student')!r} states, not Idefics2's: give "
                             f"--idefics2, --checkpoint and --captions to build the connector's cache")
        config = _mod(pack, "bridges.mumu").ConnectorConfig(in_dim=data.inputs.shape[-1], width=args.width,
                                                            depth=args.depth, heads=args.heads,
                                                            hidden_layer=hidden_layer)
        out_path = folders.bridge_output_path(args.out, kind=_mod(pack, "loaders.mumu").KIND) if rank == 0 else None
        return _mod(pack, "engine.train_mumu").train_connector, config, out_path, {"probes": args.probes}
    config = _mod(pack, "bridges.mapper").MapperConfig(
        in_dim=data.inputs.shape[-1], target=_mod(pack, "engine.training").target_of(data), hidden_dim=args.hidden_dim,
        depth=args.depth, activation=args.activation, num_tokens=data.targets.shape[1], hidden_layer=hidden_layer,
        encoder=about.get("encoder"))
    out_path = folders.bridge_output_path(args.out, kind=_mod(pack, "loaders.mappers").KIND) if rank == 0 else None
    return _mod(pack, "engine.train_beyond_clip").train_mapper, config, out_path, {}


def _agree(checksum, rank, world) -> int:
    """0 when every rank ended with the same weights, else 3 (and says so)."""
    import torch.distributed as dist
    sums = [None] * world
    dist.all_gather_object(sums, checksum)
    status = 0
    if len(set(sums)) != 1:
        print(f"error: the ranks ended with different weights: {sums}", file=sys.stderr, flush=True)
        status = 3
    elif rank == 0:
        print(f"all {world} ranks hold identical weights ({checksum})", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return status


def train_distilled(args, host, pack):
    """mapper or connector: distillation on the run's cache, one process or several (DDP)."""
    run_folder = _mod(pack, "loaders.run_folder")
    trainer_mod = _mod(pack, "bridges.training.trainer")
    rank, world, device = _distributed(args.device)
    run = run_folder.run_dir(args.run_name)
    cache_path = _resolve_cache(args, pack, run, rank, world)
    data = run_folder.read_cache(cache_path)
    about = run_folder.cache_about(cache_path)
    settings = _mod(pack, "bridges.training.data").TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=getattr(args, "loss", "mse"),
        val_fraction=args.val_fraction, seed=args.seed, eval_every=args.eval_every)
    train, config, out_path, extra = _training_for(args, pack, data, about, cache_path, rank)

    def on_step(step, loss, val):
        if rank == 0 and (step % args.log_every == 0 or val is not None or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss:.6f}" + (f" held-out {val:.6f}" if val is not None else ""),
                  flush=True)

    module, trainer = train(run, data, config, settings, out_path, device=device, ddp=world > 1,
                            resume=not args.no_resume, on_step=on_step, checkpoint_every=args.checkpoint_every,
                            is_main=rank == 0, cache_path=cache_path, **extra)
    checksum = trainer_mod.parameter_checksum(module)
    # One write with its newline: every rank prints this line into the same pipe, and print() may write the text
    # and the newline separately (unbuffered output), letting another rank's line land between them.
    sys.stdout.write(f"rank {rank}/{world}: weights {checksum}, held-out loss {trainer.initial_val_loss:.6f} -> "
                     f"{trainer.last_val_loss():.6f}, step {trainer.step}\n")
    sys.stdout.flush()
    status = _agree(checksum, rank, world) if world > 1 else 0
    if rank == 0:
        print(f"wrote {out_path}")
    return status


def _seed_tokenizer(pack, path: Path):
    """The SEED tokenizer of --seed-tokenizer: a converted file, or the official files (converted once beside them)."""
    seed_files = _mod(pack, "loaders.seed")
    path = Path(path).resolve()
    if path.suffix != ".safetensors":
        path = seed_files.prepare(path, path.parent)
    return seed_files.load_seed(path, name=path.name)


def _announce(rank, world, checksum, first, last, steps):
    # One write with its newline: every rank prints this line into the same pipe (see train_distilled).
    sys.stdout.write(f"rank {rank}/{world}: weights {checksum}, held-out loss {first:.6f} -> {last:.6f}, "
                     f"step {steps}\n")
    sys.stdout.flush()


def train_seed_llm(args, host, pack):
    """SEED-LLM, both stages, one process or several (DDP)."""
    import torch
    import torch.distributed as dist
    inputs, run_folder = _mod(pack, "loaders.training_inputs"), _mod(pack, "loaders.run_folder")
    engine, files = _mod(pack, "engine.train_seed_llm"), _mod(pack, "loaders.seed_llm")
    rank, world, device = _distributed(args.device)
    run = run_folder.run_dir(args.run_name)
    pictures = engine.pictures_of(inputs.read_pairs(args.pairs),
                                  inputs.read_questions(args.questions) if args.questions else [])
    llm = _mod(pack, "loaders.llm").load_llm(args.llm.name, args.llm, args.dtype)
    seed = _seed_tokenizer(pack, args.seed_tokenizer)
    paths = [p.path for p in pictures]
    if rank == 0:  # the codes once, into the run folder; the other ranks read them there
        codes = engine.picture_codes(run, seed, paths)
    if world > 1:
        dist.barrier()
    if rank != 0:
        codes = engine.picture_codes(run, seed, paths)
    out_paths = files.output_paths(args.out) if rank == 0 else None
    llm_id, seed_id = files.llm_identity(llm), files.seed_identity(seed)
    with torch.inference_mode(False):
        module = _mod(pack, "engine.training").leave_inference_mode(llm.inner).to(device)
    settings = engine.SeedLLMSettings(args.stage1_steps, args.stage2_steps, args.batch_size, args.lr, args.rank,
                                      args.alpha, args.val_fraction, args.seed, args.eval_every)
    data_id = run_folder.captions_identity([f"{p.path.name}\t{p.caption}\t{p.questions}" for p in pictures])

    def on_step(done, total, loss, val):
        if rank == 0 and (done % args.log_every == 0 or val is not None or done == total):
            print(f"step {done}/{total} loss {loss:.6f}" + (f" held-out {val:.6f}" if val is not None else ""),
                  flush=True)

    def write(student):
        files.save_seed_llm(out_paths, student.vocab, student.lora, llm_id, seed_id,
                            {"run": run.name, "pictures": len(pictures), "settings": vars(settings)})
        return out_paths["vocab"]

    codebook = seed.inner.quantize.embedding.weight.detach().float().cpu()
    with torch.inference_mode(False), torch.enable_grad():
        student, trainer, report = engine.train_seed_llm(
            run, module, llm.tokenizer, pictures, codes, codebook, settings, write=write, device=device,
            ddp=world > 1, is_main=rank == 0, on_step=on_step, resume=not args.no_resume,
            checkpoint_every=args.checkpoint_every,
            start_info={"llm": llm_id["fingerprint"], "seed": seed_id["fingerprint"], "data": data_id})
    if rank == 0:
        engine.write_report(run, report)
        print("held-out loss by kind (untrained -> trained): " + ", ".join(
            f"{k} {report['untrained_val'][k]:.4f} -> {v:.4f}" for k, v in report["final_val"].items()), flush=True)
    checksum = _mod(pack, "bridges.training.trainer").parameter_checksum(student)
    _announce(rank, world, checksum, trainer.initial_val_loss, trainer.last_val_loss(), trainer.step)
    status = _agree(checksum, rank, world) if world > 1 else 0
    if rank == 0:
        print(f"wrote {out_paths['vocab']} and {out_paths['lora']}")
    return status


def train_seed_sdxl_head(args, host, pack):
    """A SEED de-tokenizer head for an SDXL checkpoint: rank 0 builds the cache, every rank trains (DDP)."""
    import torch.distributed as dist
    inputs, run_folder = _mod(pack, "loaders.training_inputs"), _mod(pack, "loaders.run_folder")
    engine, files = _mod(pack, "engine.train_seed_llm"), _mod(pack, "loaders.seed_llm")
    rank, world, device = _distributed(args.device)
    run = run_folder.run_dir(args.run_name)
    seed = _seed_tokenizer(pack, args.seed_tokenizer)
    if bool(args.checkpoint) != bool(args.pairs):
        raise SystemExit("error: building the head's cache needs --checkpoint and --pairs together")
    cache_path = None
    if rank == 0 and args.checkpoint:
        pairs = inputs.read_pairs(args.pairs)
        clip = _checkpoint_clip(args.checkpoint)
        engine.check_sdxl_teacher(clip)
        spec = engine.head_cache_spec(seed, clip, pairs)
        _, cache_path = run_folder.build_cache(run, engine.pair_keys(pairs), spec.input_fn, spec.teacher,
                                               spec.identity)
    elif rank == 0:
        cache_path = run_folder.find_cache(run)
        if run_folder.cache_about(cache_path).get("student") != "seed_sdxl_head":
            raise SystemExit(f"error: {cache_path} is not a SEED SDXL head's cache: give --checkpoint and --pairs")
    if world > 1:
        box = [str(cache_path) if cache_path else None]
        dist.broadcast_object_list(box, src=0)
        cache_path = Path(box[0])
    data = run_folder.read_cache(cache_path)
    settings = _mod(pack, "bridges.training.data").TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, seed=args.seed,
        eval_every=args.eval_every)
    config = _mod(pack, "bridges.seed_sdxl").SeedSDXLHeadConfig(in_dim=seed.config.out_dim,
                                                               hidden_dim=args.hidden_dim, depth=args.depth,
                                                               activation=args.activation)
    out_path = (_mod(pack, "loaders.folders").bridge_output_path(args.out, kind=_mod(pack, "loaders.seed_sdxl").KIND)
                if rank == 0 else None)

    def on_step(step, loss, val):
        if rank == 0 and (step % args.log_every == 0 or val is not None or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss:.6f}" + (f" held-out {val:.6f}" if val is not None else ""),
                  flush=True)

    head, trainer = engine.train_sdxl_head(run, data, config, settings, out_path, files.seed_identity(seed),
                                           device=device, ddp=world > 1, resume=not args.no_resume, on_step=on_step,
                                           checkpoint_every=args.checkpoint_every, is_main=rank == 0,
                                           cache_path=cache_path)
    checksum = _mod(pack, "bridges.training.trainer").parameter_checksum(head)
    _announce(rank, world, checksum, trainer.initial_val_loss, trainer.last_val_loss(), trainer.step)
    status = _agree(checksum, rank, world) if world > 1 else 0
    if rank == 0:
        print(f"wrote {out_path}")
    return status


def train_router(args, host, pack):
    routers = _mod(pack, "loaders.routers")
    texts, labels = routers.read_labelled_tsv(args.examples)
    router, _, _ = _mod(pack, "engine.train_beyond_clip").train_router(texts, labels, alpha=args.alpha)
    path = _mod(pack, "loaders.folders").bridge_output_path(args.out, extension=routers.EXTENSION)
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
        errors = _mod(pack, "bridges.errors")
        try:
            if args.train_command in ("mapper", "connector"):
                return train_distilled(args, host, pack)
            if args.train_command == "seed-llm":
                return train_seed_llm(args, host, pack)
            if args.train_command == "seed-sdxl-head":
                return train_seed_sdxl_head(args, host, pack)
            return train_router(args, host, pack)
        except (errors.PackError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
