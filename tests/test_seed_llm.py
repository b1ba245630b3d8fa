"""SEED-LLM (the SEED paper's SEED-OPT recipe on any causal LM) and the SEED head for SDXL, in the real host with
small models: the shipped workflows end to end, learning (Draw writes a training caption's codes, Describe its
caption, the held-out loss beats the untrained model and the code-frequency prior), exact resume, DDP on two
processes, peft reading the LoRA, and every refusal (another LLM, another SEED tokenizer, damaged files, pictures
that cannot be read, codes out of range, a context too short)."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    api_workflow,
    forget_everything,
    history,
    host_module,
    node_of,
    pack_module,
    pixel_change,
    run_saved_image,
    same,
    train_cli,
)
from PIL import Image, ImageDraw
from test_seed import TINY_LABEL, official, write_official  # noqa: F401  (official: the SEED files fixture)

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
PAIRS = "seed_llm_shapes/"
QUESTIONS = "seed_llm_questions.tsv"
TRAINED = "seed_opt_2.7b"  # the output name the shipped training workflow writes
RUN = "seed_opt"
# small enough for two CPU cores: ~40 s of training (rank 16: the 2-layer random LLM needs it to tell the colours
# apart at the first code in 150 steps)
STEPS = {"stage1_steps": 30, "stage2_steps": 150, "batch_size": 8, "learning_rate": 3e-3, "rank": 16,
         "lora_alpha": 32.0, "val_fraction": 0.25, "eval_every": 25, "checkpoint_every": 50}


def shape_picture(colour, shape, variant):
    """A coloured circle or square, shifted a little per variant: the tiny SEED tokenizer gives the variants of
    one colour and shape mostly the same codes, so held-out pictures share codes with training ones."""
    g = torch.Generator().manual_seed(variant * 7 + len(colour) + 3 * SHAPES.index(shape))
    img = Image.new("RGB", (96, 96), (240, 240, 235))
    dx, dy = (int(v) for v in torch.randint(-8, 9, (2,), generator=g))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)([20 + dx, 20 + dy, 76 + dx, 76 + dy], fill=COLOURS[colour])
    return img


@pytest.fixture(scope="module")
def shapes(host):
    """input/seed_llm_shapes/: 16 pictures (4 colours x 2 shapes x 2 variants) with same-name .txt captions, and a
    questions .tsv about some of them."""
    base = Path(host.folder_paths.get_input_directory())
    folder = base / PAIRS
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for colour in COLOURS:
        for shape in SHAPES:
            for variant in range(2):
                name = f"{colour}_{shape}_{variant}"
                shape_picture(colour, shape, variant).save(folder / f"{name}.png")
                (folder / f"{name}.txt").write_text(f"a {colour} {shape}\n")
                names[name] = f"a {colour} {shape}"
    lines = ["# image<TAB>question<TAB>answer"]
    lines += [f"{PAIRS}{c}_{s}_0.png\twhat colour is it?\t{c}" for c in COLOURS for s in SHAPES]
    (base / QUESTIONS).write_text("\n".join(lines) + "\n")
    return names


def as_image(img):
    import numpy as np
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype="float32") / 255.0)[None]


def point_at_small_models(prompt, *, arch="sd15", image=None, prefix="seed_llm", steps=STEPS, draw="a red circle"):
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="BeyondCLIP_TinyCheckpoint", inputs={"arch": arch})
        elif kind == "BeyondCLIP_LLMLoader":
            inputs.update(llm_name="tiny-llama", dtype="fp32")
        elif kind == "BeyondCLIP_SEEDLoader":
            inputs.update(seed_model=TINY_LABEL, dtype="fp32")
        elif kind == "BeyondCLIP_TrainSEEDLLM":
            inputs.update(pairs=PAIRS, questions=QUESTIONS, **steps)
        elif kind == "BeyondCLIP_TrainSEEDSDXLHead":
            inputs.update(pairs=PAIRS, steps=150, batch_size=8, learning_rate=3e-3, hidden_dim=64, val_fraction=0.25,
                          eval_every=25, checkpoint_every=50)
        elif kind == "BeyondCLIP_SEEDLLMDraw":
            inputs["prompt"] = draw
        elif kind == "LoadImage":
            inputs["image"] = image
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


def workflow(host, pack, name, **kw):
    return point_at_small_models(api_workflow(host, pack, name), **kw)


@pytest.fixture(scope="module")
def trained(host, pack, tiny_llama, official, shapes):  # noqa: F811
    """The shipped training workflow, run once: trains the SEED-LLM on the shapes, then draws."""
    prompt = workflow(host, pack, "seed_llm_train.json", prefix="seed_llm_trained")
    host.progress.clear()
    saved = run_saved_image(host, prompt)
    return prompt, saved, list(host.progress)


def picture_codes(host, pack, name):
    """The tiny SEED tokenizer's codes of a training picture."""
    seed = pack_module(pack, "loaders.seed").load_seed(host.models_dir / "bridges" / "seed-v1-tiny.safetensors")
    image = as_image(Image.open(Path(host.folder_paths.get_input_directory()) / PAIRS / f"{name}.png"))
    return pack_module(pack, "engine.seed").tokenize(seed, image).codes[0]


