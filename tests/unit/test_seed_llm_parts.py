"""SEED codes as text (both forms, and a seeded fuzz: only the pack's own errors come out) and SEED-LLM's pure parts:
the sequences' labels, the per-kind softmax, the KV-cache decoding against full re-runs, nucleus sampling, and the
per-picture loss that makes DDP's slices add up to the one-process loss."""
import importlib.util
import random

import pytest
import torch
from conftest import PACK_DIR


@pytest.fixture(scope="module")
def m(bridges):
    class Namespace:
        seed = bridges("seed")
        llm = bridges("seed_llm")
        errors = bridges("errors")
        lora = bridges("training.lora")
        tasks = bridges("training.tasks")
    return Namespace


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.spec_from_file_location("tiny_llm_for_unit", PACK_DIR / "headless" / "tiny_llm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer()


# ---------------------------------------------------------------------------------------------- codes as text

def test_both_text_forms_read_back(m):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8192, (3, 32), generator=g)
    text = m.seed.SeedCodes(codes, 8192).text()
    assert text.splitlines()[0] == "<img>" + "".join(f"<img_{int(c):05d}>" for c in codes[0]) + "</img>"
    assert torch.equal(m.seed.parse_codes(text), codes)
    assert torch.equal(m.seed.parse_codes(text.replace("\n", " ")), codes)  # several images on one line
    assert torch.equal(m.seed.parse_codes(text.replace("><", "> <")), codes)  # spaces between tokens
    bare = "".join(f"<img_{int(c)}>" for c in codes[1])  # no markers, no zero padding: one image
    numbers = ", ".join(str(int(c)) for c in codes[2])
    assert torch.equal(m.seed.parse_codes(f"{bare}\n\n[{numbers}]\n"), codes[1:])
    # digits of any script count by their value in the numbers form, full-width commas separate
    wide = m.seed.parse_codes("\uff0c".join(["\uff11\uff12", "\u0661\u0662"] + ["3"] * 30))
    assert wide[0, :3].tolist() == [12, 12, 3]
    for bad, message in [("<img>" + "<img_1>" * 31 + "</img>", "has 31 codes"),
                         ("<img>" + "<img_1>" * 32, "never closed"),
                         ("<img_1>" * 32 + "</img>", "without <img>"),
                         ("<img><img>" + "<img_1>" * 32 + "</img>", "inside another"),
                         ("<img>" + "<img_1>" * 32 + "</img><img_1>", "after </img>"),
                         ("<img>" + "<img_1>" * 32 + "</img> hello", "'hello' is not part of SEED codes"),
                         ("<img>" + "<img_-1>" + "<img_1>" * 31 + "</img>", "is not part of SEED codes"),
                         ("1 2 x", "'x' is not a code"), ("", "no SEED codes"),
                         ("<img_" + "9" * 5000 + ">", "has 5000 digits, far outside any SEED codebook"),
                         (" ".join(["\uff11\uff12", "\u0661\u0662"] + ["3"] * 31), "has 33 codes")]:
        with pytest.raises(m.errors.InputError, match=message):
            m.seed.parse_codes(bad)


FRAGMENTS = ["<img>", "</img>", "<img_", ">", "<", "_", "img", " ", "  ", "\t", "\n", "\r\n", ",", ";", "[", "]", "(",
             ")", "-", "+", "0", "7", "00042", "08191", "8192", "99999", "1e3", "٣", "é", "\x00", "\u2028",
             "<img_00001>", "<img_8191>", "9" * 40, "9" * 4400]


def fuzz_text(rng: random.Random) -> str:
    if rng.random() < 0.3:  # mostly well-formed, with one mutation: the parser's deeper branches
        rows = []
        for _ in range(rng.randint(1, 3)):
            n = rng.choice([32, 32, 32, 31, 33, 0])
            codes = [rng.randint(0, 99999) for _ in range(n)]
            rows.append("<img>" + "".join(f"<img_{c:05d}>" for c in codes) + "</img>" if rng.random() < 0.5
                        else " ".join(map(str, codes)))
        text = "\n".join(rows)
        if text and rng.random() < 0.7:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(FRAGMENTS) + text[i + rng.randint(0, 3):]
        return text
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 60)))


