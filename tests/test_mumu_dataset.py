"""MUMU's bootstrapped dataset: Grounding DINO turns captioned pictures into prompts with crops before their words.

The paper's rules are checked on constructed detections (a random tiny detector finds nothing meaningful); the
builder runs the real transformers Grounding DINO (a small one built from its config, BERT tokenizer built here)
on real picture files, and its dataset is read by the pack's own MUMU trainers. Determinism: byte-identical
rebuilds, incremental adds, interrupts and two processes merging their parts all give what one clean build gives.
"""
import copy
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PACK_DIR, SavedImage, forget_everything, pack_module, pixel_change

CAPTIONS = ["a man and his dog on a red sofa", "a woman holding a cup", "two dogs in a park",
            "a girl riding a horse near a house", "a black cat on a table", "a boy playing with a ball",
            "a man with a hat", "a woman and a child"]
DETECTOR = "tiny-grounding-dino"
if int(__import__("transformers").__version__.split(".")[0]) < 5:
    pytest.skip("Build MUMU Dataset needs transformers 5 (Load Grounding DINO says so by name); CI runs these tests "
                "on the newest release", allow_module_level=True)


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def rules(pack):
    return pack_module(pack, "bridges.mumu_dataset")


@pytest.fixture(scope="module")
def files(pack):
    return pack_module(pack, "loaders.mumu_dataset")


@pytest.fixture(scope="module")
def engine(pack):
    return pack_module(pack, "engine.mumu_dataset")


@pytest.fixture(scope="module")
def detector_dir(host, pack):
    """models/grounding-dino/tiny-grounding-dino in the official layout (random weights, local tokenizer)."""
    host.add_models_dir(host.models_dir, ["grounding-dino"])
    folder = host.models_dir / "grounding-dino" / DETECTOR
    if not (folder / "config.json").is_file():
        pack_module(pack, "headless.tiny_grounding_dino").write_grounding_dino_folder(folder)
    return folder


@pytest.fixture(scope="module")
def detector(pack, detector_dir):
    return pack_module(pack, "loaders.grounding_dino").load_grounding_dino(DETECTOR)


def input_dir(host) -> Path:
    return Path(host.folder_paths.get_input_directory())


def make_pictures(folder: Path, captions, size=(640, 480), offset=0):
    """Distinct pictures (shapes on a coloured ground) with same-name .txt captions."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        k = i + offset
        picture = Image.new("RGB", size, (30 + 23 * k % 200, 90 + 37 * k % 150, 200 - 17 * k % 180))
        draw = ImageDraw.Draw(picture)
        draw.ellipse([40 + 9 * k, 30 + 5 * k, size[0] - 60, size[1] - 40], fill=(220, 60 + 11 * k % 190, 40))
        draw.rectangle([size[0] // 3, size[1] // 4, size[0] // 3 + 80, size[1] // 4 + 120], fill=(20, 20, 20 + 9 * k))
        picture.save(folder / f"picture_{k:02d}.png")
        (folder / f"picture_{k:02d}.txt").write_text(caption + "\n")
    return folder


def settings(rules, **kw):
    # thresholds at which the random tiny detector grounds boxes to words (the paper's size rules still apply)
    return rules.Settings(**{"box_threshold": 0.3, "text_threshold": 0.25, **kw})


def snapshot(folder: Path) -> dict:
    """Every file of a dataset (not its .build work files), by path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".build" not in p.relative_to(folder).parts}


def manifest(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ the paper's rules, constructed

def det(rules, box, score, caption, word, nth=0):
    start = [i for i in range(len(caption)) if caption.startswith(word, i)][nth]
    return rules.Detection(box=box, score=score, span=(start, start + len(word)), at=start, phrase=word)


def test_crop_size_rules_at_and_around_the_limits(rules):
    r = rules.Rules()
    # 150x150 px: kept; one pixel less area, or a 140 px box: dropped
    assert rules.size_rule((0, 0, 150, 150), 1000, 1000, r) is None
    assert rules.size_rule((10, 10, 160, 159), 1000, 1000, r) == "under_min_area"  # 150x149
    assert rules.size_rule((0, 0, 140, 140), 1000, 1000, r) == "under_min_area"
    # exactly 75 % of a 200x200 picture (200x150): kept; 76 % (200x152): dropped
    assert rules.size_rule((0, 0, 200, 150), 200, 200, r) is None
    assert rules.size_rule((0, 0, 200, 152), 200, 200, r) == "over_max_fraction"
    # area, as the paper says ("total area less than 150x150"): a long thin box of 300x80 = 24000 px is kept
    assert rules.size_rule((0, 0, 300, 80), 1000, 1000, r) is None
    # boxes are rounded to pixels and clipped to the picture before the rules
    assert rules.pixel_box((-5.2, 10.4, 150.5, 2000.0), 400, 300) == (0, 10, 150, 300)
    caption = "a man and a dog"
    kept, dropped = rules.choose_crops([det(rules, (0, 0, 150, 150), 0.9, caption, "man"),
                                        det(rules, (0, 0, 140, 140), 0.95, caption, "dog")], 400, 400, r)
    assert [d.phrase for d, _ in kept] == ["man"] and [(d.phrase, why) for d, _, why in dropped] == [
        ("dog", "under_min_area")]


def test_at_most_three_crops_by_score_one_per_phrase(rules):
    r = rules.Rules()
    caption = "a man, a dog, a cat and a horse on a sofa"
    box = (0, 0, 200, 200)
    found = [det(rules, box, 0.50, caption, "man"), det(rules, box, 0.90, caption, "dog"),
             det(rules, box, 0.70, caption, "cat"), det(rules, box, 0.60, caption, "horse"),
             det(rules, (10, 10, 210, 210), 0.80, caption, "dog"),  # the same words again: a worse box
             det(rules, box, 0.99, caption, "a")]  # function words only
    kept, dropped = rules.choose_crops(found, 800, 800, r)
    assert [d.phrase for d, _ in kept] == ["dog", "cat", "horse"]  # the best three, in caption order
    why = {(d.phrase, d.score): rule for d, _, rule in dropped}
    assert why == {("man", 0.5): "over_3_per_prompt", ("dog", 0.8): "words_already_have_a_crop",
                   ("a", 0.99): "no_content_word"}
    # equal scores: the earlier words first
    tie = [det(rules, box, 0.5, caption, w) for w in ("horse", "cat", "dog", "man")]
    assert [d.phrase for d, _ in rules.choose_crops(tie, 800, 800, r)[0]] == ["man", "dog", "cat"]


def test_grounding_turns_token_scores_into_phrases_and_placements(rules):
    caption = "a man and his black dog"
    offsets = [(0, 0), (0, 1), (2, 5), (6, 9), (10, 13), (14, 19), (20, 23), (24, 25), (0, 0)]  # ... "." [SEP]
    probs = torch.full((5, 9), 0.05)
    probs[0, 2] = 0.9  # "man"
    probs[1, 4:7] = torch.tensor([0.5, 0.8, 0.95])  # "his black dog"
    probs[2, 0], probs[2, 7], probs[2, 8] = 0.99, 0.99, 0.99  # special tokens and the '.' only: no words
    probs[3, 2] = 0.3  # below the box threshold
    probs[4, 6] = 0.6  # "dog" alone, but the text threshold is above it
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 5)
    found = rules.ground(probs, boxes, offsets, caption, 200, 100, box_threshold=0.35, text_threshold=0.25)
    assert [(d.phrase, d.span, d.at) for d in found] == [("man", (2, 5), 2), ("his black dog", (10, 23), 14),
                                                          ("dog", (20, 23), 20)]
    assert found[0].box == (50.0, 25.0, 150.0, 75.0) and found[1].score == pytest.approx(0.95)
    assert rules.ground(probs, boxes, offsets, caption, 200, 100, 0.35, 0.7)[1].phrase == "black dog"
    # a word piece widens to its whole word ("dog" + "##s" scored on "dog" only)
    offsets2 = [(0, 0), (0, 3), (3, 4), (0, 0)]
    p2 = torch.tensor([[0.05, 0.9, 0.1, 0.05]])
    assert rules.ground(p2, boxes[:1], offsets2, "dogs", 10, 10, 0.35, 0.25)[0].phrase == "dogs"