def best_match(codes, host, pack, caption, shapes):
    """The largest fraction of positions where `codes` equal the codes of a training picture with this caption."""
    return max(float((codes == picture_codes(host, pack, name)).float().mean())
               for name, c in shapes.items() if c == caption)


# ---------------------------------------------------------------------------------------------- training

def test_training_workflow_learns_and_draws(host, pack, trained, shapes):
    prompt, saved, progress = trained
    h = history(host, RUN)
    report = h["seed_llm"]
    before, after = report["untrained_val"], report["final_val"]
    print(f"\nSEED-LLM held-out loss by kind (untrained -> trained): {before} -> {after}; code-frequency prior "
          f"{report['code_frequency_prior']:.3f}, uniform {report['uniform_code_loss']:.3f}; "
          f"{h['val_examples']} held-out / {h['train_examples']} training pictures")
    assert h["val_examples"] == 4 and h["train_examples"] == 12 and h["steps"] == STEPS["stage2_steps"]
    assert report["uniform_code_loss"] == pytest.approx(math.log(8192))
    assert before["draw"] == pytest.approx(math.log(8192), abs=0.05)  # the untrained model guesses among 8192
    # held-out pictures: their codes are predicted far better than by the untrained model or the code frequencies
    assert after["draw"] < 0.5 * report["code_frequency_prior"] and after["draw"] < 0.3 * before["draw"]
    assert after["caption"] < before["caption"] and after["question"] < before["question"]
    stage1 = json.loads((Path(host.folder_paths.get_output_directory()) / "beyond_clip_training" / RUN / "stage1" /
                         "history.json").read_text())
    assert stage1["steps"] == STEPS["stage1_steps"] and stage1["final_val_loss"] < stage1["initial_val_loss"]
    # the progress bar counted both stages, and the loss was shown
    total = STEPS["stage1_steps"] + STEPS["stage2_steps"]
    assert (total, total) in progress
    # both files are where the loaders list them
    assert (host.models_dir / "bridges" / f"{TRAINED}.safetensors").is_file()
    assert (host.models_dir / "LLM" / f"{TRAINED}-seed-llm-lora" / "adapter_config.json").is_file()
    loader = pack_module(pack, "nodes.seed_llm").SeedLLMLoader
    assert f"{TRAINED}.safetensors" in loader.INPUT_TYPES()["required"]["seed_llm"][0]

    # Draw wrote the codes of the workflow's prompt, a training caption, far better than chance (1 in 8192)
    draw_id = node_of(prompt, "BeyondCLIP_SEEDLLMDraw")
    caption = prompt[draw_id]["inputs"]["prompt"]
    tokens, text = host.node_output(draw_id)
    assert tokens.codes.shape == (1, 32) and text.startswith("<img><img_") and text.endswith("</img>")
    assert saved.ui[draw_id]["text"] == [text]
    assert torch.equal(pack_module(pack, "bridges.seed").parse_codes(text), tokens.codes)
    accuracy = best_match(tokens.codes[0], host, pack, caption, shapes)
    print(f"Draw '{caption}': {accuracy:.0%} of the 32 codes are those of a training picture with that caption")
    assert accuracy >= 0.5

    # Queued again: the run resumes at its last step (nothing to train) and draws the same picture
    again = run_saved_image(host, prompt)
    assert again.png == saved.png
    assert history(host, RUN)["history"] == h["history"]
