"""bridges/prompt_weights.py and bridges/encoder_record.py without ComfyUI: the weighting formula, token weights
from character spans, and a seeded fuzz of the text-encoder record a bridge file carries."""
import random

import pytest
import torch


def test_apply_moves_only_weighted_rows_by_comfyuis_formula(bridges):
    weights = bridges("prompt_weights")
    tokens, empty = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    out = weights.apply(tokens, empty, [1.0, 1.5, 1.0, 0.5])
    assert torch.equal(out[:, [0, 2, 4, 5]], tokens[:, [0, 2, 4, 5]])
    assert torch.allclose(out[:, 1], empty[:, 1] + 1.5 * (tokens[:, 1] - empty[:, 1]))
    assert torch.allclose(out[:, 3], empty[:, 3] + 0.5 * (tokens[:, 3] - empty[:, 3]))


def test_token_weights_follow_the_first_non_space_character(bridges):
    weights = bridges("prompt_weights")
    text, chars = weights.plain_text([("a ", 1.0), ("red", 1.3), (" fox", 1.0)])
    assert text == "a red fox"
    # BOS (no span), "a", " red" (the space belongs to the previous segment), " fox"
    assert weights.token_weights([(0, 0), (0, 1), (1, 5), (5, 9)], chars, text) == [1.0, 1.0, 1.3, 1.0]


def test_encoder_record_fuzz_only_value_errors(bridges):
    records = bridges("encoder_record")
    good = records.EncoderRecord("x", "llama", 64, -1, "none",
                                 records.encode_signature(torch.randn(64)), "abc").to_dict()
    rng = random.Random(3)
    junk = [None, 1, -1.5, "", "%%", "AAAA", "QUFB", [], {}, "x" * 50]
    for _ in range(300):
        d = dict(good)
        for _ in range(rng.randint(1, 3)):
            action = rng.random()
            key = rng.choice(list(good) + ["extra"])
            if action < 0.3:
                d.pop(key, None)
            else:
                d[key] = rng.choice(junk)
        try:
            record = records.EncoderRecord.from_dict(d)
            records.similarity(record.signature, good["signature"])
        except (ValueError, TypeError):
            pass


def test_same_model_and_other_model_signatures(bridges):
    records = bridges("encoder_record")
    rows = torch.randn(16, 4096)
    same = records.encode_signature(records.signature_values(rows + 0.05 * torch.randn_like(rows)))  # quantized
    base = records.encode_signature(records.signature_values(rows))
    other = records.encode_signature(records.signature_values(torch.randn(16, 4096)))
    assert records.similarity(base, same) > records.SAME_MODEL > records.similarity(base, other)
    with pytest.raises(ValueError):
        records.decode_signature("not base64!")
