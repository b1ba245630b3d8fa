"""Loading cost: peak resident memory and time of the pack's loaders vs reading the same safetensors raw.

Targets: peak memory while loading <= 1.15x the weights' size (no second copy: memory-mapped safetensors,
direct dtype); load time <= 1.2x a raw safetensors read. Each measurement runs in a fresh process and reads
every weight once. Warm: the file is already in the page cache, so both sides read from memory. --cold
empties the page cache before each measurement (needs root), so both sides read from disk, as a first load does.

    python benchmarks/loading_memory.py [--hidden 1024 --layers 12] [--cold]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import PeakRSS, boot, module, table


def touch(tensors):
    """Read one value per memory page of every tensor, so memory-mapped weights really become resident."""
    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, 4096 // t.element_size())
        total += int(flat[::step].float().sum().item() != 0)
    return total


def child(kind, path):
    host, pack, _ = boot()
    import torch  # noqa: F401  (imports are not part of the measurement)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM  # noqa: F401
    start = time.perf_counter()
    with PeakRSS() as mem:
        if kind == "raw safetensors read":
            tensors = list(load_file(path).values())
        elif kind == "Load LLM (pack)":
            llm = module(pack, "loaders.llm").load_llm("bench", Path(path), "fp32")
            tensors = list(llm.patcher.model.parameters())
        elif kind == "Load Mapper (pack)":
            tensors = list(module(pack, "loaders.mappers").load_mapper(Path(path)).parameters())
        touch(tensors)
        weights = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak": mem.delta, "weights": weights}))


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(kind, path, cold):
    if cold:
        drop_page_cache()
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--cold", action="store_true", help="read from disk: empty the page cache first (root)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    host, pack, scratch = boot()
    tiny_llm, mappers = module(pack, "headless.tiny_llm"), module(pack, "loaders.mappers")
    folder = tiny_llm.write_llm_folder(scratch / "llm", hidden_size=args.hidden, layers=args.layers, context=256)
    mapper_file = scratch / "mapper.safetensors"
    mappers.save_mapper(mapper_file, tiny_llm.random_mapper(4096, hidden_dim=2048, depth=3))
    llm_weights = folder / "model.safetensors"
    for f in (llm_weights, mapper_file):
        f.read_bytes()  # into the page cache
    rows = []
    for label, kind, path in (("LLM", "raw safetensors read", llm_weights), ("LLM", "Load LLM (pack)", folder),
                              ("mapper", "raw safetensors read", mapper_file),
                              ("mapper", "Load Mapper (pack)", mapper_file)):
        r = measure(kind, path, args.cold)
        rows.append([label, kind, f"{r['weights'] / 2**20:.1f}", f"{r['peak'] / 2**20:.1f}",
                     f"{r['peak'] / r['weights']:.2f}", f"{r['seconds']:.3f}"])
    for i in (1, 3):
        rows[i].append(f"{float(rows[i][5]) / float(rows[i - 1][5]):.2f}x raw")
        rows[i - 1].append("")
    print(f"\nComfyUI {host.version}; {'cold (from disk)' if args.cold else 'warm (page cache)'}; peak = resident "
          f"memory above the process's level before loading, with every weight read once\n")
    table(("weights", "loader", "weights MiB", "peak MiB", "peak / weights", "seconds", "time"), rows)


if __name__ == "__main__":
    main()
