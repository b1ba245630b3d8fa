"""GILL's dialogue in the real host: the KV-cached reply equals a transcription of the reference's decoding loop
(tokens, [IMG] states, conditioning, retrieval, decision), pictures where the LLM writes [IMG0], conversations as
values and files, bad input, and the shipped dialogue workflows end to end.

The small models are test_gill's (a random OPT 64 wide with a 128-position context, a GILL release in the official
layout, a tiny CLIP tower). Random weights never *mean* to show a picture: where a turn must show one, the test
raises ret_scale_factor (the reference's own knob: |[IMG0] logit| x factor) so that [IMG0] wins from
min_word_tokens on; that is forced, through the real decoding rule. With factor 1 the choice is the model's own."""
import base64
import copy
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import SavedImage, check_golden_pixels, forget_everything, node_of, pack_module, pixel_change
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_gill import (  # noqa: F401 - fixtures
    as_image_tensor,
    gill,
    gill_nodes,
    hf_tower,
    loaded,
    picture,
    reference,
    release,
    tiny_opt,
    towers,
    write_photos,
)

GILL_LLM = "tiny-opt-gill"
CONTEXT = 512
FORCE = {"ret_scale_factor": 1000.0, "min_word_tokens": 2}  # [IMG0] wins from the third step on


@pytest.fixture(scope="module")
def gill_llm(host, pack, tiny_opt):
    """models/LLM/tiny-opt-gill: test_gill's OPT with 8 unused embedding rows after its tokens, as OPT-6.7B has (50272
    rows for 50265 tokens), so GILL's '<|image|>' id is a row of the LLM and the reference's resized vocabulary has
    the very ids the pack decodes; and a 512-position context."""
    folder = host.models_dir / "LLM" / GILL_LLM
    if not folder.exists():
        shutil.copytree(host.models_dir / "LLM" / tiny_opt, folder)
        with safe_open(folder / "model.safetensors", "pt") as f:
            names = f.keys()  # a safetensors handle is not a dict
            metadata, sd = f.metadata(), {k: f.get_tensor(k) for k in names}
        generator = torch.Generator().manual_seed(8)
        key = "model.decoder.embed_tokens.weight"
        sd[key] = torch.cat([sd[key], torch.randn(8, sd[key].shape[1], generator=generator) * 0.02])
        # 512 positions instead of 128: room for a three-turn conversation in the small tokenizer's many tokens
        key = "model.decoder.embed_positions.weight"
        sd[key] = torch.cat([sd[key], torch.randn(CONTEXT - sd[key].shape[0] + 2, sd[key].shape[1],
                                                  generator=generator) * sd[key].std()])
        save_file(sd, folder / "model.safetensors", metadata=metadata)
        config = json.loads((folder / "config.json").read_text())
        config.update(vocab_size=config["vocab_size"] + 8, max_position_embeddings=CONTEXT)
        (folder / "config.json").write_text(json.dumps(config))
    return pack_module(pack, "loaders.llm").load_llm(GILL_LLM, folder, "fp32")


@pytest.fixture(scope="module")
def dialogue(pack):
    return pack_module(pack, "engine.gill_dialogue")


@pytest.fixture(scope="module")
def bridge(pack):
    return pack_module(pack, "bridges.gill_dialogue")


@pytest.fixture(scope="module")
def conv(pack):
    return pack_module(pack, "bridges.conversation")


def options(bridge, **kw):
    return bridge.DecodeOptions(**{"max_new_tokens": 8, "max_pictures": 16, **kw})


# ---- a transcription of the reference (kohjingyu/gill, gill/models.py) --------------------------------------------

def reference_generate(lm, embeddings, img_ids, max_len, temperature=0.0, top_p=1.0, min_word_tokens=0,
                       ret_scale_factor=1.0, gen_scale_factor=1.0, filter_value=-float("inf")):
    """GILLModel.generate: the whole sequence re-run at every step (no KV cache)."""
    retrieval_token_idx = gen_token_idx = img_ids
    with torch.no_grad():
        out = None
        output_embeddings = []
        for i in range(max_len):
            output = lm(inputs_embeds=embeddings, use_cache=False, output_hidden_states=True)
            output_embeddings.append(output.hidden_states[-1])
            logits = output.logits[:, -1, :]
            logits[:, retrieval_token_idx[1:]] = filter_value
            logits[:, gen_token_idx[1:]] = filter_value
            if i < min_word_tokens:
                logits[:, retrieval_token_idx] = filter_value
                logits[:, gen_token_idx] = filter_value
            else:
                if ret_scale_factor > 1:
                    logits[:, retrieval_token_idx[0]] = logits[:, retrieval_token_idx[0]].abs() * ret_scale_factor
                if gen_scale_factor > 1:
                    logits[:, gen_token_idx[0]] = logits[:, gen_token_idx[0]].abs() * gen_scale_factor
            if temperature == 0.0:
                next_token = torch.argmax(logits, keepdim=True, dim=-1)
            else:
                logits = logits / temperature
                if top_p < 1.0:
                    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
                    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
                    sorted_indices_to_remove = cumulative_probs > top_p
                    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
                    sorted_indices_to_remove[..., 0] = 0
                    for j in range(sorted_indices.shape[0]):
                        indices_to_remove = sorted_indices[j, sorted_indices_to_remove[j, :]]
                        logits[j, indices_to_remove] = filter_value
                token_weights = logits.exp()
                next_token = torch.multinomial(token_weights, 1)
            if next_token.shape[0] == 1 and next_token.item() == retrieval_token_idx[0]:
                next_token = torch.tensor(retrieval_token_idx)[None, :].long()
            else:
                next_token = next_token.long()
            out = next_token if out is None else torch.cat([out, next_token], dim=-1)
            embeddings = torch.cat([embeddings, lm.get_input_embeddings()(next_token)], dim=1)
    return out, output_embeddings