def test_fuzzed_text_gives_codes_or_the_packs_own_error(m):
    rng = random.Random(1234)
    parsed = refused = 0
    for _ in range(5000):
        text = fuzz_text(rng)
        try:
            codes = m.seed.parse_codes(text)
        except m.errors.InputError as e:
            assert str(e), text
            refused += 1
            continue
        assert codes.dtype == torch.int64 and codes.ndim == 2 and codes.shape[1] == 32 and (codes >= 0).all()
        assert torch.equal(m.seed.parse_codes(m.seed.SeedCodes(codes).text()), codes)  # any parse writes back
        parsed += 1
    print(f"\nfuzz: {parsed} texts parsed, {refused} refused with InputError, nothing else raised")
    assert parsed > 100 and refused > 1000


def test_out_of_range_codes_are_refused_where_the_codebook_is_known(m):
    codes = m.seed.parse_codes("<img>" + "<img_00001>" * 31 + "<img_09000></img>")
    with pytest.raises(m.errors.InputError, match=r"9000 \(image 1, position 32\) is out of range"):
        m.seed.check_codes(codes, m.seed.SeedConfig())


# ---------------------------------------------------------------------------------------------- sequences

def config_for(m, tokenizer, **kw):
    return m.llm.SeedLLMConfig(base_vocab=len(tokenizer), width=32, **kw)


def test_sequences_label_what_each_task_learns(m, tokenizer):
    config = config_for(m, tokenizer)
    codes = torch.arange(100, 132)
    cap = m.llm.caption_sequence(config, tokenizer, codes, "a red fox in the snow")
    assert cap.ids[:3].tolist() == [tokenizer.bos_token_id, config.boi, config.base_vocab + 100]
    assert cap.ids[34].item() == config.eoi and cap.kind == "caption"
    labelled = cap.labels[cap.labels != m.llm.IGNORE]
    assert tokenizer.decode(labelled[:-1]).strip() == "a red fox in the snow"
    assert labelled[-1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(cap.ids[35:35 + len(m.llm.text_ids(tokenizer, "A photo of"))]).strip() == "A photo of"
    draw = m.llm.text_to_image(config, tokenizer, "a red fox", codes)
    labelled = draw.labels[draw.labels != m.llm.IGNORE]
    assert torch.equal(labelled, config.code_ids(codes)) and draw.kind == "draw"  # the 32 codes, nothing else
    prompt = m.llm.draw_prompt_ids(config, tokenizer, "a red fox")
    assert draw.ids[:len(prompt)].tolist() == prompt and prompt[-1] == config.boi
    q = m.llm.question_sequence(config, tokenizer, codes, "what animal?", "fox")
    assert q.kind == "question" and tokenizer.decode(q.labels[q.labels != m.llm.IGNORE][:-1]).strip() == "fox"
    describe = m.llm.describe_prompt_ids(config, tokenizer, codes, "what animal?")
    assert q.ids[:len(describe)].tolist() == describe


def tiny_model(arch="llama", vocab=384, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128)).eval()
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128)).eval()


def vocabulary(m, model, seed=0):
    emb = model.get_input_embeddings().weight
    config = m.llm.SeedLLMConfig(base_vocab=emb.shape[0], width=emb.shape[1], codebook_size=512)
    g = torch.Generator().manual_seed(seed)
    vocab = m.llm.VisualVocabulary(config, torch.randn(512, 32, generator=g)).initialise(
        emb, model.get_output_embeddings().weight, g)
    with torch.no_grad():
        vocab.out_rows.add_(torch.randn(vocab.out_rows.shape, generator=g))  # distinct scores for the test
    return vocab


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cached_decoding_equals_rerunning_the_whole_sequence(m, arch):
    model = tiny_model(arch)
    vocab = vocabulary(m, model)
    config = vocab.config
    prompt = [2, 17, 33, 90, config.boi]
    codes = m.llm.draw_codes(model, vocab, prompt)
    assert codes.shape == (32,) and ((codes >= 0) & (codes < config.codebook_size)).all()
    ids = list(prompt)
    with torch.no_grad():
        for expected in codes.tolist():
            hidden, _ = m.llm.last_states(model, vocab.embed(model.get_input_embeddings(), torch.tensor([ids])))
            assert int(vocab.new_logits(hidden[0, -1], config.codebook_size).argmax()) == expected
            ids.append(config.base_vocab + expected)
    # text: the LLM's own tokens only, stopping at the stop token
    text = m.llm.generate_text(model, vocab, prompt, max_new_tokens=12)
    ids = list(prompt)
    with torch.no_grad():
        for expected in text:
            hidden, _ = m.llm.last_states(model, vocab.embed(model.get_input_embeddings(), torch.tensor([ids])))
            assert int(model.get_output_embeddings()(hidden[0, -1]).argmax()) == expected < config.base_vocab
            ids.append(expected)
    first_new = next(k for k in range(1, len(text)) if text[k] not in text[:k])
    assert m.llm.generate_text(model, vocab, prompt, max_new_tokens=12, stop_id=text[first_new]) == text[:first_new]


