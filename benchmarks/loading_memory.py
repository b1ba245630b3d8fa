"""Loading cost: peak resident memory and time of the pack's loaders vs reading the same safetensors raw.

Targets: peak memory while loading <= 1.15x the weights' size (no second copy: memory-mapped safetensors,
direct dtype); load time <= 1.2x a raw safetensors read. Models: an LLM (Llama), a VLM (Idefics2 built like
the tests' one, larger), a mapper, and the LLM loaded int8 and nf4 where bitsandbytes is installed (weights =
the packed bytes ComfyUI accounts; the file is read and quantized while loading, so peak and time are context,
not a like-for-like comparison). Each run is a fresh process per loader that loads twice and reads every weight
once per load:
- first load: the first in the process. It also pays what a process pays once (transformers' table of
  checkpoint conversions, lazy imports inside transformers); importing transformers' modeling code
  (~0.6 s on a host that has not yet) is done before the clock starts, as it is not loading.
- later load: the same folder again after the first load was freed: what every load after the first costs.
"file bytes read" rows (context): the file copied into memory with readinto, which a mapped load does not need.
"before" rows: the same pack loader with the direct reader switched off (transformers' from_pretrained).
Warm: the files are already in the page cache. --cold empties the page cache before each load (needs root), so
both sides read from disk, as a first load does. Peak = resident memory above the level before the load.

    python benchmarks/loading_memory.py [--hidden 1024 --layers 12] [--vlm-width 1024 --vlm-layers 8]
                                        [--file-dtype fp32|bf16] [--runs 3] [--cold] [--no-quantized]
"""
import argparse
import ctypes
import gc
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import PeakRSS, boot, module, table

RAW = "raw safetensors read"  # safetensors.torch.load_file: memory-mapped, every page touched; the target's base
BYTES = "file bytes read (context)"  # the file read into memory as bytes: what copying the data costs
PACK = {"LLM": "Load LLM (pack)", "VLM": "Load Idefics2 (pack)", "mapper": "Load Mapper (pack)"}
BEFORE = " before: from_pretrained"
# bitsandbytes choices of Load LLM (when bitsandbytes is installed): weights = the packed bytes ComfyUI accounts.
QUANTIZED = {"LLM int8": "int8 (bitsandbytes)", "LLM nf4": "nf4 (bitsandbytes)"}


def touch(tensors):
    """Read one value per memory page of every tensor, so memory-mapped weights really become resident."""
    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, 4096 // t.element_size())
        total += int(flat[::step].float().sum().item() != 0)
    return total


