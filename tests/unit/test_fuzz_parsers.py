"""Seeded fuzzing of the parsers of user text in bridges/ (no ComfyUI): SEED codes typed as text, MUMU prompts and
image names, GILL prompts, prompt templates, the router's words, and pictures as tensors. Thousands of cases from a
fixed seed within a time budget; only the pack's own errors (PackError subclasses) may come out.
tests/test_fuzz_files.py fuzzes the parsers of files the same way."""
import random

import pytest
import torch
from fuzzing import check, fuzz, mutate_text


@pytest.fixture(scope="module")
def b(bridges):
    class Namespace:
        errors = bridges("errors")
        seed = bridges("seed")
        mumu = bridges("mumu")
        gill = bridges("gill")
        llm_text = bridges("llm_text")
        router = bridges("router")
        pixels = bridges("pixels")
    return Namespace


def codes_text(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 3)):
        codes = [str(rng.randrange(8192)) for _ in range(32)]
        sep = rng.choice([" ", ",", ", ", ";", "\t", "\uff0c"])
        line = sep.join(codes)
        lines.append(rng.choice([line, f"[{line}]", f"({line})", f"  {line}  "]))
    text = rng.choice(["\n", "\r\n", "\n\n"]).join(lines)
    return mutate_text(rng, text) if rng.random() < 0.85 else text


def test_fuzz_seed_codes_text(b):
    def parse(text):
        codes = b.seed.parse_codes(text)
        assert codes.dtype == torch.int64 and codes.shape[1] == 32 and int(codes.min()) >= 0
        b.seed.check_codes(codes, b.seed.SeedConfig())  # what the de-tokenizer node does next
    check(fuzz("SEED codes text", parse, codes_text, b.errors.PackError))


PROMPTS = ["a <image> man and his <image> dog", "a <man> man and his <dog> dog in <style> style", "just words",
           "<image>", "a <man> x <man> in <image>", "x < y and y > z", ""]
NAMES = ["", "", "man", "dog", "style", "image", "a b", "x.y", "<man>", "\u4e2d", "-_-"]


def mumu_case(rng: random.Random):
    text = mutate_text(rng, rng.choice(PROMPTS)) if rng.random() < 0.9 else rng.choice(PROMPTS)
    names = [rng.choice(NAMES) if rng.random() < 0.8 else mutate_text(rng, "man") for _ in range(rng.randint(0, 4))]
    return text, names


def test_fuzz_mumu_prompts_and_image_names(b):
    def parse(case):
        text, names = case
        segments = b.mumu.bind_placeholders(text, names)
        assert all(isinstance(s, str) or 0 <= s < len(names) for s in segments)
    check(fuzz("MUMU prompt + image names", parse, mumu_case, b.errors.PackError))
    check(fuzz("MUMU image name", b.mumu.check_image_name, lambda rng: mutate_text(rng, rng.choice(NAMES)),
               b.errors.PackError))


def test_fuzz_gill_prompts_and_templates(b):
    def split(text):
        parts = b.gill.split_prompt(text)
        assert all(isinstance(p, int) or p.strip() == p and p for p in parts)
    check(fuzz("GILL prompt", split, lambda rng: mutate_text(rng, "Q: a <image> of a fox\nA: <image> red"),
               b.errors.PackError))

    def template(case):
        text, name = case
        b.llm_text.apply_template(text, name)
    check(fuzz("LLM prompt template", template,
               lambda rng: (mutate_text(rng, "draw a fox"), rng.choice(list(b.llm_text.TEMPLATES) + ["", "chatml"])),
               b.errors.PackError))


def test_fuzz_router_words(b):
    router = b.router.NaiveBayesRouter().fit(["draw a red fox", "what is the capital of france", "paint a lake"],
                                             ["draw", "chat", "draw"])

    def route(text):
        label, p = router.predict(text)
        assert label in ("chat", "draw") and 0.0 <= p <= 1.0
    check(fuzz("router words", route, lambda rng: mutate_text(rng, "draw me a castle, please"), b.errors.PackError))


def picture_case(rng: random.Random):
    shape = [rng.choice([0, 1, 2, 3]), rng.choice([0, 1, 5, 17]), rng.choice([0, 1, 6, 13]),
             rng.choice([1, 2, 3, 4, 5])]
    if rng.random() < 0.1:
        shape = shape[rng.randint(0, 2):]
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.float64, torch.uint8, torch.bool,
                        torch.complex64])
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31))) * rng.choice([1, 3, -2])
    x = x.to(dtype) if not dtype.is_complex else torch.complex(x, x)
    if x.numel() and x.is_floating_point() and rng.random() < 0.3:
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    return x


def test_fuzz_pictures_as_every_family_reads_them(b):
    def read(images):
        b.gill.squash_224(images, size=8)
        b.seed.preprocess(images, 8)
        for picture in (images if images.ndim == 4 else [images]):
            b.mumu.prepare_image(picture, 8, (0.5,) * 3, (0.5,) * 3)
    check(fuzz("pictures (GILL, SEED, MUMU)", read, picture_case, b.errors.PackError, min_cases=300))
