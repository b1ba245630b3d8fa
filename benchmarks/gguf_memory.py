"""Peak memory of loading a GGUF LLM through the pack's loader vs the size of its dequantized weights. Target:
<= 1.15x.

Rows: the pack's loader (loaders/gguf_weights.py: tensor by tensor) and "before" (the same loader with that reader
switched off: transformers' gguf_file= load), for Llamas of a few sizes, Q8_0 and F32 files, dequantized to fp32
(what "auto" gives on a CPU) and bf16. "vocab 32k": the embeddings and the head take a real LLM's share of the
weights (the tokenizer itself is the small test one).

Each load runs in a fresh process, as loading_memory.py does: importing transformers' modeling and GGUF code is done
first (it is not loading); then the first load of the process (it still pays transformers' lazy imports and
first-use tables), then, after it is freed and the heap handed back, a later load of the same file. Peak = resident
memory above the level before the load, sampled every millisecond (the file's pages mapped in this process count;
the page cache does not). Weights = the dequantized bytes ComfyUI accounts for the model. The first load's extra
over the later one (~15-20 MiB here: the tokenizer built from the metadata, transformers' and gguf's name tables,
torch's thread pools) is paid once per process whatever the model's size; the small models here make it look large.
Needs the optional gguf package.

    python benchmarks/gguf_memory.py [--dtypes fp32,bf16] [--no-before]
"""
import argparse
import ctypes
import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import PACK_DIR, PeakRSS, boot, module, table

CONFIGS = [("mid", 512, 8, None), ("large", 1024, 12, None), ("large, vocab 32k", 1024, 12, 32000)]
QUANTS = ("Q8_0", "F32")
PACK, BEFORE = "pack", "before: transformers"
TARGET = 1.15


def release_free_memory():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(path: Path, dtype: str, loader: str):
    host, pack, scratch = boot()
    # Imports are not part of the measurement.
    import gguf.quants  # noqa: F401
    import transformers.integrations.ggml  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    llm_mod = module(pack, "loaders.llm")
    if loader == BEFORE:
        module(pack, "loaders.gguf_weights").load_gguf = lambda *args, **kwargs: None
    results = []
    for _ in ("first", "later"):
        gc.collect()
        release_free_memory()
        with PeakRSS() as peak:
            llm = llm_mod.load_llm(path.name, path, dtype)
        results.append({"peak": peak.delta, "weights": llm.patcher.model_size()})
        module(pack, "loaders.handles").forget_all()
        del llm
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))


def measure(path, dtype, loader):
    out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, loader], capture_output=True,
                         text=True, cwd=PACK_DIR / "benchmarks")
    if out.returncode:
        raise SystemExit(f"{path.name} {dtype} {loader} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--no-before", action="store_true", help="leave out transformers' own load")
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs the gguf package (pip install gguf)") from None
    host, pack, scratch = boot()
    tiny_llm, tiny_gguf = module(pack, "headless.tiny_llm"), module(pack, "headless.tiny_gguf")
    loaders = (PACK,) if args.no_before else (PACK, BEFORE)
    rows = []
    for name, width, layers, vocab in CONFIGS:
        slug = name.replace(",", "").replace(" ", "-")
        folder = tiny_llm.write_llm_folder(scratch / "models" / "LLM" / slug, hidden_size=width, layers=layers,
                                           context=256, vocab_size=vocab)
        for quant in QUANTS:
            path = scratch / "models" / "LLM" / f"{slug}-{quant}.gguf"
            tiny_gguf.write_gguf(path, folder, quant=quant)
            for dtype in args.dtypes.split(","):
                for loader in loaders:
                    first, later = measure(path, dtype, loader)
                    ratios = [r["peak"] / r["weights"] for r in (first, later)]
                    rows.append((name, quant, dtype, loader, f"{path.stat().st_size / 2**20:.1f}",
                                 f"{first['weights'] / 2**20:.1f}", f"{first['peak'] / 2**20:.1f}",
                                 f"{ratios[0]:.3f}", f"{later['peak'] / 2**20:.1f}", f"{ratios[1]:.3f}",
                                 " / ".join("yes" if r <= TARGET else "NO" for r in ratios)))
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print()
    table(("Llama", "GGUF type", "dtype", "loader", "file MiB", "weights MiB", "first load peak MiB", "ratio",
           "later load peak MiB", "ratio", f"<= {TARGET} first / later"), rows)


if __name__ == "__main__":
    main()
