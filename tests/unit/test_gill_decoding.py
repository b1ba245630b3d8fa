"""GILL's decoding rules (bridges/gill_dialogue.py), each against the reference's own (kohjingyu/gill
GILLModel.generate), on hand-made logits; the whole loop is compared with a transcription of the reference in
tests/test_gill_dialogue.py."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def gd(bridges):
    return bridges("gill_dialogue")


@pytest.fixture(scope="module")
def tokenizer():
    path = Path(__file__).resolve().parents[2] / "headless" / "tiny_llm.py"
    spec = importlib.util.spec_from_file_location("tiny_llm_for_units", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer()


def vocab(gd, n_text=10):
    return gd.Vocabulary(n_text=n_text, newline=3, tokenizer_size=n_text - 1)


def test_img_logits_follow_the_reference_rules(gd):
    v = vocab(gd)
    base = torch.linspace(-1, 1, 18)[None].clone()
    base[0, 10] = -0.4  # [IMG0]
    # before min_word_tokens: every [IMG] is out
    out = gd.process_logits(base.clone(), 1, 0, v, gd.DecodeOptions(min_word_tokens=2, ret_scale_factor=5))
    assert torch.isinf(out[0, 10:]).all() and torch.equal(out[0, :10], base[0, :10])
    # from then on [IMG1..7] stay out and [IMG0] is |logit| x ret, then |.| x gen
    out = gd.process_logits(base.clone(), 2, 0, v, gd.DecodeOptions(min_word_tokens=2, ret_scale_factor=5,
                                                                   gen_scale_factor=3))
    assert torch.isinf(out[0, 11:]).all() and out[0, 10].item() == pytest.approx(0.4 * 5 * 3)
    # factors of 1 or less leave the logit as it is (the reference scales only above 1)
    out = gd.process_logits(base.clone(), 2, 0, v, gd.DecodeOptions(ret_scale_factor=0.5))
    assert out[0, 10].item() == pytest.approx(-0.4)
    # max_pictures reached: no more [IMG0]
    out = gd.process_logits(base.clone(), 5, 1, v, gd.DecodeOptions(max_pictures=1))
    assert torch.isinf(out[0, 10:]).all()


def test_top_p_keeps_the_first_token_past_the_threshold(gd):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    opts = gd.DecodeOptions(temperature=1.0, top_p=0.7)
    seen = {gd.choose(logits.clone(), opts, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 passes it: both kept, the rest removed
    # the same draws as the reference's multinomial on exp(logits) with the same seed
    for s in range(20):
        torch.manual_seed(s)
        reference = torch.multinomial(torch.tensor([[0.5, 0.3, 0.0, 0.0]]).log().exp(), 1).item()
        assert gd.choose(logits.clone(), opts, torch.Generator().manual_seed(s)) == reference
    assert gd.choose(logits.clone(), gd.DecodeOptions(), None) == 0  # greedy


@pytest.mark.parametrize("kwargs,says", [
    ({"max_new_tokens": 0}, "at least 1"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 0.9}, "top_p cannot be set with temperature 0"),
    ({"ret_scale_factor": -2}, "negative"),
    ({"max_pictures": -1}, "negative"),
])
def test_bad_settings_are_refused(gd, kwargs, says):
    with pytest.raises(gd.DialogueError, match=says):
        gd.DecodeOptions(**kwargs).check()


def test_room_for_a_reply(gd):
    assert gd.DecodeOptions(max_new_tokens=32, max_pictures=2).positions() == 32 + 14
    assert gd.DecodeOptions(max_new_tokens=2, max_pictures=5).positions() == 2 + 14


def test_vocabulary_is_the_reference_s(gd, tokenizer):
    size = len(tokenizer)
    padded = gd.vocabulary(tokenizer, size + 8)  # OPT-6.7B: 50272 rows for 50265 tokens
    assert (padded.n_text, padded.img0, padded.img_ids[-1]) == (size + 1, size + 1, size + 8)
    exact = gd.vocabulary(tokenizer, size)  # no row for '<|image|>': the [IMG] ids follow the tokens
    assert exact.img0 == size
    assert tokenizer.decode([padded.newline]) == "\n"  # not the prefix space this tokenizer puts first
    with pytest.raises(gd.DialogueError, match="not one model's"):
        gd.vocabulary(tokenizer, size - 1)


def test_a_tokenizer_that_knows_img_tokens_is_refused(gd, tokenizer):
    import copy
    trained = copy.deepcopy(tokenizer)
    trained.add_tokens([f"[IMG{i}]" for i in range(8)])
    with pytest.raises(gd.DialogueError, match="already knows '\\[IMG0\\]'"):
        gd.vocabulary(trained, len(trained) + 8)
    # with the plain tokenizer a typed [IMG0] is ordinary text: no id in GILL's [IMG] range
    v = gd.vocabulary(tokenizer, len(tokenizer) + 8)
    ids = tokenizer("[IMG0] [IMG1] [IMG2]", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 and all(i < v.n_text for i in ids)


def test_prompt_budget_leaves_the_oldest_exchanges_out(gd, tokenizer):
    blocks = [["Q: one two three\nA:", " four\n"], ["Q: five", 0, "six\nA:", " seven", None, "\n"], ["Q: eight\nA:"]]
    sizes = [sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) if isinstance(p, str) else
                 (8 if p is None else 4) for p in b) for b in blocks]
    bos = 1
    assert gd.plan_prompt(tokenizer, blocks, 4, 8, sum(sizes) + bos) == 0
    assert gd.plan_prompt(tokenizer, blocks, 4, 8, sum(sizes) + bos - 1) == 1
    assert gd.plan_prompt(tokenizer, blocks, 4, 8, sizes[-1] + bos) == 2
    with pytest.raises(gd.DialogueError, match="the new turn takes"):
        gd.plan_prompt(tokenizer, blocks, 4, 8, sizes[-1])
    embed = torch.nn.Embedding(len(tokenizer), 6)
    rows = {0: torch.full((4, 6), 7.0)}
    img = torch.full((8, 6), -3.0)
    with torch.no_grad():
        x = gd.prompt_embeds(embed, tokenizer, blocks[1:], rows, img)
    assert x.shape == (1, sizes[1] + sizes[2] + bos, 6)
    first = tokenizer("Q: five")["input_ids"]  # the BOS comes with the first string kept
    assert torch.equal(x[0, :len(first)], embed(torch.tensor(first)).detach())
    assert (x[0] == 7.0).all(dim=1).sum() == 4 and (x[0] == -3.0).all(dim=1).sum() == 8
