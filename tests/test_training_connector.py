"""MUMU stage 1: the connector distilled from the SDXL checkpoint's own CLIP (text captions and captions with
reference crops), and the trained connector driving the stock KSampler through the MUMU encode node. Its
length-invariant token loss is tested in tests/unit/test_connector_loss.py."""
import copy
import itertools
from pathlib import Path

import pytest
import torch
from conftest import forget_everything, history, pack_module, pixel_change, run_saved_image

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["fox", "cat", "dog", "house", "boat", "tree", "car", "bird"]
PLACES = ["in the snow", "on a hill", "at night", "by the sea"]


# ---- the Train Connector (MUMU) node ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mumu_captions(host, mumu_input_images):
    """Text captions, and one in four with a crop at its <image> placeholder (CLIP reads the words only)."""
    crops = list(mumu_input_images.values())
    lines = []
    g = torch.Generator().manual_seed(0)
    combos = list(itertools.product(COLOURS, THINGS, PLACES))
    for k, i in enumerate(torch.randperm(len(combos), generator=g)[:160].tolist()):
        c, thing, place = combos[i]
        if k % 4 == 0:
            lines.append(f"a {c} <image> {thing} {place}\t{crops[k % len(crops)]}")
        else:
            lines.append(f"a {c} {thing} {place}")
    name = "mumu_train_captions.tsv"
    (Path(host.folder_paths.get_input_directory()) / name).write_text("\n".join(lines) + "\n")
    return name


def train_node(idefics2, captions, *, run, out, steps=300, lr=2e-3, seed=0, resume=True, eval_every=50):
    return {"class_type": "BeyondCLIP_TrainMUMUConnector", "inputs": {
        "idefics2": ["1", 0], "clip": ["6", 1], "captions": captions, "run_name": run, "output_name": out,
        "steps": steps, "batch_size": 16, "learning_rate": lr, "width": 64, "depth": 2, "heads": 4,
        "hidden_layer": -1, "image_resolution": 32, "probes": 32, "val_fraction": 0.2, "seed": seed,
        "resume": resume, "checkpoint_every": 50, "eval_every": eval_every, "cache_precision": "fp32"}}


def sample_graph(idefics2, captions, prompt, **train):
    return {
        "1": {"class_type": "BeyondCLIP_MUMULoadIdefics2", "inputs": {"idefics2_name": idefics2, "dtype": "fp32"}},
        "6": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}},
        "20": train_node(idefics2, captions, **train),
        "4": {"class_type": "BeyondCLIP_MUMUEncode", "inputs": {
            "idefics2": ["1", 0], "connector": ["20", 0], "prompt": prompt, "negative_prompt": "",
            "negative": "encode negative text", "image_resolution": 32, "token_budget": 0, "width": 1024,
            "height": 1024, "target_width": 1024, "target_height": 1024, "model": ["6", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0], "seed": 3,
            "steps": 8, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["6", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "mumu_trained"}},
    }


def test_connector_distillation_loss_falls_and_the_connector_drives_ksampler(host, pack, tiny_idefics2,
                                                                             mumu_captions):
    graph = sample_graph(tiny_idefics2, mumu_captions, "a red fox in the snow", run="mumu", out="trained-mumu")
    first = run_saved_image(host, graph)
    h = history(host, "mumu")
    start, end = h["initial_val_loss"], h["final_val_loss"]
    print(f"\nMUMU connector: held-out loss {start:.5f} -> {end:.5f} ({start / end:.1f}x) after {h['steps']} "
          f"steps on {h['val_examples']} held-out / {h['train_examples']} training captions; "
          f"{first.ui['20']['text'][0]}")
    assert h["steps"] == 300 and h["val_examples"] == 32 and h["probes"] == 32
    assert start / end >= 8  # 13.6x on both hosts when written
    connector, name, val_loss = host.node_output("20")
    assert name == "trained-mumu.safetensors" and val_loss == end
    assert name in pack_module(pack, "loaders.folders").list_bridge_files()

    positive = host.node_output("4")[0][0]
    assert positive[0].shape[0] == 1 and positive[0].shape[2] == 2048 and positive[0].shape[1] < 20
    assert positive[1]["pooled_output"].shape == (1, 1280)

    again = run_saved_image(host, graph)
    assert again.png == first.png, "resumed at the last step: same connector, same picture"
    other = copy.deepcopy(graph)
    other["4"]["inputs"]["prompt"] = "a purple boat by the sea"
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"another prompt changes the picture by {change:.2f} levels")
    assert change > 0.5

    # Load Connector (MUMU) lists the file and gives the same conditioning and picture
    loaded = copy.deepcopy(graph)
    loaded["20"] = {"class_type": "BeyondCLIP_MUMULoadConnector", "inputs": {"connector_name": name}}
    assert run_saved_image(host, loaded).pixels == first.pixels
    assert torch.equal(host.node_output("4")[0][0][0], positive[0])


