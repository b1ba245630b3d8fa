"""Grounding DINO folders with seeded random weights in the exact layout of IDEA-Research/grounding-dino-*
(config.json with model_type 'grounding-dino', model.safetensors, the processor files and a BERT-uncased style
WordPiece tokenizer), built locally: nothing can be downloaded here.

- size "tiny": a few layers, widths of 16-32, a 128-pixel input: for tests (a forward takes milliseconds).
- size "full": grounding-dino-tiny's own configuration (Swin-T backbone, BERT-base text encoder, 900 queries,
  800/1333-pixel input) with random weights: for benchmarks (the same work per picture as the real model).

The tokenizer keeps the ids Grounding DINO relies on ([CLS] 101, [SEP] 102, '.' 1012, '?' 1029); its words are a
small English list plus single letters and '##' letters, so any ASCII text tokenizes. The detections of a random
model mean nothing; the files, shapes and code paths are the real ones.
"""
import logging
from pathlib import Path

import torch

WORDS = """
a an the and his her their of on in with at by to from for near under over behind next man men woman women
person people boy girl child children baby dog dogs cat cats horse bird car bike bicycle tree trees house table
chair sofa cup bowl ball hat shirt dress red blue green yellow white black brown grey gray small big old young
sitting standing walking running holding riding playing photo picture painting head face hand street park beach
field room kitchen
""".split()  # noqa: SIM905  (a word list reads better as text)


def bert_vocab(vocab_size: int = 1200):
    """A WordPiece vocabulary with BERT-uncased's special ids."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list("!\"#$%&'()*+,-/:;=@[\\]^_`{|}~") + [str(d) for d in range(10)] + \
        [chr(c) for c in range(97, 123)] + ["##" + chr(c) for c in range(97, 123)] + ["##" + str(d) for d in range(10)]
    words = [w for w in dict.fromkeys(WORDS) if w not in pieces]
    fill = iter(pieces + words)
    while len(vocab) < 1029 + 1 or len(vocab) < vocab_size:
        n = len(vocab)
        if n == 1012:
            vocab.append(".")
        elif n == 1029:
            vocab.append("?")
        elif n < 1012:
            vocab.append(f"[unused{n}]")
        else:
            vocab.append(next(fill, f"[unused{n}]"))
    rest = [p for p in fill]
    return vocab + rest


def write_grounding_dino_folder(folder, size: str = "tiny", seed: int = 0) -> Path:
    import transformers
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )
    from transformers.models.grounding_dino.image_processing_grounding_dino import GroundingDinoImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = bert_vocab(30522 if size == "full" else 1200)
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:  # transformers 4 builds a BERT tokenizer from a vocab.txt only
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    if size == "full":  # grounding-dino-tiny's configuration
        config = GroundingDinoConfig(
            backbone_config=dict(model_type="swin", out_indices=[2, 3, 4], image_size=224, window_size=7,
                                 embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
            text_config=dict(model_type="bert", vocab_size=len(vocab)))
        image_processor = GroundingDinoImageProcessor()
    elif size == "tiny":
        config = GroundingDinoConfig(
            backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                 window_size=4, image_size=64, out_indices=[2, 3, 4]),
            text_config=dict(model_type="bert", vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=256),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=30, max_text_len=256)
        image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 256})
    else:
        raise ValueError(f"unknown size {size!r}: 'tiny' or 'full'")
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    # transformers lists every layer it would not shard when saving (a long warning that says nothing here)
    quiet = logging.getLogger("transformers.distributed.tensor_parallel")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model.save_pretrained(str(folder))
    finally:
        quiet.setLevel(level)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder
