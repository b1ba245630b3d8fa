"""Prompt weights in ComfyUI's syntax for the MUMU connector: only the weighted words' tokens move (pictures keep
weight 1, placeholders still bind inside parentheses), by ComfyUI's formula from the empty prompt's encoding; weight
1.0 and escapes are byte-identical to the plain prompt; a seeded fuzz of the combined parser (weights, then
placeholders, then the tokenizer) gives only the pack's errors; the Encode node and the shipped
mumu_prompt_weights.json end to end in the real host."""
import logging
import random

import pytest
import torch
from conftest import check_golden_pixels, node_of, pack_module, pixel_change, run_saved_image
from test_mumu import ENCODE, TINY_RES, encode_graph, workflow_prompt


@pytest.fixture(scope="module")
def mumu(pack):
    return pack_module(pack, "bridges.mumu")


@pytest.fixture(scope="module")
def engine(pack):
    return pack_module(pack, "engine.mumu")


@pytest.fixture(scope="module")
def models(host, pack, tiny_idefics2, mumu_connector_file):
    files = pack_module(pack, "loaders.mumu")
    vlm = files.load_idefics2(tiny_idefics2, host.models_dir / "LLM" / tiny_idefics2, "fp32")
    connector = files.load_connector(host.models_dir / "bridges" / mumu_connector_file)
    grid, resolution = files.grid_for(vlm, TINY_RES)
    return vlm, connector, grid, resolution


@pytest.fixture(scope="module")
def pictures():
    gen = torch.Generator().manual_seed(3)
    return [torch.rand(40, 56, 3, generator=gen), torch.rand(48, 48, 3, generator=gen)]


def encode(engine, models, text, images=()):
    vlm, connector, grid, resolution = models
    tokens, pooled, _ = engine.encode(vlm, connector, text, list(images), grid, resolution, 0)
    return tokens, pooled


def rows_of(models, engine, text, word, images):
    """Positions of `word`'s tokens in the sequence Idefics2 reads for the unweighted `text`."""
    vlm, _, grid, resolution = models
    seq = engine.prepare_prompt(vlm, text, list(images), grid, resolution).sequence
    ids = seq.input_ids[0].tolist()
    piece = vlm.tokenizer(word, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i:i + len(piece)] == piece]
    assert len(starts) == 1, (word, starts)
    return list(range(starts[0], starts[0] + len(piece))), seq


def test_a_weight_changes_only_its_words_tokens_as_comfyui_weights_them(engine, models, pictures):
    images = [("", pictures[0]), ("dog", pictures[1])]
    plain_text = "a <image> man and his <dog> dog on a sofa"
    plain, pooled = encode(engine, models, plain_text, images)
    weighted, weighted_pooled = encode(engine, models, "a <image> man and his <dog> (dog:1.6) on a sofa", images)
    assert weighted.shape == plain.shape
    rows, seq = rows_of(models, engine, plain_text, " dog", images)
    changed = (plain != weighted).any(-1)[0].nonzero().flatten().tolist()
    assert changed == rows, "only the weighted word's tokens change"
    assert torch.equal(pooled, weighted_pooled), "the pooled vector is the prompt's, as in ComfyUI"
    for span in seq.spans:  # the pictures' tokens are untouched
        picture = slice(span.start, span.start + span.length)
        assert torch.equal(weighted[:, picture], plain[:, picture])
    # ComfyUI's formula: empty + w * (own - empty), the empty prompt being the start token then padding
    vlm, connector = models[:2]
    empty_hidden = engine.empty_hidden_states(vlm, plain.shape[1], connector.config.hidden_layer)
    with torch.no_grad():
        empty = connector.module()(empty_hidden)[0]
    expected = empty[:, rows] + 1.6 * (plain[:, rows] - empty[:, rows])
    assert torch.allclose(weighted[:, rows], expected, atol=1e-5)
    # a weight below 1 moves the other way, and text-only prompts weigh the same way
    lighter = encode(engine, models, "a <image> man and his <dog> (dog:0.4) on a sofa", images)[0]
    assert torch.allclose(lighter[:, rows], empty[:, rows] + 0.4 * (plain[:, rows] - empty[:, rows]), atol=1e-5)
    words, words_weighted = (encode(engine, models, t)[0] for t in ("a man and his dog", "a man and his (dog:1.3)"))
    assert (words != words_weighted).any(-1)[0].nonzero().flatten().tolist() == \
        rows_of(models, engine, "a man and his dog", " dog", [])[0]