def reference_lm(llm_model, tokenizer, ref):
    """What load_gill builds: '<|image|>' and [IMG0]..[IMG7] added after the tokenizer's ids, the embedding matrix
    resized to them, the release's 8 rows copied into the last ones (the head is tied to them)."""
    lm = copy.deepcopy(llm_model).float().eval()
    lm.resize_token_embeddings(len(tokenizer) + 9)
    with torch.no_grad():
        lm.get_input_embeddings().weight[-8:].copy_(ref.input_embeddings.weight)
    return lm, list(range(len(tokenizer) + 1, len(tokenizer) + 9))


def reference_reply(lm, img_ids, tokenizer, ref, prompts, num_words, seed, **kw):
    """generate_for_images_and_texts up to its [IMG] states: the interleaved input (BOS with the first string, a
    picture as visual_embeddings(pooler_output) -> 4 tokens), generate, the cut at the newline, the [IMG] groups.
    The reference's newline id is tokenizer('\\n').input_ids[0], the newline token for OPT's tokenizer; the small
    tokenizer puts a prefix space first, so its newline token itself is taken here."""
    pieces, add_bos = [], True
    for p in prompts:
        if torch.is_tensor(p):
            pieces.append(ref.visual_embeddings(p).reshape(1, 4, -1))
        else:
            ids = tokenizer(p, add_special_tokens=add_bos, return_tensors="pt").input_ids
            add_bos = False
            pieces.append(lm.get_input_embeddings()(ids))
    input_embs = torch.cat(pieces, dim=1).detach()
    torch.manual_seed(seed)
    generated_ids, generated_embeddings = reference_generate(lm, input_embs, img_ids, num_words, **kw)
    embeddings = generated_embeddings[-1][:, input_embs.shape[1]:]
    newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    trunc_idx = 0
    for j in range(generated_ids.shape[1]):
        if generated_ids[0, j] == newline:
            trunc_idx = j
            break
    if trunc_idx > 0:
        generated_ids, embeddings = generated_ids[:, :trunc_idx], embeddings[:, :trunc_idx]
    starts = [i for i, x in enumerate(generated_ids[0, :] == img_ids[0]) if x]
    return generated_ids[0].tolist(), [embeddings[:, i:i + 8] for i in starts]