def test_nucleus_sampling(m):
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])
    assert m.llm.choose(logits, 0.0, 1.0, torch.Generator()) == 0
    draws = [m.llm.choose(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(300)]
    assert set(draws) == {0, 1}  # softmax: 0.66, 0.24, ...: the first two hold 0.75
    assert draws == [m.llm.choose(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(300)]
    assert {m.llm.choose(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(300)} >= {0, 1, 2}


def test_each_position_scores_its_own_kind_and_every_picture_weighs_the_same(m, tokenizer):
    model = tiny_model(vocab=len(tokenizer))
    vocab = vocabulary(m, model)
    config = vocab.config
    lora = m.lora.LoRASet.for_linears(model, m.lora.linear_paths(model, r"layers"), 4)
    codes = [torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    seqs = [m.llm.caption_sequence(config, tokenizer, codes[0], "a cat"),
            m.llm.text_to_image(config, tokenizer, "a cat", codes[0])]
    ids, mask, labels = m.llm.pad_batch(seqs, 0)
    with torch.no_grad():
        losses = m.llm.sequence_losses(model, vocab, ids, mask, labels)
        hidden, _ = m.llm.last_states(model, vocab.embed(model.get_input_embeddings(), ids), attention_mask=mask)
    # by hand: the caption's words among the LLM's tokens, the codes among the codes only
    words = [(t, int(labels[0, t + 1])) for t in range(ids.shape[1] - 1) if labels[0, t + 1] != m.llm.IGNORE]
    with torch.no_grad():
        by_hand = sum(-torch.log_softmax(model.get_output_embeddings()(hidden[0, t]), -1)[y] for t, y in words)
        by_hand = by_hand / len(words)
    picks = [(t, int(labels[1, t + 1]) - config.base_vocab) for t in range(ids.shape[1] - 1)
             if labels[1, t + 1] != m.llm.IGNORE]
    with torch.no_grad():
        by_hand_codes = sum(-torch.log_softmax(vocab.new_logits(hidden[1, t], 512), -1)[y] for t, y in picks)
        by_hand_codes = by_hand_codes / len(picks)
    assert losses[0] == pytest.approx(float(by_hand), rel=1e-5) and losses[1] == pytest.approx(float(by_hand_codes),
                                                                                               rel=1e-5)
    assert len(picks) == 32
    # a picture with one question more weighs the same as one without: the batch loss is the mean of two halves
    examples = [[m.llm.caption_sequence(config, tokenizer, codes[i], "a cat")] +
                [m.llm.question_sequence(config, tokenizer, codes[i], "what?", "a cat")] * i for i in range(4)]
    task = m.tasks.SeedLLMTask(m.tasks.SeedLLMStudent(model, vocab, lora), examples, 0)
    with torch.no_grad():
        whole = task.loss(torch.tensor([0, 1, 2, 3]), None, task.module)
        halves = (task.loss(torch.tensor([0, 2]), None, task.module) + task.loss(torch.tensor([1, 3]), None,
                                                                                  task.module)) / 2
    assert whole == pytest.approx(float(halves), rel=1e-6)
    kinds = task.losses_by_kind(torch.tensor([0, 1, 2, 3]))
    assert set(kinds) == {"caption", "question"}