def test_connector_resume_is_exact_and_other_settings_are_refused(host, pack, tiny_idefics2, mumu_captions):
    def train(run, steps, **kw):
        forget_everything(host)
        graph = sample_graph(tiny_idefics2, mumu_captions, "x", run=run, out=run, steps=steps, eval_every=10, **kw)
        host.run({k: graph[k] for k in ("1", "6", "20")})

    train("mumu-straight", 40)
    train("mumu-halves", 20)
    train("mumu-halves", 40)
    assert history(host, "mumu-halves")["history"] == history(host, "mumu-straight")["history"]
    from safetensors.torch import load_file
    a, b = (load_file(str(host.models_dir / "bridges" / f"{n}.safetensors")) for n in ("mumu-halves", "mumu-straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match=r"train_config.lr \(0.002 then, 0.01 now\)"):
        train("mumu-halves", 60, lr=1e-2)


def test_bad_mumu_captions_are_refused_by_line(host, tiny_idefics2):
    folder = Path(host.folder_paths.get_input_directory())
    (folder / "mumu_bad.tsv").write_text("a red fox\na <image> cat and a <image> dog\tmumu_dog.png\n")
    forget_everything(host)
    graph = sample_graph(tiny_idefics2, "mumu_bad.tsv", "x", run="bad", out="bad", steps=1)
    with pytest.raises(Exception, match=r"mumu_bad.tsv, caption 2: .*<image> #2"):
        host.run({k: graph[k] for k in ("1", "6", "20")})


def test_connector_command_line_on_two_gloo_processes_matches_one_process(host, tiny_idefics2, mumu_captions):
    """`python -m headless.train_cli connector` trains on the cache the node built; under torchrun each of two
    gloo processes takes half of every global batch and they end with the weights one process trains."""
    import shutil

    from conftest import train_cli
    forget_everything(host)
    graph = sample_graph(tiny_idefics2, mumu_captions, "x", run="mumu-cli-source", out="mumu-cli-source", steps=1)
    host.run({k: graph[k] for k in ("1", "6", "20")})
    runs = Path(host.folder_paths.get_output_directory()) / "beyond_clip_training"
    for name in ("mumu-cli-one", "mumu-cli-two"):
        shutil.rmtree(runs / name, ignore_errors=True)
        shutil.copytree(runs / "mumu-cli-source" / "cache", runs / name / "cache")
    common = ["--steps", "30", "--batch-size", "8", "--lr", "2e-3", "--width", "64", "--depth", "2", "--heads", "4",
              "--probes", "16", "--val-fraction", "0.2", "--eval-every", "15", "--device", "cpu"]
    one = train_cli(host, "connector", "--run-name", "mumu-cli-one", "--out", "mumu-cli-one", *common)
    two = train_cli(host, "connector", "--run-name", "mumu-cli-two", "--out", "mumu-cli-two", *common, nproc=2)
    assert "all 2 ranks hold identical weights" in two and "step 30/30" in one
    h1, h2 = history(host, "mumu-cli-one"), history(host, "mumu-cli-two")
    from safetensors.torch import load_file
    a, b = (load_file(str(host.models_dir / "bridges" / f"{n}.safetensors")) for n in ("mumu-cli-one", "mumu-cli-two"))
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\nconnector CLI: held-out {h1['initial_val_loss']:.4f} -> {h1['final_val_loss']:.4f}; one vs two gloo "
          f"processes: max weight difference {err:.2e}")
    assert h1["final_val_loss"] < h1["initial_val_loss"] / 2
    # the same global batches; only the order of the gradient sums differs (Adam carries the rounding on)
    assert err < 1e-3 and abs(h1["final_val_loss"] - h2["final_val_loss"]) < 1e-3 * h1["final_val_loss"]


def test_connector_command_line_refuses_a_mapper_cache(host, pack):
    from conftest import train_cli
    run_folder = pack_module(pack, "loaders.run_folder")
    run = run_folder.run_dir("mumu-cli-wrong")
    run_folder.build_cache(run, ["a", "b"], lambda text: (torch.zeros(1, 77, 64), 0),
                         lambda text: (torch.zeros(1, 77, 2048), torch.zeros(1, 1280)), {"student": "beyond_clip"})
    with pytest.raises(AssertionError,
                       match="holds 'beyond_clip' states.*give --idefics2, --checkpoint and --captions"):
        train_cli(host, "connector", "--run-name", "mumu-cli-wrong", "--out", "wrong", "--steps", "1")