def test_weight_one_and_escapes_are_byte_identical_to_the_plain_prompt(engine, models, pictures):
    images = [("", pictures[0]), ("dog", pictures[1])]
    plain = encode(engine, models, "a <image> man and his <dog> dog", images)
    for same in ("a <image> (man:1.0) and his <dog> dog", "(a <image> man:1) and his (<dog> dog:1.0)",
                 "a <image> man and his <dog> dog"):
        got = encode(engine, models, same, images)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1]), same
    assert not torch.equal(encode(engine, models, "a <image> (man) and his <dog> dog", images)[0], plain[0]), \
        "(man) is 1.1"
    # an escaped parenthesis is text: the same as reading the literal prompt without weights
    vlm, connector, grid, resolution = models
    literal = encode(engine, models, r"a <image> \(man\) and his <dog> dog", images)[0]
    prepared = engine.prepare_prompt(vlm, "a <image> (man) and his <dog> dog", images, grid, resolution)
    with torch.no_grad():
        as_text = connector.module()(engine.hidden_states(vlm, prepared, connector.config.hidden_layer))[0]
    assert torch.equal(literal, as_text)


def test_weights_around_placeholders_leave_the_pictures_alone(engine, models, pictures, caplog):
    images = [("man", pictures[0])]
    plain = encode(engine, models, "a <man> man in a hat", images)[0]
    with caplog.at_level(logging.WARNING):
        only_picture = encode(engine, models, "a (<man>:1.5) man in a hat", images)[0]
    assert torch.equal(only_picture, plain), "a weight around a placeholder alone weighs nothing"
    assert any("<man>" in r.getMessage() and "picture keeps weight 1" in r.getMessage() for r in caplog.records)
    plain = encode(engine, models, "old <man> man in a hat", images)[0]
    around = encode(engine, models, "(old <man> man:1.5) in a hat", images)[0]
    old_rows, seq = rows_of(models, engine, "old <man> man in a hat", "old", images)
    man_rows = rows_of(models, engine, "old <man> man in a hat", " man", images)[0]
    span = seq.spans[0]
    changed = (around != plain).any(-1)[0].nonzero().flatten().tolist()
    assert changed == old_rows + man_rows, "the words inside the parentheses move, the picture between them does not"
    assert torch.equal(around[:, span.start - 1:span.start + span.length + 1],
                       plain[:, span.start - 1:span.start + span.length + 1])


def test_weights_survive_the_token_budget(engine, models, pictures):
    """Pooling the image tokens to fit a budget keeps the weighted words' rows as weighted."""
    vlm, connector, grid, resolution = models
    images = [("", pictures[0])]
    full = encode(engine, models, "a <image> (man:1.4) reading", images)[0]
    text = full.shape[1] - grid * grid
    pooled = engine.encode(vlm, connector, "a <image> (man:1.4) reading", images, grid, resolution, text + 4)[0]
    assert pooled.shape[1] == text + 4
    assert torch.equal(pooled[:, -3:], full[:, -3:]), "the words after the picture are kept as weighted"


def test_combined_parser_fuzz_only_pack_errors(pack, engine, models, mumu):
    """Seeded fuzz of ComfyUI's weight syntax mixed with MUMU's placeholders, through everything before the model
    (weights, binding, per-piece weights, the tokenizer): a sequence with one weight per token, or the pack's own
    error. A few go through the model too."""
    vlm, connector, grid, _ = models
    pack_errors = pack_module(pack, "bridges.errors").PackError
    rng = random.Random(23)
    alphabet = list("()\\:.-+e0123456789 <>abcdog,\n\t") + [
        "<image>", "<image>", "<man>", "<dog>", "<cat>", "<>", "<<", "image>", "<image", "(", ")", ":1.3", ":0",
        ":-2", "\\(", "\\)", "é", "\0", "<fake_token_around_image>", " man", " dog", "(dog:1.4)", "(man)",
        "((a))", "(<image> cat:0.7)", "(<man>:1.2)", " a red fox", "\\"]
    outcomes = {"sequence": 0, "weighted": 0, "error": 0}
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        try:
            plain, char_weights = engine.parse_weights(text)
            if rng.random() < 0.8:  # pictures for the placeholders the text ends up with, most of the time
                found = [m.group(1) for m in mumu.PLACEHOLDER.finditer(plain)]
                names = [""] * found.count(mumu.POSITIONAL) + sorted(set(found) - {mumu.POSITIONAL})
                rng.shuffle(names)
            else:
                names = rng.choice([[], [""], ["", ""], ["man"], ["man", ""], ["dog", "man", ""]])
            segments = mumu.bind_placeholders(plain, names)
            weights = mumu.piece_weights(plain, char_weights) if char_weights is not None else None
            if weights is not None:
                assert len(weights) == len(segments)
                assert all((w is None) == (not isinstance(s, str)) and (w is None or len(w) == len(s))
                           for s, w in zip(segments, weights))
            seq = mumu.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context, weights=weights)
        except pack_errors:
            outcomes["error"] += 1
            continue
        outcomes["sequence"] += 1
        if seq.weights is not None:
            outcomes["weighted"] += 1
            assert len(seq.weights) == seq.input_ids.shape[1], text
            for span in seq.spans:
                assert all(w == 1.0 for w in seq.weights[span.start - 1:span.start + span.length + 1]), text
    print(f"\nMUMU weight + placeholder fuzz: {outcomes}")
    assert min(outcomes.values()) > 100, "the fuzz reaches sequences, weighted ones and errors"
    for text in ("a (<image> man:1.3) ((dog))", "(a:1.1)(b:0.9) <image>", r"\(<image>\)"):
        tokens = encode(engine, models, text, [("", torch.rand(32, 32, 3))])[0]
        assert torch.isfinite(tokens).all()


