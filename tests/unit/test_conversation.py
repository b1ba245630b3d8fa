"""The conversation value (bridges/conversation.py): turns of words and pictures, GILL's 'Q: ... A:' prompt, text
transcripts, the drawing text, and the strict reading of its plain-data form (fuzzed)."""
import copy
import random

import pytest
import torch


@pytest.fixture(scope="module")
def conv(bridges):
    return bridges("conversation")


def image(h=8, w=6, c=3, seed=0):
    return torch.rand(1, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_user_turn_places_pictures(conv):
    two = torch.cat([image(seed=1), image(seed=2)])
    turn = conv.user_turn("compare <image> and <image> please", two)
    assert [type(p).__name__ for p in turn.parts] == ["str", "Picture", "str", "Picture", "str"]
    assert turn.parts[0] == "compare" and turn.parts[2] == "and" and turn.parts[4] == "please"
    assert torch.equal(turn.parts[1].image, two[0]) and torch.equal(turn.parts[3].image, two[1])
    # without placeholders the pictures come first, as GILL's demo shows an uploaded picture before the question
    turn = conv.user_turn("what is this?", image(c=4))
    assert isinstance(turn.parts[0], conv.Picture) and turn.parts[1] == "what is this?"
    assert turn.parts[0].image.shape == (8, 6, 3) and turn.parts[0].origin == "user"  # alpha dropped


@pytest.mark.parametrize("text,images,says", [
    ("", None, "the turn is empty"),
    ("   <image>  ", image(), "the turn is empty"),
    ("a <image> b <image>", image(), "2 <image> placeholder.*1 picture"),
    ("look <image>", None, "1 <image> placeholder.*0 picture"),
    ("look", image(c=1), r"shape \(8, 6, 1\).*RGB"),
    ("look", image().mul(float("nan")), "NaN"),
    ("look", torch.zeros(1, 0, 4, 3), "shape"),
])
def test_bad_turns_are_refused_by_what_is_wrong(conv, text, images, says):
    with pytest.raises(conv.ConversationError, match=says):
        conv.user_turn(text, images)


def sample(conv):
    """Two exchanges: a question answered in words, a request answered with a retrieved and a pending picture."""
    c = conv.Conversation()
    c = c.with_turns(conv.user_turn("what is a corgi?"), conv.Turn(conv.ASSISTANT, ("a small dog.",)))
    retrieved = conv.Picture(image()[0], "retrieved", "corgi.png (0.81)")
    c = c.with_turns(conv.user_turn("show me <image> one like this", image(seed=3)),
                     conv.Turn(conv.ASSISTANT, ("here:", retrieved, "and", conv.Picture(None, "generated"))))
    return c


def test_gill_prompt_is_the_reference_dialogue_format(conv):
    c = sample(conv)
    blocks = conv.gill_blocks(c, conv.user_turn("make it run"))
    texts = [[p if isinstance(p, str) else ("pending" if p.pending else p.origin) for p in b] for b in blocks]
    assert texts == [
        ["Q: what is a corgi?\nA:", " a small dog.\n"],
        ["Q: show me", "user", "one like this\nA:", " here:", "retrieved", " and", "pending", "\n"],
        ["Q: make it run\nA:"],
    ]
    # a turn that opens with a picture: 'Q: ' goes with its first words
    assert [p if isinstance(p, str) else "pic" for p in conv.gill_blocks(conv.Conversation(), conv.user_turn(
        "what is this?", image()))[0]] == ["pic", "Q: what is this?\nA:"]


def test_pending_pictures_are_drawn_into_the_last_turn_only(conv):
    c = sample(conv)
    assert c.pending() == [(3, 3)]
    with pytest.raises(conv.ConversationError, match="waits for 1 generated picture.*2 were given"):
        c.with_generated([image()[0], image()[0]])
    drawn = c.with_generated([image(seed=9)[0]])
    assert drawn.pending() == [] and torch.equal(drawn.turns[3].parts[3].image, image(seed=9)[0])
    assert c.pending() == [(3, 3)], "values are immutable: the earlier conversation still waits"
    later = drawn.with_turns(conv.user_turn("and now?"), conv.Turn(conv.ASSISTANT, (conv.Picture(None, "generated"),)))
    assert later.pending() == [(5, 0)]
    assert "[picture: retrieved, 6x8; corgi.png (0.81)]" in drawn.show()


def test_text_transcripts(conv):
    c = sample(conv)
    assert conv.chat_transcript(conv.Conversation(), "hi", "none") is None
    assert conv.chat_transcript(c, "and then?", "none") == (
        "Q: what is a corgi?\nA: a small dog.\nQ: show me (picture) one like this\n"
        "A: here: (picture) and (picture)\nQ: and then?\nA:")
    assert conv.chat_transcript(c, "and then?", "none", skip=1).startswith("Q: show me")
    assert conv.chat_transcript(c, "and then?", "none", skip=2) is None
    assert conv.chat_transcript(c, "and then?", "llama-2-chat") == (
        "[INST] what is a corgi? [/INST] a small dog. </s><s>[INST] show me (picture) one like this [/INST] here: "
        "(picture) and (picture) </s><s>[INST] and then? [/INST]")
    assert conv.chat_answer(" it runs.\nQ: what else?\nA: more", "none", True) == "it runs."
    assert conv.chat_answer(" it runs.\nQ: x", "none", False) == "it runs.\nQ: x"


def test_drawing_text_keeps_the_newest_user_turns_that_fit(conv):
    c = sample(conv)
    assert conv.drawing_text(c, "make it run", lambda t: True) == (
        "what is a corgi?\nshow me one like this\nmake it run", 2)
    assert conv.drawing_text(c, "make it run", lambda t: len(t) <= 40) == ("show me one like this\nmake it run", 1)
    assert conv.drawing_text(c, " make it run ", lambda t: False) == (" make it run ", 0)  # as without a conversation
    assert conv.drawing_text(conv.Conversation(), "a cat", lambda t: True) == ("a cat", 0)


def store(conv):
    pictures = {}

    def ref(picture):
        pictures[f"p{len(pictures)}"] = picture.image
        return f"p{len(pictures) - 1}"

    def read(ref, where):
        if ref not in pictures:
            raise conv.ConversationError(f"{where}: no picture {ref!r}")
        return pictures[ref]
    return ref, read


def test_plain_data_round_trip(conv):
    c = sample(conv)
    ref, read = store(conv)
    data = conv.to_data(c, ref)
    back = conv.from_data(copy.deepcopy(data), read)
    assert [t.role for t in back.turns] == [t.role for t in c.turns]
    for a, b in zip(c.turns, back.turns):
        for x, y in zip(a.parts, b.parts):
            if isinstance(x, str):
                assert x == y
            else:
                assert (x.origin, x.note, x.pending) == (y.origin, y.note, y.pending)
                assert x.pending or torch.equal(x.image, y.image)


@pytest.mark.parametrize("edit,says", [
    (lambda d: d.update(format="comfyui.workflow"), "not a Beyond CLIP conversation"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(extra=1), "unexpected"),
    (lambda d: d["turns"][0].update(role="system"), "role 'system'"),
    (lambda d: d["turns"][0]["parts"].append({"text": 3}), "must be a str"),
    (lambda d: d["turns"][2]["parts"][1]["picture"].update(origin="drawn"), "origin 'drawn'"),
    (lambda d: d["turns"][2]["parts"][1]["picture"].update(image=None), "only a generated picture"),
    (lambda d: d["turns"][3]["parts"][1]["picture"].pop("note"), "missing"),
    (lambda d: d["turns"].append("hello"), "must be a dict"),
])
def test_plain_data_is_read_strictly(conv, edit, says):
    ref, read = store(conv)
    data = conv.to_data(sample(conv), ref)
    edit(data)
    with pytest.raises(conv.ConversationError, match=says):
        conv.from_data(data, read)


def _mutate(value, rng):
    """One random change somewhere inside a JSON-like value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        choice = rng.random()
        if choice < 0.2:
            del value[key]
        elif choice < 0.3:
            value[key + "_x"] = value[key]
        elif choice < 0.6 or not isinstance(value[key], (dict, list)):
            value[key] = rng.choice([None, 0, 1.5, True, "", "x", [], {}, [1], {"a": 1}, -1, "user", "generated"])
        else:
            _mutate(value[key], rng)
    elif isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        if rng.random() < 0.3:
            value.pop(i)
        elif isinstance(value[i], (dict, list)) and rng.random() < 0.7:
            _mutate(value[i], rng)
        else:
            value[i] = rng.choice([None, 3, "text", {"text": "t"}, {"picture": {}}, [[[]]]])
    return value


def test_reading_fuzzed_data_raises_only_the_pack_s_own_error(conv):
    ref, read = store(conv)
    good = conv.to_data(sample(conv), ref)
    rng = random.Random(1234)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(1500):
        data = copy.deepcopy(good)
        for _ in range(rng.randint(1, 4)):
            data = _mutate(data, rng)
        try:
            conv.from_data(data, read)
            outcomes["read"] += 1
        except conv.ConversationError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 1000 and outcomes["read"] > 0, outcomes
