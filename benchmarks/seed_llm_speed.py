"""SEED-LLM speed against the bare libraries, on the same model:

  Draw     the pack's engine (SEED-LLM Draw: prompt + <img>, then exactly 32 codes, one decoder step each with the KV
           cache, the LoRA merged by ComfyUI) vs transformers' model.generate of 32 new tokens (greedy, KV cache) on
           the same model, prompt of the same length. Target: Draw at >= 0.95x generate's speed. The unmerged LoRA
           (hooks beside the layers) is shown too.
  Training the pack's one Trainer on the SEED-LLM task (stage 2: caption + drawing per picture) vs a bare peft loop
           on the same batch: resized embeddings, LoRA on every linear layer (target_modules="all-linear"), the new
           token rows trainable (trainable_token_indices), AdamW, transformers' own loss.

    python benchmarks/seed_llm_speed.py [--device cpu|cuda] [--sizes small,mid] [--repeats 7]

LLMs are Llama models with random weights built from configs (nothing is downloaded): small = width 64, 2 layers,
vocabulary 384 (the tests' size); mid = width 512, 8 layers, vocabulary 32000 (a real tokenizer's size). Not a test.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the benchmarks' shared helpers, beside this file)

SIZES = {"small": dict(hidden=64, layers=2, heads=4, vocab=None),
         "mid": dict(hidden=512, layers=8, heads=8, vocab=32000)}
PROMPT = "a red fox in the snow at dusk, photograph"


def write_llm(folder: Path, pack, size: dict) -> Path:
    """A Llama folder: config, safetensors weights and the pack's small tokenizer (ids above its 384 are never
    written by it, but the vocabulary has the rows a real LLM has)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tiny = common.module(pack, "headless.tiny_llm")
    tokenizer = tiny.build_tokenizer()
    vocab = size["vocab"] or len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=int(size["hidden"] * 2.6875),
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def seed_llm_handles(pack, llm, folder):
    """(merged, unmerged) SEED-LLM handles on the loaded LLM: a visual vocabulary over a random 8192 x 32 codebook
    and a rank-8 LoRA on every linear layer with random (non-zero) factors."""
    bridge, files = common.module(pack, "bridges.seed_llm"), common.module(pack, "loaders.seed_llm")
    lora_mod, patching = common.module(pack, "bridges.training.lora"), common.module(pack, "loaders.patcher")
    model = llm.inner
    g = torch.Generator().manual_seed(1)
    emb = model.get_input_embeddings().weight
    config = bridge.SeedLLMConfig(base_vocab=emb.shape[0], width=emb.shape[1])
    vocab = bridge.VisualVocabulary(config, torch.randn(8192, 32, generator=g)).initialise(
        emb, model.get_output_embeddings().weight, g).eval().requires_grad_(False)
    lora = lora_mod.LoRASet.for_linears(model, files.lora_layers(model), 8, 16)
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.02, generator=g)
    lora.requires_grad_(False)
    handles = {}
    for mode in ("merged", "unmerged"):
        patcher = files._merged(llm, lora) if mode == "merged" else llm.patcher
        adapted = llm.with_adapter(patcher, files.AppliedSeedLoRA(lora, mode, str(folder)))
        handles[mode] = files.LoadedSeedLLM(patcher=patching.wrap(vocab), config=config, llm=adapted, name=mode)
    return handles


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired(bare, ours, repeats):
    """(median bare time, median our time, median of the pairs' speed ratios bare/ours): the two are timed back to
    back, `repeats` times, after two warm-up runs each (ComfyUI places the weights, kernels and caches warm), so a
    machine shared with other work slows both sides of a pair alike."""
    for _ in range(2):
        bare()
        ours()
    pairs = [(timed(bare), timed(ours)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


def decode_rows(pack, handles, repeats):
    engine, bridge = common.module(pack, "engine.seed_llm"), common.module(pack, "bridges.seed_llm")
    rows = []
    for mode, handle in handles.items():
        ids = bridge.draw_prompt_ids(handle.config, handle.tokenizer, PROMPT)
        plain_ids = torch.tensor([ids[:-1] + [ids[-2]]])  # the same length, every token one the LLM has

        def generate(handle=handle, plain_ids=plain_ids):
            model = handle.llm.module()  # the weights Draw runs on (merged: with the LoRA patched in)
            with torch.no_grad():
                out = model.generate(input_ids=plain_ids.to(model.device), attention_mask=torch.ones_like(
                    plain_ids).to(model.device), max_new_tokens=32, min_new_tokens=32, do_sample=False, num_beams=1,
                    use_cache=True, pad_token_id=handle.tokenizer.pad_token_id)
            assert out.shape[1] == plain_ids.shape[1] + 32

        bare, ours, ratio = paired(generate, lambda handle=handle: engine.draw(handle, PROMPT), repeats)
        rows += [(f"transformers generate, 32 tokens ({'LoRA merged' if mode == 'merged' else 'plain weights'})",
                  bare, 1.0), (f"SEED-LLM Draw, 32 codes, LoRA {mode}", ours, ratio)]
    return rows


def training_batch(pack, handle, pictures=8):
    bridge = common.module(pack, "bridges.seed_llm")
    g = torch.Generator().manual_seed(2)
    examples = []
    for i in range(pictures):
        codes = torch.randint(0, 8192, (32,), generator=g)
        caption = f"{PROMPT}, number {i}"
        examples.append([bridge.caption_sequence(handle.config, handle.tokenizer, codes, caption),
                         bridge.text_to_image(handle.config, handle.tokenizer, caption, codes)])
    return examples


def training_rows(pack, llm, folder, handle, steps, device):
    train_engine, tasks = common.module(pack, "engine.train_seed_llm"), common.module(pack, "bridges.training.tasks")
    trainer_mod, bridge = common.module(pack, "bridges.training.trainer"), common.module(pack, "bridges.seed_llm")
    examples = training_batch(pack, handle)
    pad = handle.tokenizer.pad_token_id
    settings = train_engine.SeedLLMSettings(batch_size=len(examples), lr=1e-4, val_fraction=0.0)
    model = llm.module()  # the plain LLM
    codebook = torch.randn(8192, 32, generator=torch.Generator().manual_seed(1))
    student = train_engine.build_student(model, codebook, settings)
    trainer = trainer_mod.Trainer(tasks.SeedLLMTask(student, examples, pad), settings.stage(10 ** 9), device=device)
    import peft
    from transformers import AutoModelForCausalLM
    bare = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(model.parameters()).dtype).to(device)
    base_vocab = bare.get_input_embeddings().weight.shape[0]
    bare.resize_token_embeddings(base_vocab + 8194, mean_resizing=False)
    new = list(range(base_vocab, base_vocab + 8194))
    wrapped = peft.get_peft_model(bare, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", trainable_token_indices={"embed_tokens": new, "lm_head": new}))
    ids, mask, labels = bridge.pad_batch([s for e in examples for s in e], pad)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    wrapped.train()

    def bare_step():
        optimizer.zero_grad(set_to_none=True)
        wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()

    t_bare, t_pack, ratio = paired(bare_step, trainer.train_step, steps)
    tokens = int(mask.sum())
    return [("peft loop (resized vocabulary, all-linear LoRA, new rows)", t_bare, 1.0, tokens),
            ("pack Trainer, SEED-LLM task", t_pack, ratio, tokens)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="small,mid")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    host, pack, scratch = common.boot()
    loaders = common.module(pack, "loaders.llm")
    device = torch.device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; medians of {args.repeats} back-to-back "
          f"pairs (the ratio is the median of the pairs' ratios)")
    decode, training = [], []
    for name in args.sizes.split(","):
        folder = write_llm(scratch / "models" / "LLM" / f"bench-{name}", pack, SIZES[name])
        llm = loaders.load_llm(f"bench-{name}", folder, "fp32" if device.type == "cpu" else "auto")
        handles = seed_llm_handles(pack, llm, folder)
        decode += [(name, *row) for row in decode_rows(pack, handles, args.repeats)]
        training += [(name, *row) for row in training_rows(pack, llm, folder, handles["merged"], args.repeats,
                                                           device)]
    print("\nDecoding (32 new tokens after the same prompt; speed relative to transformers' generate, >= 0.95 wanted)")
    common.table(["LLM", "what", "ms per 32 tokens", "speed vs generate"],
                 [(n, w, f"{t * 1000:.1f}", f"{r:.2f}x") for n, w, t, r in decode])
    print("\nTraining (one step = forward, backward and AdamW on 8 pictures: their captions and drawings)")
    common.table(["LLM", "what", "steps/s", "tokens per step", "speed vs peft loop"],
                 [(n, w, f"{1 / t:.2f}", k, f"{r:.2f}x") for n, w, t, r, k in training])
    return 0


if __name__ == "__main__":
    sys.exit(main())