def test_encode_node_weighs_the_prompt_end_to_end(host, tiny_idefics2, mumu_connector_file, mumu_input_images):
    """The Encode node in the real host: weighted words change the conditioning, weight 1.0 does not, and a
    weighted negative prompt is read the same way."""
    pics = [mumu_input_images["man"]]

    def run(prompt, **overrides):
        host.reset_cache()
        host.run(encode_graph(tiny_idefics2, mumu_connector_file, prompt, pics, **overrides))
        return host.node_output("4")[0][0][0]

    plain = run("a <image> man reading in a library")
    assert torch.equal(run("a <image> (man:1.0) reading in a library"), plain)
    weighted = run("a <image> man reading in a (library:1.5)")
    changed = (weighted != plain).any(-1)[0].nonzero().flatten().tolist()
    assert weighted.shape == plain.shape and changed, "the weight changes the conditioning"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(host.models_dir / "LLM" / tiny_idefics2), local_files_only=True)
    library = len(tokenizer(" library", add_special_tokens=False)["input_ids"])
    assert changed == list(range(plain.shape[1] - library, plain.shape[1])), "only the last word's tokens move"
    g = encode_graph(tiny_idefics2, mumu_connector_file, "a <image> man", pics, negative_prompt="(blurry:1.4)")
    g["99"]["inputs"]["conditioning"] = ["4", 1]
    host.reset_cache()
    host.run(g)
    negative = host.node_output("4")[1][0][0]
    g["4"]["inputs"]["negative_prompt"] = "blurry"
    host.reset_cache()
    host.run(g)
    assert g["4"]["class_type"] == ENCODE
    assert not torch.equal(host.node_output("4")[1][0][0], negative)


def test_shipped_mumu_weighting_workflow_end_to_end(host, pack, tiny_idefics2, mumu_connector_file,
                                                    mumu_idefics2_lora, mumu_unet_lora, mumu_input_images):
    """mumu_prompt_weights.json is mumu_style_transfer.json with weights: the weights change the picture, and with
    every weight at 1.0 (or no syntax) it draws exactly the style-transfer workflow's picture."""
    images = [mumu_input_images["dog"], mumu_input_images["style"]]

    def prompt(name, text=None):
        graph = workflow_prompt(host, pack, name, idefics2=tiny_idefics2, connector=mumu_connector_file,
                                idefics2_lora=mumu_idefics2_lora, unet_lora=mumu_unet_lora, images=images)
        if text is not None:
            graph[node_of(graph, ENCODE)]["inputs"]["prompt"] = text
        return graph

    shipped = prompt("mumu_prompt_weights.json")
    text = shipped[node_of(shipped, ENCODE)]["inputs"]["prompt"]
    assert "(cat:1.4)" in text and "(painted style:0.6)" in text
    weighted = run_saved_image(host, shipped)
    at_one = run_saved_image(host, prompt("mumu_prompt_weights.json",
                                          text.replace(":1.4)", ":1.0)").replace(":0.6)", ":1.0)")))
    style_transfer = run_saved_image(host, prompt("mumu_style_transfer.json"))
    assert at_one.pixels == style_transfer.pixels, "weight 1.0 draws exactly what the plain prompt draws"
    change = pixel_change(weighted.pixels, style_transfer.pixels)
    print(f"\nmumu_prompt_weights.json: the weights change the pixels by {change:.2f} levels")
    assert change > 0.2
    assert run_saved_image(host, prompt("mumu_prompt_weights.json")).pixels == weighted.pixels
    check_golden_pixels(host, "mumu_prompt_weights.json", weighted)