def release_free_memory():
    """Hand the freed heap back to the system (glibc keeps it otherwise): the later load's peak then counts what it
    allocates, rather than reusing the first load's memory unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def child(label, kind, path, cold):
    host, pack, scratch = boot()
    # Imports are not part of the measurement.
    import torch
    from safetensors.torch import load_file
    from transformers import Idefics2Model, LlamaForCausalLM  # noqa: F401  (and transformers.modeling_utils)
    if label in QUANTIZED:
        import bitsandbytes  # noqa: F401
    if kind.endswith(BEFORE):
        module(pack, "loaders.direct_weights").load_pretrained = lambda *args, **kwargs: None

    def load():
        if kind == RAW:
            return None, list(load_file(path).values())
        if kind == BYTES:
            with open(path, "rb") as f:
                data = bytearray(Path(path).stat().st_size)
                f.readinto(data)
            return data, [torch.frombuffer(data, dtype=torch.uint8)]
        if label == "LLM":
            handle = module(pack, "loaders.llm").load_llm("bench", Path(path), "fp32")
            return handle, list(handle.inner.parameters())
        if label in QUANTIZED:
            handle = module(pack, "loaders.llm").load_llm("bench", Path(path), QUANTIZED[label])
            return handle, list(handle.inner.state_dict().values())  # with the scales, as ComfyUI counts
        if label == "VLM":
            handle = module(pack, "loaders.mumu").load_idefics2("bench", Path(path), "fp32")
            return handle, list(handle.inner.parameters())
        mapper = module(pack, "loaders.mappers").load_mapper(Path(path))
        return mapper, list(mapper.inner.parameters())

    results = []
    for _ in ("first", "later"):
        if cold:
            drop_page_cache()
        gc.collect()
        start = time.perf_counter()
        with PeakRSS() as mem:
            handle, tensors = load()
            touch(tensors)
            weights = sum(t.numel() * t.element_size() for t in tensors)
        results.append({"seconds": time.perf_counter() - start, "peak": mem.delta, "weights": weights})
        del handle, tensors
        gc.collect()
        release_free_memory()
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))


def measure(label, kind, path, cold):
    out = subprocess.run([sys.executable, __file__, "--child", label, kind, str(path)] + (["--cold"] if cold else []),
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{label} / {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def to_bf16(file):
    import torch
    from safetensors.torch import load_file, save_file
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
    save_file(tensors, str(file), metadata={"format": "pt"})


def kinds(label):
    if label in QUANTIZED:
        return RAW, f"Load LLM (pack) {QUANTIZED[label]}"
    return (RAW, PACK[label]) if label == "mapper" else (RAW, BYTES, PACK[label] + BEFORE, PACK[label])


def summary(values, fmt):
    """Median, with the range over runs when there are several."""
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vlm-width", type=int, default=1024)
    parser.add_argument("--vlm-layers", type=int, default=8)
    parser.add_argument("--file-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the LLM and VLM files (bf16 as most releases; always loaded as fp32, as on CPU)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per loader (median and range)")
    parser.add_argument("--cold", action="store_true", help="read from disk: empty the page cache first (root)")
    parser.add_argument("--no-quantized", action="store_true", help="skip the int8/nf4 rows (bitsandbytes)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.cold)
    host, pack, scratch = boot()
    try:
        tiny_llm, mappers = module(pack, "headless.tiny_llm"), module(pack, "loaders.mappers")
        llm = tiny_llm.write_llm_folder(scratch / "llm", hidden_size=args.hidden, layers=args.layers, context=256)
        vlm = module(pack, "headless.tiny_mumu").write_idefics2_folder(
            scratch / "vlm", text_width=args.vlm_width, text_layers=args.vlm_layers, vision_width=768, vision_layers=6,
            heads=8, context=1024, image_size=224, patch_size=14, image_seq_len=16)
        if args.file_dtype == "bf16":
            for folder in (llm, vlm):
                to_bf16(folder / "model.safetensors")
        mapper_file = scratch / "mapper.safetensors"
        mappers.save_mapper(mapper_file, tiny_llm.random_mapper(4096, hidden_dim=2048, depth=3))
        cases = (("LLM", llm / "model.safetensors", llm), ("VLM", vlm / "model.safetensors", vlm),
                 ("mapper", mapper_file, mapper_file))
        if importlib.util.find_spec("bitsandbytes") and not args.no_quantized:
            cases += tuple((label, llm / "model.safetensors", llm) for label in QUANTIZED)
        runs = {}
        for _ in range(args.runs):
            for label, raw_file, target in cases:
                for kind in kinds(label):
                    path = raw_file if kind in (RAW, BYTES) else target
                    if not args.cold:
                        raw_file.read_bytes()  # into the page cache
                    for load, r in zip(("first", "later"), measure(label, kind, path, args.cold)):
                        runs.setdefault((label, kind, load), []).append(r)
        rows = []
        for label, _, _ in cases:
            for load in ("first", "later"):
                raw = runs[(label, RAW, load)]
                for kind in kinds(label):
                    rs = runs[(label, kind, load)]
                    ratios = [r["seconds"] / statistics.median(x["seconds"] for x in raw) for r in rs]
                    rows.append([label, kind, load, f"{rs[0]['weights'] / 2**20:.1f}",
                                 summary([r["peak"] / 2**20 for r in rs], "{:.0f}"),
                                 summary([r["peak"] / r["weights"] for r in rs], "{:.2f}"),
                                 summary([r["seconds"] for r in rs], "{:.3f}"),
                                 "" if kind == RAW else summary(ratios, "{:.2f}") + "x"])
        print(f"\nComfyUI {host.version}; {'cold (from disk)' if args.cold else 'warm (page cache)'}; LLM/VLM files in "
              f"{args.file_dtype}, loaded as fp32; {args.runs} run(s), "
              f"median (range); peak = resident memory above the level before the load, every weight read once\n")
        table(("model", "loader", "load", "weights MiB", "peak MiB", "peak / weights", "seconds", "time vs raw"), rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
