"""Prompt weights in ComfyUI's syntax for the Beyond CLIP mapper (both hosts: ComfyUI's parser is in both)."""
import copy
import random

import pytest
import torch
from conftest import PACK_DIR, api_workflow, node_of, pack_module, pixel_change, run_saved_image


@pytest.fixture(scope="module")
def llm_and_mapper(host, pack, tiny_llama, mapper_files):
    llm = pack_module(pack, "loaders.llm").load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama)
    mapper = pack_module(pack, "loaders.mappers").load_mapper(host.models_dir / "bridges" / mapper_files["sdxl"])
    return llm, mapper


def _encode(pack, llm, mapper, text, template="none"):
    return pack_module(pack, "engine.beyond_clip").encode(llm, mapper, text, hidden_layer=-1, template=template)


def _token_rows(pack, llm, text, template="none"):
    """Positions of `text`'s word 'red' in the ids the LLM reads."""
    ids = llm.tokenizer(pack_module(pack, "bridges.llm_text").apply_template(text, template))["input_ids"]
    red = llm.tokenizer(" red", add_special_tokens=False)["input_ids"]
    return [i for i in range(len(ids)) if ids[i:i + len(red)] == red]


@pytest.mark.parametrize("template", ["none", "llama-2-chat"])
def test_a_weight_changes_only_its_own_tokens_as_comfyui_weights_them(host, pack, llm_and_mapper, template):
    llm, mapper = llm_and_mapper
    plain, pooled = _encode(pack, llm, mapper, "a red fox in the snow", template)
    weighted, weighted_pooled = _encode(pack, llm, mapper, "a (red:1.6) fox in the snow", template)
    changed = (plain != weighted).any(-1)[0].nonzero().flatten().tolist()
    red = _token_rows(pack, llm, "a red fox in the snow", template)
    assert changed and set(changed) == set(range(red[0], red[0] + len(changed))) and changed[0] == red[0]
    assert torch.equal(pooled, weighted_pooled)  # the pooled vector is the prompt's, as in ComfyUI
    # ComfyUI's formula: empty + w * (own - empty), the empty prompt being the start token and padding
    engine = pack_module(pack, "engine.llm")
    empty_hidden = engine.empty_hidden_states(llm, plain.shape[1], -1)
    empty = mapper.module()(empty_hidden, 0)[0]
    expected = empty[:, changed] + 1.6 * (plain[:, changed] - empty[:, changed])
    assert torch.allclose(weighted[:, changed], expected, atol=1e-5)


def test_weight_one_and_escapes_are_byte_identical_to_plain_text(host, pack, llm_and_mapper):
    llm, mapper = llm_and_mapper
    plain = _encode(pack, llm, mapper, "a red fox in the snow")[0]
    for same in ("a (red:1.0) fox in the snow", "a (red:1) fox (in the snow:1.0)"):
        assert torch.equal(_encode(pack, llm, mapper, same)[0], plain), same
    # (red) is 1.1; an escaped parenthesis is text, with no weight
    assert not torch.equal(_encode(pack, llm, mapper, "a (red) fox in the snow")[0], plain)
    literal = _encode(pack, llm, mapper, r"a \(red\) fox")[0]
    as_text = pack_module(pack, "engine.llm").hidden_states(llm, "a (red) fox", num_tokens=mapper.config.num_tokens)
    with torch.no_grad():
        assert torch.equal(literal, mapper.module()(as_text.hidden, as_text.last_token)[0])


def test_unusable_weights_are_refused_with_the_packs_error(host, pack, llm_and_mapper):
    llm, mapper = llm_and_mapper
    errors = pack_module(pack, "bridges.prompt_weights")
    for text in ("a (red:inf) fox", "a (red:nan) fox", "a (red:1e9) fox", "(" * 40 + "red" + ")" * 40):
        with pytest.raises(errors.PromptWeightError):
            _encode(pack, llm, mapper, text)


def test_parser_fuzz_only_pack_errors(host, pack, llm_and_mapper):
    """Seeded fuzz of ComfyUI's syntax through the whole weighted path: a result or the pack's own error."""
    llm, mapper = llm_and_mapper
    pack_errors = pack_module(pack, "bridges.errors").PackError
    parse = pack_module(pack, "engine.prompt_weights").parse
    prompt_ids = pack_module(pack, "bridges.llm_text").prompt_ids
    rng = random.Random(17)
    alphabet = list("()\\:.-+e0123456789 abcfox,\n\t") + ["red", "(", ")", ":1.2", ":0", "é", "\0"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            segments = parse(text)
            p = prompt_ids(llm.tokenizer, text, context=128, num_tokens=rng.choice([0, 16]),
                           template=rng.choice(["none", "llama-2-chat"]), segments=segments)
            if p.weights is not None:
                assert len(p.weights) == p.ids.shape[1]
        except pack_errors:
            pass
    for text in ("a (red:1.3) fox", "((fox))", "(a:1.1)(b:0.9)"):  # a few through the model too
        tokens, _ = _encode(pack, llm, mapper, text)
        assert torch.isfinite(tokens).all()


def _weights_workflow(host, pack, tiny_llama, mapper, text):
    prompt = api_workflow(host, pack, "beyond_clip_prompt_weights.json")
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}}
        elif kind == "BeyondCLIP_LLMLoader":
            inputs["llm_name"] = tiny_llama
        elif kind == "BeyondCLIP_MapperLoader":
            inputs["mapper_name"] = mapper
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
        elif kind == "BeyondCLIP_TextEncode" and text is not None:
            inputs["prompt"] = text
    return prompt


def test_shipped_weighting_workflow_end_to_end(host, pack, tiny_llama, mapper_files):
    shipped = _weights_workflow(host, pack, tiny_llama, mapper_files["sd1"], None)
    text = shipped[node_of(shipped, "BeyondCLIP_TextEncode")]["inputs"]["prompt"]
    assert "(lighthouse:1.4)" in text and "(seagulls:0.5)" in text
    weighted = run_saved_image(host, shipped)
    one = text.replace(":1.4)", ":1.0)").replace(":0.5)", ":1.0)")
    plain = one.replace("(lighthouse:1.0)", "lighthouse").replace("(seagulls:1.0)", "seagulls")
    at_one = run_saved_image(host, _weights_workflow(host, pack, tiny_llama, mapper_files["sd1"], one))
    unweighted = run_saved_image(host, _weights_workflow(host, pack, tiny_llama, mapper_files["sd1"], plain))
    assert at_one.pixels == unweighted.pixels, "weight 1.0 must draw exactly what the plain prompt draws"
    change = pixel_change(weighted.pixels, unweighted.pixels)
    print(f"\nbeyond_clip_prompt_weights.json: the weights change the pixels by {change:.2f} levels")
    assert change > 0.2
    again = copy.deepcopy(shipped)
    assert run_saved_image(host, again).pixels == weighted.pixels


def test_gill_says_weights_are_ignored(host, pack, caplog):
    import logging
    warn = pack_module(pack, "engine.prompt_weights").warn_ignored
    with caplog.at_level(logging.WARNING):
        warn("a (red:1.3) fox", "GILL")
        warn("a red fox", "GILL")
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(said) == 1 and "GILL" in said[0]
    assert (PACK_DIR / "workflows" / "beyond_clip_prompt_weights.json").is_file()
