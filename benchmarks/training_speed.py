"""Training speed of the mapper distillation: steps per second and peak memory, small and mid-size settings.

    python benchmarks/training_speed.py [--device cpu|cuda] [--steps 50]

Trains on synthetic cached tensors (what the Train node trains on once its cache is built), so the numbers are
the trainer's own: forward, loss, backward, AdamW, the held-out evaluation left out. Not a test.
  small:     tiny LLM width 64  -> SD1.x (77 x 768),  hidden 128, batch 16
  mid sd1:   LLaMA-2-7B width 4096 -> SD1.x (77 x 768), hidden 512, batch 32   (the paper's mapper)
  mid sdxl:  width 4096 -> SDXL (77 x 2048 + pooled 1280), hidden 512, batch 32
  mid gill:  GILLMapper (4096 -> 512, 4+4 layers, 77 queries -> 768) on 8 [IMG] states, batch 32
Peak memory: CUDA max allocated on a GPU; on the CPU the process's peak resident size (includes Python).
"""
import argparse
import importlib
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent


def load_bridges():
    """The pack's pure-torch bridges package, without ComfyUI."""
    spec = importlib.util.spec_from_file_location("beyond_clip_bench_bridges", PACK_DIR / "bridges" / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR / "bridges")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return (importlib.import_module(spec.name + ".training.data"),
            importlib.import_module(spec.name + ".training.tasks"),
            importlib.import_module(spec.name + ".training.trainer"), importlib.import_module(spec.name + ".mapper"),
            importlib.import_module(spec.name + ".gill"))


def synthetic(n, tokens, in_dim, width, pooled):
    g = torch.Generator().manual_seed(0)
    return dict(inputs=torch.randn(n, tokens, in_dim, generator=g), last_token=torch.full((n,), tokens - 1),
                targets=torch.randn(n, 77, width, generator=g),
                pooled=torch.randn(n, pooled, generator=g) if pooled else None)


def bench(modules, student, data, batch, steps, device):
    """The pack's one Trainer on a distillation task, as the Train nodes run it."""
    data_mod, tasks, trainer_mod = modules
    cfg = data_mod.TrainConfig(steps=10 ** 9, batch_size=batch, lr=1e-3, val_fraction=0.0, eval_every=10 ** 9)
    trainer = trainer_mod.Trainer(tasks.DistillTask(student, data_mod.DistillData(**data), cfg), cfg, device=device)
    for _ in range(3):  # warm-up (allocator, kernels)
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in student.parameters())
    return steps / elapsed, peak, params, loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", help="run only the settings whose name contains this")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data_mod, tasks, trainer_mod, mapper_mod, gill = load_bridges()
    MapperConfig, BeyondCLIPMapper = mapper_mod.MapperConfig, mapper_mod.BeyondCLIPMapper
    settings = [
        ("small (64 -> sd1)", 16, lambda: tasks.MapperStudent(BeyondCLIPMapper(MapperConfig(64, "sd1", 128))),
         synthetic(256, 77, 64, 768, 0)),
        ("mid sd1 (4096 -> sd1)", 32, lambda: tasks.MapperStudent(BeyondCLIPMapper(MapperConfig(4096, "sd1", 512))),
         synthetic(256, 77, 4096, 768, 0)),
        ("mid sdxl (4096 -> sdxl)", 32,
         lambda: tasks.MapperStudent(BeyondCLIPMapper(MapperConfig(4096, "sdxl", 512))),
         synthetic(256, 77, 4096, 2048, 1280)),
        ("mid gill (8 x 4096 -> sd1)", 32,
         lambda: tasks.GILLStudent(gill.GILLMapper(4096, 768), torch.randn(8, 4096)),
         synthetic(256, 8, 4096, 768, 0)),
    ]
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, {args.steps} timed steps each")
    print("| setting | batch | parameters | steps/s | captions/s | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, batch, build, data in settings:
        if args.only and args.only not in name:
            continue
        torch.manual_seed(0)
        rate, peak, params, _ = bench((data_mod, tasks, trainer_mod), build(), data, batch, args.steps, device)
        print(f"| {name} | {batch} | {params / 1e6:.2f} M | {rate:.1f} | {rate * batch:.0f} | {peak:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