@pytest.mark.parametrize("settings", [
    {"max_new_tokens": 9, "ret_scale_factor": 1.0},  # the model's own choice (words only, here)
    {"max_new_tokens": 9, **FORCE},
    {"max_new_tokens": 12, "ret_scale_factor": 6.0, "min_word_tokens": 1},  # pictures and words interleaved
    {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "ret_scale_factor": 4.0, "seed": 5},
    {"max_new_tokens": 12, "temperature": 1.2, "ret_scale_factor": 8.0, "gen_scale_factor": 1.5, "seed": 2},
], ids=["greedy", "forced", "interleaved", "top-p", "temperature"])
def test_kv_cached_reply_equals_the_reference_loop(host, pack, dialogue, bridge, gill_llm, loaded, reference,
                                                   towers, tmp_path, settings):
    photos = tmp_path / "photos"
    write_photos(photos, 4)
    index, _ = pack_module(pack, "engine.gill").build_index(loaded, towers(0), photos, tmp_path / "idx", "p")
    img = as_image_tensor(picture(3, (224, 224)))
    opts = options(bridge, **settings)
    turn = dialogue.reply(gill_llm, loaded, None, "what is in this picture?", opts, images=img,
                          clip_vision=towers(0), index=index, threshold=0.5)

    lm, img_ids = reference_lm(gill_llm.inner, gill_llm.tokenizer, reference)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = hf_tower(0).vision_model(pixel_values=(img.movedim(-1, 1) - mean) / std).pooler_output
        ids, raws = reference_reply(lm, img_ids, gill_llm.tokenizer, reference,
                                    [pooled, "Q: what is in this picture?\nA:"], opts.max_new_tokens, opts.seed,
                                    temperature=opts.temperature, top_p=opts.top_p,
                                    min_word_tokens=opts.min_word_tokens, ret_scale_factor=opts.ret_scale_factor,
                                    gen_scale_factor=opts.gen_scale_factor)
    print(f"\n{settings}: reference {ids}\n  pack {turn.tokens} ({turn.stopped}); reply {turn.reply!r}")
    assert turn.tokens == ids
    assert len(turn.pictures) == len(raws)
    seen = []
    for k, (result, raw) in enumerate(zip(turn.pictures, raws)):
        assert result.states.shape == (1, 8, 64)
        if raw.shape[1] < 8:  # [IMG0] at the last step: the reference's loop stops before running [IMG0..7]
            assert k == len(raws) - 1 and turn.tokens[-8:] == img_ids
            continue
        assert (result.states - raw).abs().max().item() <= 1e-5
        with torch.no_grad():
            want = reference.gen_text_hidden_fcs[0](raw, reference.input_embeddings.weight[None])
            ret = reference.ret_text_hidden_fcs[0](raw, None)[:, 0, :]
            cosine = index.embeddings @ F.normalize(ret, dim=-1)[0]
            p = reference.decision_model(raw[:, 0]).softmax(-1)[0, 1].item()
        scores = cosine.clone()
        for i in seen:  # the reference lowers by 1000 each image this reply has shown, once per showing
            scores[i] -= 1000
        best = int(scores.argmax())
        seen.append(best)
        assert result.retrieved_path == index.paths[best]
        assert result.score == pytest.approx(cosine[best].item(), abs=1e-5)
        assert result.p_retrieve == pytest.approx(p, abs=1e-5)
        assert result.decision == ("retrieve" if p >= 0.5 else "generate")
        if result.decision == "generate":
            assert (result.conditioning[0][0] - want).abs().max().item() <= 1e-5
    if settings.get("min_word_tokens") == 2:
        assert turn.tokens[2:10] == img_ids  # forced from the third step on, the other seven [IMG] follow at once


def test_cache_free_rerun_on_a_longer_conversation(dialogue, bridge, gill, gill_llm, loaded, reference, towers, conv):
    """Two earlier exchanges (a retrieved picture among them) before the new turn: the prompt is the reference's
    'Q: ... A:' list, and the KV-cached reply still equals the cache-free loop on it."""
    c = conv.Conversation().with_turns(
        conv.user_turn("hello there"), conv.Turn("assistant", ("hi, how can i help?",)),
        conv.user_turn("show me a fox"),
        conv.Turn("assistant", ("here is one", conv.Picture(as_image_tensor(picture(7))[0], "retrieved"))))
    opts = options(bridge, max_new_tokens=6, **FORCE)
    turn = dialogue.reply(gill_llm, loaded, c, "and a cat?", opts, clip_vision=towers(0))
    # the same prompt run without a cache, step by step, through the LLM's own forward
    model, tok = gill_llm.inner, gill_llm.tokenizer
    g = loaded.inner
    with torch.no_grad():
        pic = g.image_tokens(gill.clip_pooled(towers(0), c.turns[3].parts[1].image[None]))[0]
        parts = ["Q: hello there\nA:", " hi, how can i help?\n", "Q: show me a fox\nA:", " here is one", pic, "\n",
                 "Q: and a cat?\nA:"]
        embeds = torch.cat([pic[None] if torch.is_tensor(p) else model.get_input_embeddings()(
            torch.tensor([tok(p, add_special_tokens=i == 0)["input_ids"]])) for i, p in enumerate(parts)], dim=1)
        lm, img_ids = reference_lm(model, tok, reference)
        ids, _ = reference_generate(lm, embeds, img_ids, 6, min_word_tokens=2, ret_scale_factor=1000.0)
    assert turn.tokens == ids[0].tolist() and turn.prompt_positions == embeds.shape[1]
    assert [t.role for t in turn.conversation.turns] == ["user", "assistant"] * 3


# ---- the node: several pictures, decisions, bad input -------------------------------------------------------------

def node_inputs(**kw):
    base = {"message": "show me a fox", "max_new_tokens": 8, "min_word_tokens": 0, "ret_scale_factor": 1.0,
            "gen_scale_factor": 1.0, "temperature": 0.0, "top_p": 1.0, "seed": 0, "max_pictures": 1, "threshold": 0.5}
    base.update(kw)
    return base


