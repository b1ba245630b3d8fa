"""Encode overhead: the pack's LLM Text Encode node vs a bare transformers forward of the same model and prompt.

Target: <= 1.05x. Both sides run the same padded 77-token prompt through the same loaded model; the node also
runs the mapper, assembles the conditioning and reports progress (its caches are cleared before each call, so
it really encodes). Timed in pairs, one call of each side back to back; the ratio is the median of the pairs'
ratios (medians of the times as context).

    python benchmarks/encode_overhead.py [--repeats 30]
"""
import argparse
import statistics

import torch
from common import boot, module, paired_times, table

CONFIGS = [("small", 64, 2), ("mid", 512, 8), ("large", 1024, 12)]  # (name, hidden size, layers)
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls, warm light"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    host, pack, scratch = boot()
    tiny_llm, llm_mod, nodes, cache, mappers, llm_engine = (module(pack, m) for m in (
        "headless.tiny_llm", "loaders.llm", "nodes.beyond_clip", "loaders.encode_cache", "loaders.mappers",
        "engine.llm"))
    from pathlib import Path
    rows = []
    for name, width, layers in CONFIGS:
        folder = tiny_llm.write_llm_folder(Path(scratch) / "models" / "LLM" / name, hidden_size=width, layers=layers,
                                           context=256)
        llm = llm_mod.load_llm(name, folder, "fp32")
        mapper = mappers.host_mapper(tiny_llm.random_mapper(width))
        mapper.identity = "bench"
        model = llm.module()
        ids = llm_engine.prompt_ids(llm, PROMPT, num_tokens=77).ids  # the ids the node feeds the LLM
        encode_node = nodes.TextEncode()

        decoder = model.get_decoder()  # hidden states only, as the node computes them (no logits on either side)

        def bare():
            with torch.inference_mode():
                decoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)  # noqa: B023 - called within this iteration

        def node():
            cache.MEMORY.clear()
            with torch.inference_mode():
                encode_node.encode(llm, mapper, PROMPT, "", "zeros", -1, "none")  # noqa: B023 - called within this iteration

        bare_times, node_times = paired_times(bare, node, args.repeats)
        b, n = statistics.median(bare_times), statistics.median(node_times)
        ratio = statistics.median(t / u for t, u in zip(node_times, bare_times))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name, f"{params:.1f}M", f"{b * 1e3:.2f}", f"{n * 1e3:.2f}", f"{ratio:.3f}",
                     "yes" if ratio <= 1.05 else "NO"))
    print(f"\nComfyUI {host.version}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU\n")
    table(("LLM", "params", "bare forward ms", "encode node ms", "ratio", "<= 1.05"), rows)


if __name__ == "__main__":
    main()