def test_prompt_has_named_placeholders_the_encoder_binds(rules, pack):
    mumu = pack_module(pack, "bridges.mumu")
    caption = "a man and his dog near a house"
    found = [det(rules, (0, 0, 300, 300), 0.9, caption, "man"), det(rules, (300, 0, 600, 300), 0.8, caption, "dog"),
             det(rules, (0, 300, 300, 600), 0.7, caption, "house")]
    s = rules.Settings(rules=rules.Rules(head_rate=0.0, augment_rate=0.0, control_rate=1.0))
    plan = rules.plan_picture(found, 800, 800, caption, "pics/a.png", s, find_head=None)
    assert plan.prompt == "<canny> a <man> man and his <dog> dog near a <house> house"
    names = [i.name for i in plan.images]
    assert names == ["canny", "man", "dog", "house"] and plan.images[0].rule == "control_canny"
    assert plan.stage2 == "man"  # a person crop is stage 2's crop even when another scores better
    segments = mumu.bind_placeholders(plan.prompt, names)
    assert [s for s in segments if isinstance(s, int)] == [0, 1, 2, 3]
    assert rules.only_placeholder(plan.prompt, "man") == "a <man> man and his dog near a house"
    # names: last content word, ASCII, unique, never 'image'
    assert rules.placeholder_name("his black dog", set()) == "dog"
    assert rules.placeholder_name("dog", {"dog", "dog_2"}) == "dog_3"
    assert rules.placeholder_name("café", set()) == "cafe" and rules.placeholder_name("image", set()) == "image_crop"
    assert rules.placeholder_name("東京", set()) == "crop"


def test_head_swap_augmentation_and_control_rates_over_many_pictures(rules):
    caption = "a man on a horse"
    found = [det(rules, (0, 0, 400, 400), 0.9, caption, "man"), det(rules, (400, 0, 800, 400), 0.8, caption, "horse")]
    looked = []

    def find_head(box):
        looked.append(box)
        return [rules.Detection(box=(50, 50, 250, 250), score=0.8, span=(0, 4), at=0, phrase="head")]

    s = rules.Settings(seed=7)
    plans = [rules.plan_picture(found, 800, 800, caption, f"photos/{i:05d}.jpg", s, find_head) for i in range(3000)]
    man = [p.images[-2] for p in plans]
    heads = sum(i.rule == "head" for i in man) / len(plans)
    augmented = sum(i.augment is not None for p in plans for i in p.images if i.box is not None) / (2 * len(plans))
    control = sum(p.images[0].rule == "control_canny" for p in plans) / len(plans)
    print(f"\nover 3000 pictures: head swaps {heads:.3f}, augmented crops {augmented:.3f}, control images "
          f"{control:.3f}")
    # binomial standard deviations: ~0.008, ~0.005, ~0.008; 4 of them either side
    assert abs(heads - 0.7) < 0.035 and abs(augmented - 0.2) < 0.02 and abs(control - 0.3) < 0.035
    assert len(looked) == sum(i.rule == "head" for i in man)  # the detector runs only for drawn person crops
    assert all(i.box == (50, 50, 250, 250) and i.person_box == (0, 0, 400, 400) for i in man if i.rule == "head")
    assert all(p.images[-1].rule == "object" for p in plans)  # a horse is never swapped
    # the draws depend on (seed, picture) only: the same again, in any order; another seed moves them
    again = [rules.plan_picture(found, 800, 800, caption, f"photos/{i:05d}.jpg", s, find_head)
             for i in reversed(range(3000))][::-1]
    assert [p.prompt for p in again] == [p.prompt for p in plans]
    assert [p.images[-2].rule for p in again] == [i.rule for i in man]
    other = [rules.plan_picture(found, 800, 800, caption, f"photos/{i:05d}.jpg", rules.Settings(seed=8), find_head)
             for i in range(300)]
    assert [p.images[-2].rule for p in other] != [i.rule for i in man[:300]]


def test_head_swap_falls_back_to_the_person_crop(rules):
    caption = "a woman"
    found = [det(rules, (100, 100, 500, 500), 0.9, caption, "woman")]
    always = rules.Settings(rules=rules.Rules(head_rate=1.0, control_rate=0.0, augment_rate=0.0))

    def plan(heads):
        return rules.plan_picture(found, 800, 800, caption, "k", always, lambda box: heads).images[0]

    none = plan([])
    assert none.rule == "person_head_not_found" and none.box == (100, 100, 500, 500)
    small = plan([rules.Detection(box=(120, 120, 260, 260), score=0.9, span=(0, 4), at=0, phrase="head")])
    assert small.rule == "person_head_too_small" and small.box == (100, 100, 500, 500)  # 140x140: under 150x150
    best = plan([rules.Detection(box=(90, 90, 300, 300), score=0.5, span=(0, 4), at=0, phrase="head"),
                 rules.Detection(box=(200, 150, 400, 350), score=0.9, span=(0, 4), at=0, phrase="head")])
    assert best.rule == "head" and best.box == (200, 150, 400, 350) and best.head_score == 0.9
    clipped = plan([rules.Detection(box=(50, 50, 300, 300), score=0.9, span=(0, 4), at=0, phrase="head")])
    assert clipped.box == (100, 100, 300, 300)  # inside the person box


