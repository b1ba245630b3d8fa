"""Router: naive Bayes maths, held-out accuracy on the shipped instructions, JSON round trip."""
import csv
import json
import random
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "data" / "router_instructions.tsv"


@pytest.fixture(scope="module")
def router_mod(bridges):
    return bridges("router")


@pytest.fixture(scope="module")
def rows():
    with open(DATA, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        assert next(reader) == ["label", "text"]
        return [tuple(row) for row in reader]


def split(rows, test_fraction=0.25, seed=0):
    """Deterministic split, stratified by label."""
    train, test = [], []
    for label in sorted({label for label, _ in rows}):
        group = [r for r in rows if r[0] == label]
        random.Random(seed).shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    return train, test


def fit(router_mod, rows, **kwargs):
    return router_mod.NaiveBayesRouter(**kwargs).fit([t for _, t in rows], [label for label, _ in rows])


def test_dataset_shape(rows):
    assert len(rows) >= 300
    assert {label for label, _ in rows} == {"chat", "draw"}
    assert all(text.strip() for _, text in rows)
    texts = [text.lower() for _, text in rows]
    assert len(set(texts)) == len(texts)
    counts = {label: sum(1 for row_label, _ in rows if row_label == label) for label in ("chat", "draw")}
    assert min(counts.values()) >= 0.4 * len(rows)


def test_laplace_smoothing_by_hand(router_mod):
    # vocab {a, b, c}; "x" saw a, b; "y" saw a, c. P(b|x) = (1+1)/(2+3), P(b|y) = (0+1)/(2+3).
    router = router_mod.NaiveBayesRouter(alpha=1.0, bigrams=False).fit(["a b", "a c"], ["x", "y"])
    proba = router.predict_proba("b")
    assert proba["x"] == pytest.approx(2 / 3) and proba["y"] == pytest.approx(1 / 3)
    # Unknown words carry no evidence: priors (here equal) remain.
    assert router.predict_proba("zzz unseen") == pytest.approx({"x": 0.5, "y": 0.5})
    # Repeated evidence multiplies: (0.4 / 0.2) ** 3 = 8 to 1.
    assert router.predict_proba("b b b")["x"] == pytest.approx(8 / 9)


def test_labels_are_not_hard_coded(router_mod):
    router = router_mod.NaiveBayesRouter().fit(
        ["buy cheap pills now", "meeting moved to noon", "win a free cruise", "lunch at noon?",
         "the cat sat", "a dog ran"], ["spam", "ham", "spam", "ham", "story", "story"])
    assert router.labels == ["ham", "spam", "story"]
    assert router.predict("cheap cruise pills")[0] == "spam"
    assert sum(router.predict_proba("noon meeting").values()) == pytest.approx(1.0)


def test_held_out_accuracy(router_mod, rows):
    train, test = split(rows)
    router = fit(router_mod, train)
    correct = sum(router.predict(text)[0] == label for label, text in test)
    accuracy = correct / len(test)
    print(f"router held-out accuracy: {correct}/{len(test)} = {accuracy:.3f}")
    assert accuracy >= 0.90


@pytest.mark.parametrize("text, expected", [
    ("draw a cat sitting on a red sofa", "draw"),
    ("Generate an image of a lighthouse at dawn", "draw"),
    ("a castle on a hill at sunset, oil painting", "draw"),
    ("please paint me a picture of a sleepy dog", "draw"),
    ("What is the capital of France?", "chat"),
    ("how do I crop a photo?", "chat"),
    ("explain what impressionism is", "chat"),
    ("write a python function that adds two numbers", "chat"),
])
def test_obvious_examples(router_mod, rows, text, expected):
    label, probability = fit(router_mod, rows).predict(text)
    assert label == expected
    assert 0.5 <= probability <= 1.0


def test_json_round_trip(router_mod, rows):
    router = fit(router_mod, rows)
    data = json.loads(json.dumps(router.to_dict()))
    assert data["format"] and data["version"] == 1
    restored = router_mod.NaiveBayesRouter.from_dict(data)
    for text in ["draw a fox", "what is a fox?", "", "completely unseen zxqv words"]:
        assert restored.predict_proba(text) == router.predict_proba(text)
        assert restored.predict(text) == router.predict(text)


def test_from_dict_rejects_wrong_data(router_mod, rows):
    good = fit(router_mod, rows).to_dict()
    with pytest.raises(ValueError, match="format"):
        router_mod.NaiveBayesRouter.from_dict({**good, "format": "some_other_model"})
    with pytest.raises(ValueError, match="version"):
        router_mod.NaiveBayesRouter.from_dict({**good, "version": 99})
    with pytest.raises(ValueError, match="token_counts"):
        router_mod.NaiveBayesRouter.from_dict({k: v for k, v in good.items() if k != "token_counts"})
    with pytest.raises(ValueError, match="alpha"):
        router_mod.NaiveBayesRouter.from_dict({**good, "alpha": "one"})
    with pytest.raises(ValueError, match="dict"):
        router_mod.NaiveBayesRouter.from_dict(["not", "a", "dict"])


def test_untrained_router_says_so(router_mod):
    with pytest.raises(RuntimeError, match="not trained"):
        router_mod.NaiveBayesRouter().predict("hello")
