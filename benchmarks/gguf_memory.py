"""Peak memory of loading a GGUF LLM (transformers' GGUF support, through the pack's loader) vs the size of its
dequantized weights. Target: <= 1.15x.

Each load runs in a fresh process (so nothing of an earlier load is resident): the peak resident memory above the
process's level before the load, sampled every millisecond, divided by the dequantized weights' bytes in the
chosen dtype (what ComfyUI then accounts for the model). Needs the optional gguf package.

    python benchmarks/gguf_memory.py
"""
import json
import subprocess
import sys

from common import PACK_DIR, boot, module, table

CONFIGS = [("mid", 512, 8), ("large", 1024, 12)]  # (name, hidden size, layers) of a Llama
QUANTS = ("Q8_0", "F32")


def measure(path, dtype):
    """In this process: peak RSS above the start while the pack loads the GGUF file, and the dequantized bytes."""
    host, pack, _ = boot()
    from common import PeakRSS
    llm_mod = module(pack, "loaders.llm")
    info = llm_mod.gguf_info(path)
    with PeakRSS() as peak:
        llm = llm_mod.load_llm(path.name, path, dtype)
    size = llm.patcher.model_size()
    print(json.dumps({"peak": peak.delta, "size": size, "elements": info.dequantized_elements}))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        from pathlib import Path
        return measure(Path(sys.argv[2]), sys.argv[3])
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs the gguf package (pip install gguf)") from None
    host, pack, scratch = boot()
    tiny_llm, tiny_gguf = module(pack, "headless.tiny_llm"), module(pack, "headless.tiny_gguf")
    rows = []
    for name, width, layers in CONFIGS:
        folder = tiny_llm.write_llm_folder(scratch / "models" / "LLM" / name, hidden_size=width, layers=layers,
                                           context=256)
        for quant in QUANTS:
            path = scratch / "models" / "LLM" / f"{name}-{quant}.gguf"
            tiny_gguf.write_gguf(path, folder, quant=quant)
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), "fp32"], capture_output=True,
                                 text=True, cwd=PACK_DIR / "benchmarks", check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            ratio = result["peak"] / result["size"]
            rows.append((name, quant, f"{path.stat().st_size / 2**20:.1f}", f"{result['size'] / 2**20:.1f}",
                         f"{result['peak'] / 2**20:.1f}", f"{ratio:.3f}", "yes" if ratio <= 1.15 else "NO"))
    print()
    table(("Llama", "GGUF type", "file MiB", "dequantized fp32 MiB", "peak load MiB", "ratio", "<= 1.15"), rows)


if __name__ == "__main__":
    main()