def test_canny_augmentation_and_padding(rules):
    image = torch.zeros(64, 80, 3)
    image[16:48, 20:60] = 1.0
    edges = rules.canny(image)
    assert edges.shape == (64, 80, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    on = edges[..., 0] > 0
    border = torch.zeros(64, 80, dtype=torch.bool)
    border[14:50, 18:62] = True
    border[18:46, 22:58] = False
    assert on.any() and not (on & ~border).any()  # edges on the square's outline only
    assert on[16:48, 19:22].any(dim=1).all() and on[15:18, 20:60].any(dim=0).all()  # every side found
    assert not rules.canny(torch.full((32, 32, 3), 0.5)).any()  # a flat picture has no edges
    # augmentation: deterministic from its key, each op as planned
    crop = torch.rand(40, 30, 3, generator=torch.Generator().manual_seed(0))
    plan = {"crop": [0.1, 0.0, 0.9, 1.0], "flip": True, "noise": 0.05, "gray": True}
    a = rules.augment(crop, plan, rules.generator(0, "k", "noise", 3))
    b = rules.augment(crop, plan, rules.generator(0, "k", "noise", 3))
    assert torch.equal(a, b) and a.shape == (40, 24, 3) and torch.equal(a[..., 0], a[..., 2])
    flipped = rules.augment(crop, {"flip": True}, None)
    assert torch.equal(flipped, crop.flip(1))
    plans = [rules.augmentation_plan(1, f"p{i}", 0) for i in range(400)]
    assert all(p["crop"] or p["flip"] or p["noise"] or p["gray"] for p in plans)
    assert all(0.8 - 1e-6 <= p["crop"][2] - p["crop"][0] <= 1.0 for p in plans if p["crop"])
    # padding: centred on black, square; large crops scaled down first
    square = rules.pad_square(torch.ones(10, 30, 3))
    assert square.shape == (30, 30, 3) and square[:10].sum() == 0 and square[10:20].min() == 1
    assert rules.fit_side(torch.rand(100, 2000, 3), 1024).shape == (51, 1024, 3)


def test_captions_are_made_safe_for_the_trainer_files(rules, pack):
    mumu = pack_module(pack, "bridges.mumu")
    assert rules.clean_caption("  # a <b>bold</b>\tdog\n") == "a ‹b›bold‹/b› dog"
    rng = random.Random(3)
    alphabet = "ab <>#\t\n.é東x"
    for _ in range(300):
        caption = rules.clean_caption("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        assert "\t" not in caption and "\n" not in caption and not caption.startswith("#")
        starts = sorted({m.start() for m in re.finditer(r"\w+", caption)})
        chosen = rng.sample(starts, min(len(starts), 3))
        names = [f"n{i}" for i in range(len(chosen))]
        prompt = rules.assemble_prompt(caption, list(zip(chosen, names, strict=True)), rng.choice([None, "canny"]))
        mumu.bind_placeholders(prompt, names + (["canny"] if prompt.startswith("<canny>") else []))


# ------------------------------------------------------------------------------------------------- the detector

def test_detector_loads_from_its_folder_under_comfyuis_memory_manager(host, pack, detector, detector_dir):
    import comfy.model_patcher
    gd = pack_module(pack, "loaders.grounding_dino")
    assert DETECTOR in gd.list_detectors()
    assert "grounding-dino" in host.folder_paths.folder_names_and_paths
    assert isinstance(detector.patcher, comfy.model_patcher.ModelPatcher)
    assert detector.describe() == f"Grounding DINO '{DETECTOR}'" and detector.identity
    assert gd.load_grounding_dino(DETECTOR) is detector  # one live instance per folder and dtype
    # the folder's content names the build, not where it lies
    assert gd.content_identity(detector_dir) == detector.build_identity
    run = pack_module(pack, "engine.mumu_dataset").Detector(detector).load()
    from PIL import Image
    text, offsets = run.text("a man and his dog .")
    probs, boxes = run.forward(run.pixels(Image.new("RGB", (320, 240), (9, 99, 199))), text)
    assert probs.shape == (30, text["input_ids"].shape[1]) and boxes.shape == (30, 4)
    assert offsets[0] == (0, 0) and offsets[2] == (2, 5)  # [CLS], then 'a', 'man'


def test_detector_folder_refusals(host, pack, detector_dir, tmp_path, monkeypatch):
    from transformers import BertTokenizerFast
    gd = pack_module(pack, "loaders.grounding_dino")
    errors = pack_module(pack, "loaders.errors")
    base = host.models_dir / "grounding-dino"

    def copy(name):
        target = base / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(detector_dir, target)
        return target

    with pytest.raises(errors.LoadError, match=r"folder 'nope' is not in .*found: .*tiny-grounding-dino"):
        gd.load_grounding_dino("nope")
    llama = base / "llama-here"
    pack_module(pack, "headless.tiny_llm").write_llm_folder(llama)
    with pytest.raises(errors.LoadError, match=r"holds a 'llama' model, not Grounding DINO"):
        gd.load_grounding_dino("llama-here")
    truncated = copy("gd-truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(errors.LoadError, match=r"gd-truncated could not be loaded .*truncated, corrupt"):
        gd.load_grounding_dino("gd-truncated")
    corrupt = copy("gd-corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(errors.LoadError, match=r"gd-corrupt could not be loaded"):
        gd.load_grounding_dino("gd-corrupt")
    shapes = copy("gd-shapes")
    config = json.loads((shapes / "config.json").read_text())
    config["num_queries"] = 40
    (shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.LoadError, match=r"gd-shapes.*shape"):
        gd.load_grounding_dino("gd-shapes")
    no_processor = copy("gd-no-processor")
    for name in gd.PROCESSOR_FILES:
        (no_processor / name).unlink(missing_ok=True)
    with pytest.raises(errors.LoadError, match=r"has no processor file"):
        gd.load_grounding_dino("gd-no-processor")
    other_tokenizer = copy("gd-other-tokenizer")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (other_tokenizer / name).unlink(missing_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "a", "man"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(other_tokenizer))
    with pytest.raises(errors.LoadError, match=r"tokenizer gives .*belong to another model"):
        gd.load_grounding_dino("gd-other-tokenizer")
    # only the original release's files: the message says what to get instead
    originals = tmp_path / "grounding-dino"
    originals.mkdir()
    (originals / "groundingdino_swint_ogc.pth").write_bytes(b"x")
    monkeypatch.setitem(host.folder_paths.folder_names_and_paths, "grounding-dino", ([str(originals)], {".pth"}))
    assert "original GroundingDINO release" in gd.missing_message("grounding-dino-tiny")
    node = pack_module(pack, "nodes.mumu_dataset").LoadGroundingDINO
    assert "is not in" in node.VALIDATE_INPUTS("grounding-dino-tiny")


# ------------------------------------------------------------------------------------------------- the builder

@pytest.fixture(scope="module")
def pictures(host):
    """input/captioned_photos/: 8 captioned pictures."""
    return make_pictures(input_dir(host) / "captioned_photos", CAPTIONS)


def test_build_writes_a_dataset_the_trainers_read(host, pack, rules, files, engine, detector, pictures):
    training = pack_module(pack, "loaders.training_inputs")
    shutil.rmtree(input_dir(host) / "ds_main", ignore_errors=True)
    seen = []
    result = engine.build_dataset(detector, "captioned_photos/", "ds_main", settings(rules),
                                  progress=lambda done, total: seen.append((done, total)))
    folder = input_dir(host) / "ds_main"
    print("\n" + result.describe())
    assert seen == [(i, 8) for i in range(1, 9)] and result.built == 8 and result.merged is not None
    entries = manifest(folder)
    assert [e["picture"] for e in entries] == [f"captioned_photos/picture_{i:02d}.png" for i in range(8)]
    with_images = [e for e in entries if e["images"]]
    assert len(with_images) >= 4, "thresholds chosen so the random tiny detector grounds some boxes"
    mumu = pack_module(pack, "bridges.mumu")
    for e in entries:
        crops = [i for i in e["images"] if i.get("box")]
        assert len(crops) <= 3 and len(e["images"]) <= 4
        w, h = e["size"]
        for image in crops:
            x0, y0, x1, y1 = image["box"]
            assert (x1 - x0) * (y1 - y0) >= 150 * 150 and (x1 - x0) * (y1 - y0) <= 0.75 * w * h
            assert image["span"][0] <= image["at"] < image["span"][1]  # before its words
            assert f"<{image['name']}> {e['caption'][image['at']:].split()[0]}" in e["prompt"]
        for d in e["dropped"]:
            assert d["rule"] in ("under_min_area", "over_max_fraction", "words_already_have_a_crop",
                                 "over_3_per_prompt", "no_content_word")
        mumu.bind_placeholders(e["prompt"], [i["name"] for i in e["images"]])  # named placeholders bind
        for image in e["images"]:
            from PIL import Image
            with Image.open(folder / image["file"]) as crop:
                assert crop.width == crop.height and crop.mode == "RGB"  # padded square
    rules_seen = {i["rule"] for e in entries for i in e["images"]}
    assert "object" in rules_seen and rules_seen & {"head", "person", "person_head_not_found", "person_head_too_small"}
    assert result.forwards == 8 + sum(i["rule"] in ("head", "person_head_not_found", "person_head_too_small")
                                      for e in entries for i in e["images"])
    # the stage-1 trainer's own reader: every line, its crops bound by name, files in the input folder
    lines = training.read_captions(training.resolve_input_file("ds_main/stage1_captions.txt"))
    assert len(lines) == 8
    for line, e in zip(lines, entries, strict=True):
        text, crops = training.parse_mumu_caption(line)
        assert text.count("<image>") == len(crops) == len(e["images"])
        assert all(training.resolve_input_file(c).is_file() and c.startswith("ds_main/crops/") for c in crops)
        assert training.teacher_text(text) == e["caption"]  # CLIP reads the caption's own words
    # the stage-2 trainer's own reader: one crop per picture, the picture beside
    pairs = training.read_pairs("ds_main/stage2_pairs.tsv", crops=True)
    assert len(pairs) == sum(1 for e in entries if e["stage2"]) >= 2
    for path, caption in pairs:
        text, crops = training.parse_mumu_caption(caption)
        assert len(crops) == 1 and text.count("<image>") == 1 and path.parent == pictures
    about = json.loads((folder / "dataset.json").read_text())
    assert about["summary"]["pictures"] == 8 and about["skipped"] == [] and about["problems"] == []
    assert about["settings"]["seed"] == 0 and "canny" in about["control_images"]
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")] and not (folder / ".build" / "parts").exists()
    # the builder's output is not offered as a source; its trainer files are offered to the trainers
    assert "captioned_photos/" in files.list_sources() and "ds_main/" not in files.list_sources()
    assert "ds_main/stage2_pairs.tsv" in training.pair_sources()
    assert "ds_main/stage1_captions.txt" in training.input_files(training.TABLE_EXTENSIONS)


def test_rebuild_is_byte_identical_and_incremental(host, rules, files, engine, detector, monkeypatch):
    src = make_pictures(input_dir(host) / "incremental_pictures", CAPTIONS[:6])
    folder = input_dir(host) / "ds_incremental"
    shutil.rmtree(folder, ignore_errors=True)
    s = settings(rules, seed=3)
    assert engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", s).built == 6
    # nothing changed: nothing is read again (the stamps), nothing is written differently
    first = snapshot(folder)
    reads = []
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda p: reads.append(p) or real(p))
    again = engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", s)
    assert (again.built, again.reused, reads) == (0, 6, []) and snapshot(folder) == first
    # two pictures added and one caption edited: only those three are searched
    make_pictures(src, CAPTIONS[6:], offset=6)
    (src / "picture_01.txt").write_text("a woman holding a red cup\n")
    grown = engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", s)
    assert (grown.built, grown.reused) == (3, 5) and len(reads) == 3
    incremental = snapshot(folder)
    # ... and the result is byte for byte what a clean build of the same pictures gives
    shutil.rmtree(folder)
    assert engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", s).built == 8
    assert snapshot(folder) == incremental
    # a touched picture (same bytes, new time) is read again but keeps its line; another seed rebuilds all
    os.utime(src / "picture_02.png", ns=(1, 1))
    touched = engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", s)
    assert (touched.built, touched.reused) == (0, 8) and snapshot(folder) == incremental
    reseeded = engine.build_dataset(detector, "incremental_pictures/", "ds_incremental", settings(rules, seed=4))
    assert reseeded.built == 8 and snapshot(folder) != incremental


def test_interrupt_leaves_nothing_half_written_and_resumes(host, rules, files, engine, detector, pictures):
    folder = input_dir(host) / "ds_interrupted"
    shutil.rmtree(folder, ignore_errors=True)

    class Stop(Exception):
        pass

    def stop_at_3(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        engine.build_dataset(detector, "captioned_photos/", "ds_interrupted", settings(rules), progress=stop_at_3)
    assert not (folder / "manifest.jsonl").exists() and not (folder / "stage1_captions.txt").exists()
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
    done = files.work_entries(folder)
    assert len(done) >= 3 and all(files.crop_files_present(folder, e) for e in done)
    resumed = engine.build_dataset(detector, "captioned_photos/", "ds_interrupted", settings(rules))
    assert resumed.reused == len(done) and resumed.built == 8 - len(done)
    interrupted = snapshot(folder)
    shutil.rmtree(folder)
    engine.build_dataset(detector, "captioned_photos/", "ds_interrupted", settings(rules))
    assert snapshot(folder) == interrupted


def dataset_cli(host, *args, rank=None, world=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cmd = [sys.executable, "-m", "headless", "dataset", "mumu", *args, "--input", str(input_dir(host)),
           "--models", str(host.models_dir), "--output", host.folder_paths.get_output_directory(),
           "--comfyui", str(host.root), "--device", "cpu", "--workers", "1"]
    return subprocess.Popen(cmd, cwd=PACK_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_merge_into_what_one_process_builds(host, rules, engine, detector, detector_dir):
    make_pictures(input_dir(host) / "sharded_pictures", CAPTIONS + ["a dog", "a man on a bike", "a red car"], offset=20)
    folder = input_dir(host) / "ds_sharded"
    shutil.rmtree(folder, ignore_errors=True)
    engine.build_dataset(detector, "sharded_pictures/", "ds_sharded", settings(rules, seed=5))
    one = snapshot(folder)
    shutil.rmtree(folder)
    args = ["--detector", DETECTOR, "--source", "sharded_pictures/", "--dataset", "ds_sharded",
            "--box-threshold", "0.3", "--text-threshold", "0.25", "--seed", "5"]
    procs = [dataset_cli(host, *args, rank=r, world=2) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    print("\n" + "\n".join(o.strip().splitlines()[-2] for o in outs))
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "rank 0/2: 6 pictures" in outs[0] and "rank 1/2: 5 pictures" in outs[1]
    assert sum("merged:" in o for o in outs) >= 1  # whichever finished last merged
    assert snapshot(folder) == one
    # the command line's refusals come with the pack's message and exit status 2
    bad = dataset_cli(host, "--detector", "no-such-detector", "--source", "sharded_pictures/", "--dataset", "ds_x")
    out = bad.communicate(timeout=600)[0]
    assert bad.returncode == 2 and "error: Grounding DINO folder 'no-such-detector' is not in" in out, out[-2000:]
    # a rank run again alone finds its shard done and merges nothing new
    again = dataset_cli(host, *args, rank=0, world=1)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "(0 built, 11 kept" in out, out[-2000:]
    assert snapshot(folder) == one


def test_bad_inputs_are_listed_or_refused(host, pack, rules, files, engine, detector):
    from PIL import Image
    errors = pack_module(pack, "loaders.errors")
    src = input_dir(host) / "awkward_pictures"
    make_pictures(src, CAPTIONS[:2])
    Image.new("RGB", (300, 200), (1, 2, 3)).save(src / "orphan.png")  # no caption
    (src / "lonely.txt").write_text("a caption without its picture")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (src / "corrupt.txt").write_text("a dog")
    Image.new("RGB", (10000, 10), (200, 10, 10)).save(src / "thin.png")
    (src / "thin.txt").write_text("a very long red line")
    Image.new("RGB", (400, 300), (9, 9, 9)).save(src / "dots.png")
    (src / "dots.txt").write_text("...")
    Image.new("RGB", (400, 300), (9, 9, 9)).save(src / "function.png")
    (src / "function.txt").write_text("and of the")
    (src / "blank.png").write_bytes((src / "dots.png").read_bytes())
    (src / "blank.txt").write_text("  \n")
    make_pictures(src, [" ".join(["a red dog and a blue cat"] * 80)], offset=50)  # 480 words: past 256 tokens
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored sideways: shown (and searched, and cropped) upright
    Image.new("RGB", (640, 400), (90, 90, 200)).save(src / "sideways.jpg", exif=exif)
    (src / "sideways.txt").write_text("a man on a beach")
    sub = src / "more"
    make_pictures(sub, ["a cat on a sofa"], offset=40)
    folder = input_dir(host) / "ds_awkward"
    shutil.rmtree(folder, ignore_errors=True)
    result = engine.build_dataset(detector, "awkward_pictures/", "ds_awkward", settings(rules))
    print("\n" + result.describe())
    about = json.loads((folder / "dataset.json").read_text())
    assert [s["picture"] for s in about["skipped"]] == ["awkward_pictures/corrupt.png"]
    assert "could not be read as a picture" in about["skipped"][0]["problem"]
    problems = {p["item"]: p["problem"] for p in about["problems"]}
    assert problems == {"awkward_pictures/orphan.png": "picture without a caption (no orphan.txt beside it)",
                        "awkward_pictures/lonely.txt": "caption without a picture",
                        "awkward_pictures/blank.png": "empty caption"}
    entries = {e["picture"].split("/", 1)[1]: e for e in manifest(folder)}
    assert sorted(entries) == ["dots.png", "function.png", "more/picture_40.png", "picture_00.png", "picture_01.png",
                               "picture_50.png", "sideways.jpg", "thin.png"]
    assert entries["sideways.jpg"]["size"] == [400, 640]
    # a caption longer than the detector's 256 tokens: its start is searched, the rest kept as words
    searched = len(" ".join(["a red dog and a blue cat"] * 80)[:1200])
    assert all(i["span"][1] <= searched for i in entries["picture_50.png"]["images"] if i.get("span"))
    assert entries["thin.png"]["images"] == [] and "too thin" in entries["thin.png"]["note"]
    assert entries["dots.png"]["images"] == [] and "no words" in entries["dots.png"]["note"]
    assert [i for i in entries["function.png"]["images"] if i.get("box")] == []
    assert all(d["rule"] in ("no_content_word", "under_min_area", "over_max_fraction")
               for d in entries["function.png"]["dropped"])
    # a .tsv source: missing pictures, bad lines and repeats are listed
    (input_dir(host) / "awkward.tsv").write_text(
        "# picture<TAB>caption\nawkward_pictures/picture_00.png\ta man\nawkward_pictures/gone.png\ta dog\n"
        "no tab here\nawkward_pictures/picture_00.png\tagain\n../../etc/passwd\troot\n")
    source = files.read_source("awkward.tsv")
    assert [p.key for p in source.pictures] == ["awkward_pictures/picture_00.png"]
    assert [p["problem"][:20] for p in source.problems] == ["caption without a pi", "expected 'picture<TA",
                                                             "'awkward_pictures/pi", "'../../etc/passwd' i"]
    # refusals
    (input_dir(host) / "empty_pictures").mkdir(exist_ok=True)
    with pytest.raises(errors.InputError, match=r"'empty_pictures/' holds no captioned pictures"):
        engine.build_dataset(detector, "empty_pictures/", "ds_empty", settings(rules))
    foreign = input_dir(host) / "somebodys_folder"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(errors.InputError, match=r"was not made by this builder"):
        engine.build_dataset(detector, "awkward_pictures/", "somebodys_folder", settings(rules))
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
    with pytest.raises(errors.InputError, match=r"dataset name"):
        engine.build_dataset(detector, "awkward_pictures/", "../outside", settings(rules))
    with pytest.raises(errors.InputError, match=r"overlap"):
        engine.build_dataset(detector, "awkward_pictures/", "awkward_pictures", settings(rules))
    with pytest.raises(errors.InputError, match=r"is a dataset this builder wrote"):
        engine.build_dataset(detector, "ds_awkward/", "ds_again", settings(rules))
    with pytest.raises(errors.InputError, match=r"is not in ComfyUI's input folder"):
        files.read_source("no_such_folder/")
    with pytest.raises(errors.InputError, match=r"box_threshold"):
        rules.Settings(box_threshold=1.5)


def test_manifest_edits_are_kept_and_bad_edits_named(host, pack, rules, files, engine, detector, pictures):
    training = pack_module(pack, "loaders.training_inputs")
    errors = pack_module(pack, "loaders.errors")
    folder = input_dir(host) / "ds_edited"
    shutil.rmtree(folder, ignore_errors=True)
    engine.build_dataset(detector, "captioned_photos/", "ds_edited", settings(rules))
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if json.loads(line)["images"])
    entry = json.loads(lines[k])
    removed = entry["images"].pop()
    entry["prompt"] = rules.only_placeholder(entry["prompt"], "") if not entry["images"] else \
        " ".join(entry["prompt"].replace(f"<{removed['name']}>", " ").split())
    if entry.get("stage2") == removed["name"]:
        entry["stage2"] = None
    lines[k] = json.dumps(entry)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    result = engine.build_dataset(detector, "captioned_photos/", "ds_edited", settings(rules))
    assert result.built == 0
    assert manifest(folder)[k]["prompt"] == entry["prompt"]
    stage1 = training.read_captions(folder / "stage1_captions.txt")
    assert training.parse_mumu_caption(stage1[k])[0].count("<image>") == len(entry["images"])
    assert not (folder / removed["file"]).exists()  # the crop nobody uses any more is gone
    # a broken edit is named by line, nothing is rewritten
    before = snapshot(folder)
    bad = copy.deepcopy(entry)
    bad["prompt"] += " <ghost>"
    lines[k] = json.dumps(bad)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(errors.InputError, match=rf"manifest.jsonl, line {k + 1}: the prompt does not match .*<ghost>"):
        engine.build_dataset(detector, "captioned_photos/", "ds_edited", settings(rules))
    after = snapshot(folder)
    assert {n: b for n, b in after.items() if n != "manifest.jsonl"} == \
        {n: b for n, b in before.items() if n != "manifest.jsonl"}
    # deleting the line builds that picture again
    del lines[k]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert engine.build_dataset(detector, "captioned_photos/", "ds_edited", settings(rules)).built == 1


def test_fuzz_the_parsers_of_user_files(host, pack, files):
    """Seeded: manifest lines, .tsv sources and MUMU caption lines with named crops give results or the pack's
    own errors, nothing else."""
    errors = pack_module(pack, "loaders.errors")
    training = pack_module(pack, "loaders.training_inputs")
    rng = random.Random(16)
    valid = {"picture": "p/a.png", "sha256": "a" * 64, "caption": "a man", "size": [10, 20], "prompt": "a <man> man",
             "images": [{"name": "man", "file": "crops/x_man.png", "rule": "object", "box": [0, 0, 5, 5]}],
             "stage2": "man", "dropped": [], "build": "k"}
    values = [None, 0, -1, 1.5, True, "", "x", "<a>", "crops/../x.png", "crops/y.png", "\t", [], {}, [1, 2], "a" * 64,
              "image", "<image>", "a <man> <man> man", "東", "\x00"]
    accepted = 0
    for i in range(600):
        entry = copy.deepcopy(valid)
        for _ in range(rng.randint(1, 3)):
            images = entry.get("images")
            pool = [x for x in images if isinstance(x, dict)] if isinstance(images, list) else []
            target = entry if rng.random() < 0.6 or not pool else rng.choice(pool)
            key = rng.choice(list(target) + ["extra"])
            if rng.random() < 0.25:
                target.pop(key, None)
            else:
                target[key] = copy.deepcopy(rng.choice(values))
        text = json.dumps(entry)
        if rng.random() < 0.2:
            cut = rng.randint(0, len(text))
            text = text[:cut] + rng.choice(["", "}", "\"", "\\", "]"]) + text[cut + 1:]
        try:
            files.parse_entry(text, f"fuzz {i}")
            accepted += 1
        except errors.PackError:
            pass
    assert 0 < accepted < 600
    folder = input_dir(host) / "fuzz_tsv"
    folder.mkdir(exist_ok=True)
    (folder / "real.png").write_bytes((PACK_DIR / "docs" / "images" / "mumu_train_sdxl.png").read_bytes())
    pieces = ["real.png", "../fuzz_tsv/real.png", "missing.png", "/etc/passwd", "..", "", " ", "#", "a dog", "\t",
              "\n", "東京", "<x>", "\x00", "a\rb", "\ufeff"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) + rng.choice(["\t", "\n", " ", ""]) for _ in range(rng.randint(0, 12)))
        (folder / "fuzz.tsv").write_text(text, encoding="utf-8")
        try:
            source = files.read_source("fuzz_tsv/fuzz.tsv")
            assert all(p.key == "fuzz_tsv/real.png" for p in source.pictures)
        except errors.PackError:
            pass
    crop_pieces = ["man=x.png", "=x.png", "man=", "x.png", "dog=y.png", "image=z.png", "a b=c", "<man>", "man==x"]
    prompt_pieces = ["a ", "<man> ", "<dog> ", "<image> ", "<> ", "<a b> ", "man ", "<man", "> "]
    for _ in range(500):
        line = "".join(rng.choice(prompt_pieces) for _ in range(rng.randint(0, 6)))
        line += "".join("\t" + rng.choice(crop_pieces) for _ in range(rng.randint(0, 4)))
        try:
            text, crops = training.parse_mumu_caption(line)
            assert text.count("<image>") == len(crops)
        except errors.PackError:
            pass


def test_named_crops_in_the_trainers_files_and_old_files_unchanged(host, pack):
    training = pack_module(pack, "loaders.training_inputs")
    assert training.parse_mumu_caption("a <man> man and his <dog> dog\tdog=d.png\tman=m.png") == (
        "a <image> man and his <image> dog", ["m.png", "d.png"])
    assert training.parse_mumu_caption("<man> and <man> again\tman=m.png") == ("<image> and <image> again",
                                                                                ["m.png", "m.png"])
    # positional files read as before, also a crop whose file name has a '='
    assert training.parse_mumu_caption("a <image> man\tman=m.png") == ("a <image> man", ["man=m.png"])
    assert training.parse_mumu_caption("a <image> man and <dog> dog\tx.png\tdog=d.png") == (
        "a <image> man and <image> dog", ["x.png", "d.png"])
    with pytest.raises(Exception, match=r"no image named 'cat'"):
        training.parse_mumu_caption("a <cat> cat\tdog=d.png")


# -------------------------------------------------------------------------------------- nodes and the workflow

def run_saved_image(host, prompt, save_node) -> SavedImage:
    """Runs the graph from scratch and returns the picture its SaveImage node wrote (PreviewImage writes one too)."""
    from PIL import Image
    forget_everything(host)
    ui = host.run(prompt)
    paths = host.saved_images({save_node: ui[save_node]})
    assert len(paths) == 1
    with Image.open(paths[0]) as saved:
        pixels = saved.convert("RGB").tobytes()
    return SavedImage(png=paths[0].read_bytes(), pixels=pixels, path=paths[0], ui=ui)


def build_graph(source, dataset, **extra):
    return {
        "1": {"class_type": "BeyondCLIP_LoadGroundingDINO", "inputs": {"detector_name": DETECTOR, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_BuildMUMUDataset", "inputs": {
            "detector": ["1", 0], "source": source, "dataset_name": dataset, "box_threshold": 0.3,
            "text_threshold": 0.25, "seed": 0, "crop_max_side": 1024, **extra}},
        "3": {"class_type": "BeyondCLIP_PreviewMUMUDataset", "inputs": {"dataset": ["2", 0], "count": 3, "start": 0,
                                                                        "tile": 96}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_build_and_preview_nodes(host, pack, detector_dir, pictures):
    forget_everything(host)
    shutil.rmtree(input_dir(host) / "ds_nodes", ignore_errors=True)
    host.progress.clear()
    ui = host.run(build_graph("captioned_photos/", "ds_nodes"))
    dataset, summary = host.node_output("2")
    assert dataset.stage1 == "ds_nodes/stage1_captions.txt" and dataset.pictures == 8
    assert "8 built" in summary and summary in ui["2"]["text"][0]
    assert (8, 8) in host.progress  # the build's progress bar reached the end
    image, prompts = host.node_output("3")
    assert image.shape[0] == 1 and image.shape[3] == 3 and image.shape[2] >= 2 * 96
    assert prompts.splitlines() == [e["prompt"] for e in manifest(input_dir(host) / "ds_nodes")[:3]]
    # queued again unchanged: nothing searched, nothing rewritten, and from then on served from the cache; a new
    # picture makes it run (and search only that one)
    before = {p: p.stat().st_mtime_ns for p in (input_dir(host) / "ds_nodes").rglob("*") if p.is_file()}
    host.run(build_graph("captioned_photos/", "ds_nodes"))
    assert "0 built, 8 kept" in host.node_output("2")[1]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    host.run(build_graph("captioned_photos/", "ds_nodes"))
    assert "2" in host.cached_nodes()
    make_pictures(pictures, ["a dog on a sofa"], offset=8)
    try:
        host.run(build_graph("captioned_photos/", "ds_nodes"))
        assert "1 built, 8 kept" in host.node_output("2")[1]
    finally:
        for suffix in (".png", ".txt"):
            (pictures / f"picture_08{suffix}").unlink()
    node = pack_module(pack, "nodes.mumu_dataset").BuildMUMUDataset
    assert "is not a folder of captioned pictures" in node.VALIDATE_INPUTS("nowhere/")


def test_build_node_stops_at_the_interrupt_button_and_resumes(host, pack, files, detector_dir, pictures):
    import comfy.model_management as mm
    import comfy.utils
    folder = input_dir(host) / "ds_node_interrupted"
    shutil.rmtree(folder, ignore_errors=True)
    forget_everything(host)

    def interrupt_at_third_picture(value, total, *args, **kwargs):
        if (value, total) == (3, 8):
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_at_third_picture)
    try:
        with pytest.raises(Exception, match="interrupted"):
            host.run(build_graph("captioned_photos/", "ds_node_interrupted"))
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: host.progress.append((value, total)))
    done = files.work_entries(folder)
    assert not (folder / "manifest.jsonl").exists() and 3 <= len(done) < 8
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
    forget_everything(host)
    host.run(build_graph("captioned_photos/", "ds_node_interrupted"))
    assert f"{8 - len(done)} built, {len(done)} kept" in host.node_output("2")[1]


def test_stage2_trainer_reads_the_dataset(host, pack, tiny_idefics2, mumu_connector_file, detector_dir, pictures):
    forget_everything(host)
    shutil.rmtree(input_dir(host) / "ds_stage2", ignore_errors=True)
    g = build_graph("captioned_photos/", "ds_stage2")
    del g["3"], g["4"]
    g.update({
        "10": {"class_type": "BeyondCLIP_MUMULoadIdefics2",
               "inputs": {"idefics2_name": tiny_idefics2, "dtype": "fp32"}},
        "11": {"class_type": "BeyondCLIP_MUMULoadConnector", "inputs": {"connector_name": mumu_connector_file}},
        "12": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}},
        "13": {"class_type": "BeyondCLIP_TrainMUMU", "inputs": {
            "idefics2": ["10", 0], "connector": ["11", 0], "model": ["12", 0], "vae": ["12", 2],
            "pairs": "ds_stage2/stage2_pairs.tsv", "run_name": "mumu-ds-s2", "output_name": "mumu-ds-s2", "steps": 2,
            "batch_size": 2, "connector_lr": 1e-3, "idefics2_lora_lr": 1e-3, "unet_lora_lr": 1e-3, "rank": 4,
            "resolution": 64, "image_resolution": 32, "val_fraction": 0.25, "seed": 0, "resume": False,
            "checkpoint_every": 2, "eval_every": 2, "dataset": ["2", 0]}},
    })
    host.run(g)  # validates before the .tsv exists: the dataset input supplies it
    history = json.loads((Path(host.folder_paths.get_output_directory()) / "beyond_clip_training" / "mumu-ds-s2" /
                          "history.json").read_text())
    stage2_lines = sum(1 for e in manifest(input_dir(host) / "ds_stage2") if e["stage2"])
    assert history["steps"] == 2 and history["train_examples"] + history["val_examples"] == stage2_lines
    assert (host.models_dir / "loras" / "mumu-ds-s2-unet-lora.safetensors").is_file()


def test_shipped_dataset_workflow_end_to_end(host, pack, tiny_idefics2, mumu_input_images, detector_dir, pictures):
    """pictures + captions -> Build MUMU Dataset -> Train Connector (MUMU) on it -> Encode (MUMU) -> KSampler."""
    wf = pack_module(pack, "headless.workflow")
    workflow = wf.load_workflow(PACK_DIR / "workflows" / "mumu_build_dataset.json")
    about = workflow["extra"]["beyond_clip"]
    assert about["arch"] == "sdxl" and about["models"]["grounding-dino"] == ["grounding-dino-tiny"]
    prompt = wf.to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    shutil.rmtree(input_dir(host) / "wf_mumu_dataset", ignore_errors=True)
    ids = {}
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        ids[kind] = node_id
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="BeyondCLIP_TinyCheckpoint", inputs={"arch": "sdxl"})
        elif kind == "BeyondCLIP_MUMULoadIdefics2":
            inputs.update(idefics2_name=tiny_idefics2, dtype="fp32")
        elif kind == "BeyondCLIP_LoadGroundingDINO":
            assert inputs == {"detector_name": "grounding-dino-tiny", "dtype": "fp32"}
            inputs["detector_name"] = DETECTOR
        elif kind == "BeyondCLIP_BuildMUMUDataset":
            assert (inputs["box_threshold"], inputs["text_threshold"]) == (0.35, 0.25), "Grounding DINO's defaults"
            inputs.update(source="captioned_photos/", dataset_name="wf_mumu_dataset", box_threshold=0.3)
        elif kind == "BeyondCLIP_TrainMUMUConnector":
            assert inputs["captions"] == "mumu_dataset/stage1_captions.txt" and isinstance(inputs["dataset"], list)
            inputs.update(steps=150, batch_size=8, learning_rate=2e-3, width=64, depth=2, heads=4, image_resolution=32,
                          probes=16, val_fraction=0.25, checkpoint_every=50, eval_every=50, cache_precision="fp32",
                          run_name="wf-mumu-dataset", output_name="wf-mumu-dataset-connector")
        elif kind == "LoadImage":
            inputs["image"] = mumu_input_images["man"]
        elif kind == "BeyondCLIP_MUMUEncode":
            assert "<man>" in inputs["prompt"]
            inputs["image_resolution"] = 32
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 6
    forget_everything(host)
    first = run_saved_image(host, prompt, ids["SaveImage"])
    run = Path(host.folder_paths.get_output_directory()) / "beyond_clip_training" / "wf-mumu-dataset"
    history = json.loads((run / "history.json").read_text())
    print(f"\nworkflow: stage 1 on the built dataset, held-out {history['initial_val_loss']:.4f} -> "
          f"{history['final_val_loss']:.4f}")
    assert history["final_val_loss"] < history["initial_val_loss"]
    # the trainer read the dataset's prompts and crops
    cache_about = pack_module(pack, "loaders.run_folder").cache_about(history["cache"])
    crops = sorted(cache_about["crops"])
    built = sorted(f"wf_mumu_dataset/{i['file']}" for e in manifest(input_dir(host) / "wf_mumu_dataset")
                   for i in e["images"])
    assert crops == sorted(set(built)) and crops
    positive = host.node_output(ids["BeyondCLIP_MUMUEncode"])[0][0]
    assert positive[0].shape[0] == 1 and positive[0].shape[2] == 2048
    assert positive[1]["pooled_output"].shape == (1, 1280)
    preview = host.node_output(ids["BeyondCLIP_PreviewMUMUDataset"])[0]
    assert preview.shape[0] == 1 and preview.shape[3] == 3
    assert first.path.name.startswith("MUMU_dataset")
    # queued again after a restart: the dataset is kept (nothing searched), training resumes at its end, same picture
    forget_everything(host)
    assert run_saved_image(host, prompt, ids["SaveImage"]).png == first.png
    assert "0 built, 8 kept" in host.node_output(ids["BeyondCLIP_BuildMUMUDataset"])[1]
    other = copy.deepcopy(prompt)
    other[ids["BeyondCLIP_MUMUEncode"]]["inputs"]["prompt"] = "a black cat on a table near a <man> house"
    change = pixel_change(run_saved_image(host, other, ids["SaveImage"]).pixels, first.pixels)
    print(f"another prompt changes the picture by {change:.2f} levels")
    assert change > 0.5


def test_seeded_draws_do_not_depend_on_order(rules):
    keys = [f"k{i}" for i in range(50)]
    forward = [rules.draw(1, k, "head", 3) for k in keys]
    backward = [rules.draw(1, k, "head", 3) for k in reversed(keys)][::-1]
    assert forward == backward and len(set(forward)) == 50 and all(0 <= v < 1 for v in forward)
    assert list(itertools.islice((rules.draw(2, k, "head", 3) for k in keys), 5)) != forward[:5]