def test_several_pictures_in_one_reply(host, pack, gill_nodes, gill_llm, loaded, towers, tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    index, _ = pack_module(pack, "engine.gill").build_index(loaded, towers(0), photos, tmp_path / "idx", "p")
    node = gill_nodes.GILLDialogue()
    out = node.reply(gill_llm, loaded, **node_inputs(max_pictures=2, threshold=0.5, **FORCE), index=index,
                     clip_vision=towers(0))
    reply, conditioning, retrieved, scores, decisions, conversation = out["result"]
    assert reply.count("[picture") == 2 and "[picture 1]" in reply and "[picture 2]" in reply
    assert len(retrieved) == len(scores) == len(decisions) == 2
    assert retrieved[0].shape[0] == 1 and len({float(s) for s in scores}) == 2  # two different images shown
    made = [d for d in decisions if d == "generate"]
    blocker = host.supports_execution_blocker()
    assert len(conditioning) == (len(made) or 1)  # one conditioning per picture to generate (or the placeholder)
    if made:
        assert all(c[0][0].shape == (1, 77, 768) for c in conditioning)
    reply_turn = conversation.turns[-1]
    assert [p.origin for p in reply_turn.pictures] == [
        "generated" if d == "generate" else "retrieved" for d in decisions]
    # after max_pictures the LLM writes words only: the scale factor cannot bring [IMG0] back
    tokens = node.reply(gill_llm, loaded, **node_inputs(max_pictures=0, **FORCE))["result"]
    assert "[picture" not in tokens[0] and tokens[4] == ([tokens[4][0]] if blocker else ["none"])
    # the threshold decides between the two
    assert set(node.reply(gill_llm, loaded, **node_inputs(max_pictures=2, threshold=0.0, **FORCE), index=index,
                          clip_vision=towers(0))["result"][4]) == {"retrieve"}
    assert set(node.reply(gill_llm, loaded, **node_inputs(max_pictures=2, threshold=1.0, **FORCE), index=index,
                          clip_vision=towers(0))["result"][4]) == {"generate"}


def test_typed_img_tokens_are_plain_text(pack, dialogue, bridge, gill_llm, loaded, reference, tmp_path):
    typed = "[IMG0] [IMG1] [IMG2] [IMG3] [IMG4] [IMG5] [IMG6] [IMG7]"
    turn = dialogue.reply(gill_llm, loaded, None, typed, options(bridge, max_new_tokens=4))
    tok = gill_llm.tokenizer
    text_ids = tok(f"Q: {typed}\nA:")["input_ids"]
    assert turn.prompt_positions == len(text_ids) > 8 + 4  # text tokens, not GILL's eight [IMG] embeddings
    assert all(i < len(tok) for i in text_ids)
    lm, img_ids = reference_lm(gill_llm.inner, tok, reference)
    ids, _ = reference_reply(lm, img_ids, tok, reference, [f"Q: {typed}\nA:"], 4, 0)
    assert turn.tokens == ids
    assert turn.conversation.turns[0].parts == (typed,)
    files = pack_module(pack, "loaders.conversations")
    path = files.save_conversation(tmp_path / "typed.conversation.json", turn.conversation)
    assert files.read_conversation(path).turns[0].parts == (typed,)


@pytest.mark.parametrize("kwargs,says", [
    ({"message": "   "}, "the turn is empty"),
    ({"message": "look at <image>"}, "1 <image> placeholder.*0 picture"),
    ({"message": "look", "images": torch.rand(1, 32, 32, 1)}, r"shape \(32, 32, 1\).*RGB"),
    ({"message": "look", "images": torch.full((1, 32, 32, 3), float("nan"))}, "NaN"),
    ({"message": "look", "images": torch.rand(1, 32, 32, 3), "clip_vision": None}, "no clip_vision"),
    ({"message": "word " * 200}, "the new turn takes .* positions"),
    ({"temperature": 0.0, "top_p": 0.5}, "top_p cannot be set"),
])
def test_bad_input_is_refused_by_name(gill_nodes, gill_llm, loaded, towers, kwargs, says):
    kw = node_inputs(**{k: v for k, v in kwargs.items() if k not in ("images", "clip_vision")})
    extra = {"images": kwargs.get("images"), "clip_vision": kwargs.get("clip_vision", towers(0))}
    with pytest.raises(ValueError, match=says):
        gill_nodes.GILLDialogue().reply(gill_llm, loaded, **kw, **extra)


def test_a_conversation_longer_than_the_context_drops_the_oldest_turns(dialogue, bridge, conv, gill_llm, loaded):
    c = conv.Conversation()
    for i in range(40):
        c = c.with_turns(conv.user_turn(f"question number {i} about the sea"),
                         conv.Turn("assistant", (f"answer number {i} about waves",)))
    opts = options(bridge, max_new_tokens=8, max_pictures=1)
    turn = dialogue.reply(gill_llm, loaded, c, "and the sky?", opts)
    assert turn.dropped_turns > 0 and turn.dropped_turns % 2 == 0  # whole exchanges go
    assert turn.prompt_positions <= CONTEXT - opts.positions()
    assert "left out" in turn.conversation.notes[0] and len(turn.conversation) == 82  # the value keeps every turn
    kept = dialogue.reply(gill_llm, loaded, conv.Conversation(turns=c.turns[turn.dropped_turns:]), "and the sky?", opts)
    assert kept.tokens == turn.tokens and kept.dropped_turns == 0  # exactly the prompt of the newest turns


# ---- conversation files -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(pack):
    return pack_module(pack, "loaders.conversations")


def a_conversation(conv):
    c = conv.Conversation().with_turns(
        conv.user_turn("what is <image> this?", as_image_tensor(picture(1, (40, 30)))),
        conv.Turn("assistant", ("a painting of",
                                conv.Picture(as_image_tensor(picture(2))[0], "retrieved", "a.png (0.5)"),
                                "and", conv.Picture(None, "generated", "p_retrieve=0.2"))))
    return c


def test_file_round_trip(files, conv, tmp_path):
    c = a_conversation(conv)
    path = files.save_conversation(tmp_path / "chat.conversation.json", c)
    assert not list(tmp_path.glob("*.tmp")) and json.loads(path.read_text())["format"] == "beyond_clip.conversation"
    back = files.read_conversation(path)
    assert back.show() == c.show()
    for a, b in zip(c.turns, back.turns):
        for x, y in zip(a.parts, b.parts):
            if isinstance(x, conv.Picture) and not x.pending:
                assert (x.image - y.image).abs().max() <= 0.5 / 255 + 1e-6  # stored as 8-bit PNG
            else:
                assert type(x) is type(y) and (x == y if isinstance(x, str) else y.pending)
    # saving again replaces its own file; a file of anything else is never replaced
    files.save_conversation(path, back)
    other = tmp_path / "notes.conversation.json"
    other.write_text('{"nodes": []}')
    with pytest.raises(Exception, match="not a conversation file written by this pack"):
        files.save_conversation(other, c)
    assert other.read_text() == '{"nodes": []}'


def test_bad_files_are_refused_by_name(files, conv, tmp_path):
    good = files.save_conversation(tmp_path / "good.conversation.json", a_conversation(conv)).read_text()
    data = json.loads(good)

    def written(name, text):
        path = tmp_path / name
        path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
        return path

    cases = {
        "missing.conversation.json": (None, "no such conversation file"),
        "workflow.json": (json.dumps({"last_node_id": 3, "nodes": []}), "not a Beyond CLIP conversation"),
        "truncated.json": (good[: len(good) // 2], "truncated or not JSON"),
        "binary.json": (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated or not JSON"),
        "nested.json": ("[" * 100000 + "]" * 100000, "truncated or not JSON|nested too deeply"),
    }
    broken = copy.deepcopy(data)
    broken["turns"][0]["parts"][1]["picture"]["image"] = "data:image/png;base64,@@@"
    cases["base64.json"] = (json.dumps(broken), "turn 1, part 2: the picture's base64 text is damaged")
    png = copy.deepcopy(data)
    raw = base64.b64decode(png["turns"][0]["parts"][1]["picture"]["image"].split(",", 1)[1])
    png["turns"][0]["parts"][1]["picture"]["image"] = "data:image/png;base64," + base64.b64encode(
        raw[:40] + bytes(len(raw) - 40)).decode()
    cases["png.json"] = (json.dumps(png), "turn 1, part 2: the picture cannot be decoded")
    jpeg = copy.deepcopy(data)
    jpeg["turns"][0]["parts"][1]["picture"]["image"] = "data:image/jpeg;base64,AAAA"
    cases["jpeg.json"] = (json.dumps(jpeg), "not a PNG data URI")
    for name, (text, says) in cases.items():
        path = tmp_path / name if text is None else written(name, text)
        with pytest.raises(Exception, match=says) as e:
            files.read_conversation(path)
        assert type(e.value).__name__ == "LoadError" and str(path) in str(e.value)


def test_reading_fuzzed_files_raises_only_the_pack_s_own_error(files, conv, tmp_path):
    good = files.save_conversation(tmp_path / "good.conversation.json", a_conversation(conv)).read_bytes()
    rng = random.Random(99)
    path = tmp_path / "fuzzed.conversation.json"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(good)
        kind = rng.random()
        if kind < 0.3:
            data = data[:rng.randrange(len(data))]
        elif kind < 0.7:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # flip characters inside the JSON text where they keep it parseable more often
            text = data.decode()
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(text))
                text = text[:i] + rng.choice('"{}[],:0aZ\\ ') + text[i + 1:]
            data = bytearray(text.encode())
        path.write_bytes(bytes(data))
        try:
            files.read_conversation(path)
            outcomes["read"] += 1
        except Exception as e:  # noqa: BLE001 - the point: only the pack's LoadError may come out
            assert type(e).__name__ == "LoadError", f"{type(e).__name__}: {e}"
            outcomes["refused"] += 1
    assert outcomes["refused"] > 300, outcomes


def test_save_load_show_nodes(host, pack, conv):
    nodes = pack_module(pack, "nodes.conversation")
    c = a_conversation(conv)
    path = nodes.SaveConversation().save(c, "node test")["result"][0]
    assert path.endswith("beyond_clip_conversations/node test.conversation.json")
    choices = nodes.LoadConversation.INPUT_TYPES()["required"]["conversation_file"][0]
    assert "output/node test.conversation.json" in choices
    assert nodes.LoadConversation.VALIDATE_INPUTS("output/node test.conversation.json") is True
    assert "not in" in nodes.LoadConversation.VALIDATE_INPUTS("output/gone.conversation.json")
    loaded_back = nodes.LoadConversation().load("output/node test.conversation.json")
    assert loaded_back["result"][0].show() == c.show() == loaded_back["ui"]["text"][0]
    shown = nodes.ShowConversation().show(c)
    assert shown["ui"]["text"][0].startswith("User: what is [picture: user, 40x30] this?") and shown["result"][0] is c
    with pytest.raises(ValueError, match="use letters"):
        nodes.SaveConversation().save(c, "../escape")
    stamp = nodes.LoadConversation.IS_CHANGED("output/node test.conversation.json")
    nodes.SaveConversation().save(c.with_turns(conv.user_turn("more")), "node test")
    assert nodes.LoadConversation.IS_CHANGED("output/node test.conversation.json") != stamp


# ---- the shipped workflows, end to end ----------------------------------------------------------------------------

def outputs_of(host, node_id):
    """Every item of every output of a node after a run (list outputs whole), or None if it did not run."""
    executor = host.executor
    if hasattr(executor, "caches"):
        entry = executor.caches.outputs.get(str(node_id))
        return None if entry is None else (entry.outputs if hasattr(entry, "outputs") else entry)
    return executor.outputs.get(str(node_id))


def ran(host, node_id) -> bool:
    """The node produced something (an ExecutionBlocker where it was skipped counts as not having run)."""
    out = outputs_of(host, node_id)
    if out is None:
        return False
    return not all(type(v).__name__ == "ExecutionBlocker" for slot in out for v in slot)


def saved(host, ui):
    return {path.name: path for path in host.saved_images(ui)}


def gill_dialogue_prompt(host, pack, thresholds=(1.0, 1.0, 1.0), forced=(False, True, True)):
    from test_gill import workflow_prompt
    prompt = workflow_prompt(host, pack, "gill_dialogue.json", llm=GILL_LLM)
    turns = [node_of(prompt, "BeyondCLIP_GILLDialogue", k) for k in range(3)]
    for k in range(3):
        prompt[node_of(prompt, "SaveImage", k)]["inputs"]["filename_prefix"] = f"GILL_dialogue_turn{k + 1}"
    for k, node_id in enumerate(turns):
        inputs = prompt[node_id]["inputs"]
        inputs.update(max_new_tokens=8, threshold=thresholds[k])
        if forced[k]:
            inputs.update(FORCE)
    return prompt, turns


def test_workflow_gill_dialogue(host, pack, gill_llm, release, towers):
    write_photos(host_photos(host), 4)
    prompt, (t1, t2, t3) = gill_dialogue_prompt(host, pack)
    sampler = {t: str(int(t) + 1) for t in (t1, t2, t3)}
    pictures = {t: str(int(t) + 3) for t in (t1, t2, t3)}
    forget_everything(host)
    ui = host.run(prompt)
    blocker = host.supports_execution_blocker()

    # turn 1: a question answered in words (ret_scale_factor 1.3 as shipped: the model's own choice) - no picture,
    # and no sampler where ComfyUI can skip it
    reply1 = outputs_of(host, t1)[0][0]
    conversation = outputs_of(host, pictures[t3])[0][0]
    assert "[picture" not in reply1 and conversation.turns[1].pictures == []
    assert ran(host, sampler[t1]) != blocker
    # turn 2: a picture (forced), generated as the decision says at threshold 1; the sampler drew it and Reply
    # Pictures put that very picture into the conversation
    assert "[picture 1]" in outputs_of(host, t2)[0][0] and outputs_of(host, t2)[4] == ["generate"]
    assert ran(host, sampler[t2])
    drawn = outputs_of(host, str(int(t2) + 2))[0][0]
    shown = conversation.turns[3].pictures[0]
    assert shown.origin == "generated" and torch.equal(shown.image, drawn[0])
    # turn 3: the follow-up reads that picture (4 visual tokens) and shows one of its own; nothing was left out
    assert outputs_of(host, t3)[5][0].notes == ()
    assert [t.role for t in conversation.turns] == ["user", "assistant"] * 3
    assert len(conversation.turns[5].pictures) == 1 and not conversation.turns[5].pictures[0].pending
    files = saved(host, ui)
    assert sorted(name.split("_")[2] for name in files) == (["turn2", "turn3"] if blocker else
                                                             ["turn1", "turn2", "turn3"])
    turn3 = next(p for n, p in files.items() if "turn3" in n)
    check_golden_pixels(host, "gill_dialogue.json/turn3", SavedImage(png=b"", pixels=image_bytes(files, "turn3"),
                                                                     path=turn3, ui=ui))
    show_id, save_id = node_of(prompt, "BeyondCLIP_ShowConversation"), node_of(prompt, "BeyondCLIP_SaveConversation")
    assert ui[show_id]["text"][0].startswith("User: What should I cook")
    assert outputs_of(host, save_id)[0][0].endswith("gill_dialogue.conversation.json")

    # a rerun of the unchanged graph generates nothing again
    count = len(list((turn3.parent).glob("GILL_dialogue_*.png")))
    ui_again = host.run(prompt)
    assert {n for n in prompt if ran(host, n)} <= host.cached_nodes()
    assert len(list((turn3.parent).glob("GILL_dialogue_*.png"))) == count and ui_again.keys() <= ui.keys()

    # the conversation changes the picture: turn 3 alone, and turn 3 after another turn-2 picture
    cond3 = outputs_of(host, t3)[1][0][0][0]
    alone = copy.deepcopy(prompt)
    del alone[t3]["inputs"]["conversation"]
    forget_everything(host)
    ui_alone = host.run(alone)
    assert not torch.equal(outputs_of(host, t3)[1][0][0][0], cond3)
    change = pixel_change(image_bytes(saved(host, ui_alone), "turn3"), image_bytes(files, "turn3"))
    print(f"\nGILL dialogue: the conversation changes turn 3's picture by {change:.2f} levels on average")
    assert change > 0.5
    other = copy.deepcopy(prompt)
    other[sampler[t2]]["inputs"]["seed"] += 1
    forget_everything(host)
    host.run(other)
    assert not torch.equal(outputs_of(host, t3)[1][0][0][0], cond3), "turn 2's picture is read by turn 3"

    # turn 2 retrieves instead (threshold 0): its sampler does not run, the retrieved image enters the conversation
    retrieving, _ = gill_dialogue_prompt(host, pack, thresholds=(1.0, 0.0, 1.0))
    forget_everything(host)
    host.run(retrieving)
    assert outputs_of(host, t2)[4] == ["retrieve"] and ran(host, sampler[t2]) != blocker
    shown = outputs_of(host, pictures[t3])[0][0].turns[3].pictures[0]
    assert shown.origin == "retrieved" and torch.equal(shown.image[None], outputs_of(host, t2)[2][0])


def host_photos(host):
    from pathlib import Path
    return Path(host.folder_paths.get_input_directory()) / "gill_photos"


def image_bytes(files, turn):
    path = next(p for n, p in files.items() if turn in n)
    with Image.open(path) as img:
        return img.convert("RGB").tobytes()


def test_workflow_beyond_clip_conversation(host, pack, tiny_llama, mapper_files, adapter_file):
    from test_beyond_clip_workflows import workflow_prompt
    prompt = workflow_prompt(host, pack, "beyond_clip_conversation_sd15.json", arch="sd15", llm=tiny_llama,
                             mapper=mapper_files["sd1"], adapter=adapter_file)
    turns = [node_of(prompt, "BeyondCLIP_Assistant", k) for k in range(3)]
    for t in turns:
        prompt[t]["inputs"]["max_new_tokens"] = 6
    forget_everything(host)
    ui = host.run(prompt)
    blocker = host.supports_execution_blocker()
    routes = [outputs_of(host, t)[3][0] for t in turns]
    assert routes == ["chat", "draw", "draw"]
    assert ran(host, str(int(turns[0]) + 1)) != blocker  # a chat turn runs no sampler where ComfyUI can skip it
    conversation = outputs_of(host, str(int(turns[2]) + 3))[0][0]
    assert [t.role for t in conversation.turns] == ["user", "assistant"] * 3
    assert conversation.turns[1].parts == (outputs_of(host, turns[0])[2][0],)
    drawn = [p for t in conversation.turns for p in t.pictures]
    assert len(drawn) == 2 and not any(p.pending for p in drawn)  # Reply Pictures drew both back in
    files = saved(host, ui)
    assert sorted(n.split("_")[2] for n in files) == (["turn2", "turn3"] if blocker else ["turn1", "turn2", "turn3"])
    assert "with 2 earlier turn(s)" in ui[turns[2]]["text"][0]
    check_golden_pixels(host, "beyond_clip_conversation_sd15.json/turn3", SavedImage(
        png=b"", pixels=image_bytes(files, "turn3"), path=None, ui=ui))

    ui_again = host.run(prompt)
    assert {n for n in prompt if ran(host, n)} <= host.cached_nodes() and ui_again.keys() <= ui.keys()

    # 'Now draw it in a snowstorm' is drawn with the conversation: without it the picture is another one
    positive = outputs_of(host, turns[2])[0][0][0][0]
    alone = copy.deepcopy(prompt)
    del alone[turns[2]]["inputs"]["conversation"]
    forget_everything(host)
    ui_alone = host.run(alone)
    assert not torch.equal(outputs_of(host, turns[2])[0][0][0][0], positive)
    change = pixel_change(image_bytes(saved(host, ui_alone), "turn3"), image_bytes(files, "turn3"))
    print(f"\nBeyond CLIP conversation: the earlier turns change turn 3's picture by {change:.2f} levels on average")
    assert change > 0.5


def test_router_chat_reads_the_earlier_turns(host, pack, tiny_llama, mapper_files, conv):
    llm = pack_module(pack, "loaders.llm").load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama, "fp32")
    mapper = pack_module(pack, "loaders.mappers").load_mapper(host.models_dir / "bridges" / mapper_files["sd1"])
    router = pack_module(pack, "nodes.beyond_clip").ChatOrDrawRouter()
    engine = pack_module(pack, "engine.llm")
    builtin = pack_module(pack, "loaders.routers").BUILTIN
    c = conv.Conversation().with_turns(conv.user_turn("what is a lighthouse?"),
                                       conv.Turn("assistant", ("a tower with a light.",)))
    for template in ("none", "llama-2-chat"):
        out = router.run(llm, mapper, builtin, "How many moons does Mars have?", 6, template, conversation=c)["result"]
        transcript = conv.chat_transcript(c, "How many moons does Mars have?", template)
        expected = conv.chat_answer(engine.chat(llm, transcript, max_new_tokens=6, template="none"), template, True)
        assert out[2] == expected and out[3] == "chat"
        assert out[5].turns[-2:] == (conv.Turn("user", ("How many moons does Mars have?",)),
                                     conv.Turn("assistant", (expected,)))
        # without a conversation the router answers exactly as before
        plain = router.run(llm, mapper, builtin, "How many moons does Mars have?", 6, template)["result"]
        assert plain[2] == engine.chat(llm, "How many moons does Mars have?", max_new_tokens=6, template=template)


def test_a_reply_without_picture_skips_a_sampler_wired_to_it_directly(host, pack, gill_llm, release):
    """Dialogue -> KSampler -> VAE Decode -> Save Image, no Reply Pictures: the conditioning list carries an
    ExecutionBlocker when there is nothing to generate; hosts without one sample zero conditioning instead."""
    prompt = {
        "1": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}},
        "2": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": GILL_LLM, "dtype": "fp32"}},
        "3": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": "gill-tiny"}},
        "4": {"class_type": "BeyondCLIP_GILLDialogue", "inputs": {"llm": ["2", 0], "gill": ["3", 0], "model": ["1", 0],
                                                                 **node_inputs(max_pictures=0)}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 1], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "gill_words_only"}},
        "10": {"class_type": "BeyondCLIP_ShowConversation", "inputs": {"conversation": ["4", 5]}},
    }
    forget_everything(host)
    ui = host.run(prompt)
    assert "User: show me a fox" in ui["10"]["text"][0]
    blocker = host.supports_execution_blocker()
    assert ran(host, "7") != blocker and bool(host.saved_images(ui)) != blocker
    if not blocker:
        assert not outputs_of(host, "4")[1][0][0][0].any()  # zero conditioning


def test_dialogue_shows_progress_and_stops_when_interrupted(host, gill_nodes, gill_llm, loaded):
    import comfy.model_management as mm
    import comfy.utils
    host.progress.clear()
    gill_nodes.GILLDialogue().reply(gill_llm, loaded, **node_inputs(max_new_tokens=6, max_pictures=0))
    assert host.progress[0] == (1, 6) and all(total == 6 for _, total in host.progress)

    def interrupt_at_first_step(value, total, *args, **kwargs):
        mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(interrupt_at_first_step)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            gill_nodes.GILLDialogue().reply(gill_llm, loaded, **node_inputs(max_new_tokens=6, max_pictures=0))
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: host.progress.append((value, total)))
