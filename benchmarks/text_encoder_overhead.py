"""Encoding through a stock CLIP as the pack's LLM vs ComfyUI's own CLIPTextEncode on the same CLIP.

Target: <= 1.05x. Both sides encode the same prompt into the same ids (the text encoder's start token and the
text, no padding) with the same loaded model at the encoder's own layer; the pack's side is engine.llm's
hidden_states through loaders/text_encoders.py (its tokenizer adapter, ComfyUI's load, one hidden layer), ComfyUI's
side is the stock node's body. Outputs are checked equal. Timed in back-to-back pairs (median of pair ratios).
Needs a ComfyUI with LLM text encoders (2025 on):

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/text_encoder_overhead.py [--repeats 30]
"""
import argparse
import importlib
import statistics

import torch
from common import boot, module, paired_times, table

CONFIGS = [("small", 64, 3), ("mid", 512, 6), ("large", 1024, 8)]  # (name, width, layers) of a Gemma 2 encoder
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls, warm light"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    host, pack, scratch = boot()
    try:
        importlib.import_module("comfy.text_encoders.llama")
    except ImportError:
        raise SystemExit(f"ComfyUI {host.version} has no LLM text encoders; "
                         "set COMFYUI_PATH to ComfyUI 0.3.64+") from None
    import nodes as comfy_nodes
    tiny, encoders, llm_engine = (module(pack, m) for m in ("headless.tiny_text_encoders", "loaders.text_encoders",
                                                            "engine.llm"))
    rows = []
    for name, width, layers in CONFIGS:
        path = tiny.write_text_encoder(scratch / "models" / "text_encoders" / f"{name}.safetensors", "lumina2",
                                       hidden=width, layers=layers)
        clip = tiny.load_tiny_clip(path, "lumina2")
        llm = encoders.from_clip(clip)
        stock = comfy_nodes.CLIPTextEncode()

        def comfy_side():
            with torch.inference_mode():
                return stock.encode(clip, PROMPT)[0][0][0]  # noqa: B023 - called within this iteration

        def pack_side():
            with torch.inference_mode():
                return llm_engine.hidden_states(llm, PROMPT, hidden_layer=-2).hidden  # noqa: B023 - called within this iteration; Lumina's layer: -2

        same = torch.equal(comfy_side(), pack_side())
        comfy_times, pack_times = paired_times(comfy_side, pack_side, args.repeats)
        ratio = statistics.median(p / c for p, c in zip(pack_times, comfy_times))
        params = sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6
        rows.append((name, f"{params:.1f}M", f"{statistics.median(comfy_times) * 1e3:.2f}",
                     f"{statistics.median(pack_times) * 1e3:.2f}", f"{ratio:.3f}", "yes" if same else "NO",
                     "yes" if ratio <= 1.05 else "NO"))
    print(f"\nComfyUI {host.version}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    table(("Gemma 2 encoder", "params", "CLIPTextEncode ms", "stock CLIP as LLM ms", "ratio", "same output",
           "<= 1.05"), rows)


if __name__ == "__main__":
    main()
