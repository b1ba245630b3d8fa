"""GILL dialogue speed: the GILL Dialogue node's decoding vs a bare transformers `generate` on the same model and
prompt, and what one picture costs (GILLMapper, decision model) as a share of a turn.

Target: tokens per second of the node >= 0.95x those of `generate`. Both sides decode greedily from the same prompt
('Q: <message>\\nA:', the ids the node builds) for the same number of tokens on the same loaded OPT (random weights,
OPT's real vocabulary size of 50272 rows, so the output head costs what it costs in OPT); the node also builds the
conversation, runs GILL's logit rules ([IMG] logits from the release's rows, masking, scaling), reports progress and
assembles its outputs. max_pictures=0 here, so both write words only; a message is picked whose greedy reply does not
stop at a newline, so both write exactly --tokens tokens. Timed in pairs, one call of each side back to back; the
ratio is the median of the pairs' ratios.

The picture rows: a turn with one picture (forced at the first step by ret_scale_factor, as the reference's knob
allows), and the median times of GILLMapper (8 [IMG] states -> 77 x 768) and of the decision model on that picture's
states, each as a share of that turn.

    python benchmarks/gill_dialogue_speed.py [--repeats 10] [--tokens 32]
"""
import argparse
import statistics
from pathlib import Path

import torch
from common import boot, median_time, module, paired_times, table

CONFIGS = [("small", 64, 2), ("mid", 512, 8), ("large", 1024, 12)]  # (name, hidden size, layers)
OPT_VOCAB = 50272
MESSAGES = ["what should i cook for dinner tonight?", "tell me about the sea", "how do i bake bread",
            "what is the capital of france", "write a poem about the sea"]


def opt_folder(tiny_llm, folder, width, layers):
    """A random OPT folder with OPT's vocabulary size (the small tokenizer's ids are its first rows)."""
    import json
    tiny_llm.write_llm_folder(folder, arch="opt", hidden_size=width, layers=layers, context=512)
    from transformers import OPTConfig, OPTForCausalLM
    config = OPTConfig(**{**json.loads((folder / "config.json").read_text()), "vocab_size": OPT_VOCAB})
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def gill_file(pack, path, width):
    bridge, files = module(pack, "bridges.gill"), module(pack, "loaders.bridge_files")
    config = bridge.GILLConfig(llm_dim=width, decision_in=width)
    torch.manual_seed(1)
    model = bridge.GILLModel(config)
    with torch.no_grad():
        model.input_embeddings.weight.mul_(0.02)
        model.gen_text_hidden_fcs[0].query_embs.normal_(0, 0.02)
    files.save_bridge(path, "gill", config.to_dict(), model.state_dict())
    return path


def measure(name, llm, gill, node, dialogue, gill_engine, bridge, args):
    """(speed row, picture row) of one model."""
    words = bridge.DecodeOptions(max_new_tokens=args.tokens, max_pictures=0)
    for message in MESSAGES:  # a reply that runs the full length (no newline)
        if dialogue.reply(llm, gill, None, message, words).stopped == "max_new_tokens":
            break
    else:
        raise SystemExit(f"{name}: every message's greedy reply stops at a newline; add one to MESSAGES")
    settings = {"max_new_tokens": args.tokens, "min_word_tokens": 0, "ret_scale_factor": 1.0,
                "gen_scale_factor": 1.0, "temperature": 0.0, "top_p": 1.0, "seed": 0, "threshold": 0.5}
    model = llm.module()
    ids = llm.tokenizer(f"Q: {message}\nA:", return_tensors="pt")["input_ids"]

    def bare():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, num_beams=1, pad_token_id=1)
        assert out.shape[1] - ids.shape[1] == args.tokens

    def dialogue_node():
        with torch.inference_mode():
            node.reply(llm, gill, message=message, max_pictures=0, **settings)

    bare_times, node_times = paired_times(bare, dialogue_node, args.repeats, warmup=1)
    b, n = statistics.median(bare_times), statistics.median(node_times)
    ratio = statistics.median(u / t for t, u in zip(node_times, bare_times))  # node tokens/s over bare tokens/s
    params = sum(p.numel() for p in model.parameters()) / 1e6
    speed = (name, f"{params:.0f}M", f"{args.tokens / b:.1f}", f"{args.tokens / n:.1f}", f"{ratio:.3f}",
             "yes" if ratio >= 0.95 else "NO")

    # one picture (forced at the first step): the whole turn, then its mapper and decision alone
    forced = dict(settings, ret_scale_factor=1000.0)

    def turn():
        with torch.inference_mode():
            return node.reply(llm, gill, message=message, max_pictures=1, **forced)

    turn_time = median_time(turn, args.repeats, warmup=1)
    states = dialogue.reply(llm, gill, None, message, bridge.DecodeOptions(
        max_new_tokens=args.tokens, max_pictures=1, ret_scale_factor=1000.0)).pictures[0].states
    mapper_time = median_time(lambda: gill_engine.generation(gill, states), args.repeats * 3)
    decision_time = median_time(lambda: gill_engine.decide(gill, states, 0.5), args.repeats * 3)
    picture = (name, f"{turn_time * 1e3:.1f}", f"{mapper_time * 1e3:.2f}", f"{100 * mapper_time / turn_time:.1f} %",
               f"{decision_time * 1e3:.3f}", f"{100 * decision_time / turn_time:.2f} %")
    return speed, picture


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host, pack, scratch = boot()
    tiny_llm, llm_mod, gill_mod, nodes, dialogue, gill_engine, bridge = (module(pack, m) for m in (
        "headless.tiny_llm", "loaders.llm", "loaders.gill", "nodes.gill", "engine.gill_dialogue", "engine.gill",
        "bridges.gill_dialogue"))
    speed_rows, picture_rows = [], []
    for name, width, layers in CONFIGS:
        folder = opt_folder(tiny_llm, Path(scratch) / "models" / "LLM" / name, width, layers)
        llm = llm_mod.load_llm(name, folder, "fp32")
        gill = gill_mod.load_gill(gill_file(pack, Path(scratch) / "models" / "bridges" / f"gill-{name}.safetensors",
                                            width))
        speed, picture = measure(name, llm, gill, nodes.GILLDialogue(), dialogue, gill_engine, bridge, args)
        speed_rows.append(speed)
        picture_rows.append(picture)
    print(f"\nComfyUI {host.version}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, "
          f"{args.tokens} tokens, {args.repeats} pairs\n")
    table(("OPT", "params", "generate tok/s", "dialogue node tok/s", "ratio", ">= 0.95"), speed_rows)
    print()
    table(("OPT", "turn with 1 picture ms", "GILLMapper ms", "share", "decision ms", "share"), picture_rows)


if __name__ == "__main__":
    main()
