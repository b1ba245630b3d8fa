"""Training: mapper distillation from the checkpoint's own CLIP (node, resume, determinism, the trained bridge
driving the stock KSampler), DDP on two gloo processes, the router and GILL decision training."""
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    PACK_DIR,
    check_golden_pixels,
    forget_everything,
    history,
    pack_module,
    pixel_change,
    run_saved_image,
    same,
    train_cli,
)

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["fox", "cat", "dog", "house", "boat", "tree", "car", "bird"]
PLACES = ["in the snow", "on a hill", "at night", "by the sea"]


def captions(n=200, seed=0):
    allc = [f"a {c} {t} {p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]
    g = torch.Generator().manual_seed(seed)
    return [allc[i] for i in torch.randperm(len(allc), generator=g)[:n].tolist()]


@pytest.fixture(scope="module")
def caption_file(host):
    folder = Path(host.folder_paths.get_input_directory())
    (folder / "train_captions.txt").write_text("# captions for the tests\n" + "\n".join(captions()) + "\n\n")
    return "train_captions.txt"


def train_graph(llm, captions_name, *, run, out, steps=300, arch="sd15", resume=True, seed=0, lr=3e-3,
                batch_size=16, loss="mse", eval_every=50):
    return {
        "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
        "6": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}},
        "20": {"class_type": "BeyondCLIP_TrainMapper", "inputs": {
            "llm": ["1", 0], "clip": ["6", 1], "captions": captions_name, "run_name": run, "output_name": out,
            "steps": steps, "batch_size": batch_size, "learning_rate": lr, "loss": loss, "hidden_dim": 128,
            "depth": 2, "activation": "gelu", "hidden_layer": -1, "template": "none", "val_fraction": 0.2,
            "seed": seed, "resume": resume, "checkpoint_every": 25, "eval_every": eval_every,
            "cache_precision": "fp32"}},
    }


def test_distillation_held_out_loss_falls_10x_and_the_file_is_listed(host, pack, tiny_llama, caption_file):
    ui = host.run(train_graph(tiny_llama, caption_file, run="t10x", out="trained-sd15-mapper", steps=400, lr=3e-3))
    h = history(host, "t10x")
    first, last = h["initial_val_loss"], h["final_val_loss"]
    print(f"held-out MSE {first:.5f} -> {last:.5f} ({first / last:.1f}x) after {h['steps']} steps, "
          f"{h['val_examples']} held-out captions")
    assert h["val_examples"] >= 10 and h["steps"] == 400
    assert first / last >= 10
    assert "trained-sd15-mapper.safetensors" in ui["20"]["text"][0]
    folders = pack_module(pack, "loaders.folders")
    assert "trained-sd15-mapper.safetensors" in folders.list_bridge_files()
    # the progress bar went to the last step
    assert (400, 400) in host.progress


@pytest.fixture(scope="module")
def small_caption_file(host):
    folder = Path(host.folder_paths.get_input_directory())
    (folder / "train_captions_small.txt").write_text("\n".join(captions(48, seed=1)))
    return "train_captions_small.txt"


def mapper_tensors(host, name):
    from safetensors.torch import load_file
    return load_file(str(host.models_dir / "bridges" / f"{name}.safetensors"))


def quick(host, llm, captions_name, **kw):
    forget_everything(host)
    kw.setdefault("steps", 60)
    kw.setdefault("batch_size", 8)
    kw.setdefault("eval_every", 10)
    return host.run(train_graph(llm, captions_name, **kw))


def test_resume_and_interruption_continue_from_the_same_step_and_loss(host, pack, tiny_llama, small_caption_file,
                                                                      monkeypatch):
    quick(host, tiny_llama, small_caption_file, run="straight", out="straight")
    straight = history(host, "straight")
    # N/2 steps, stop, then N with resume on
    quick(host, tiny_llama, small_caption_file, run="halves", out="halves", steps=30)
    assert history(host, "halves")["steps"] == 30
    quick(host, tiny_llama, small_caption_file, run="halves", out="halves")
    halves = history(host, "halves")
    assert halves["history"] == straight["history"], "resumed run must see the same losses at every step"
    assert same(mapper_tensors(host, "halves"), mapper_tensors(host, "straight"))

    # the interrupt button: stops at the next step, the checkpoint holds that step, queueing again finishes
    train_nodes = pack_module(pack, "nodes.train")
    import comfy.model_management as mm
    shown = train_nodes._show

    def interrupt_at_17(unique_id, text):
        shown(unique_id, text)
        if text.startswith("step 17/"):
            mm.interrupt_current_processing(True)
    monkeypatch.setattr(train_nodes, "_show", interrupt_at_17)
    with pytest.raises(Exception, match="interrupted"):
        quick(host, tiny_llama, small_caption_file, run="interrupted", out="interrupted")
    monkeypatch.setattr(train_nodes, "_show", shown)
    ckpt = torch.load(str(Path(host.folder_paths.get_output_directory()) / "beyond_clip_training" / "interrupted" /
                          "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 18  # step 18 was done when the progress bar saw the interrupt
    assert not (host.models_dir / "bridges" / "interrupted.safetensors").exists()
    quick(host, tiny_llama, small_caption_file, run="interrupted", out="interrupted")
    assert history(host, "interrupted")["history"] == straight["history"]
    assert same(mapper_tensors(host, "interrupted"), mapper_tensors(host, "straight"))


def test_a_fixed_seed_gives_identical_weights_and_another_seed_does_not(host, tiny_llama, small_caption_file):
    quick(host, tiny_llama, small_caption_file, run="seed0a", out="seed0a", resume=False)
    quick(host, tiny_llama, small_caption_file, run="seed0b", out="seed0b", resume=False)
    quick(host, tiny_llama, small_caption_file, run="seed1", out="seed1", resume=False, seed=1)
    assert same(mapper_tensors(host, "seed0a"), mapper_tensors(host, "seed0b"))
    a, c = mapper_tensors(host, "seed0a"), mapper_tensors(host, "seed1")
    assert not torch.equal(a["tokens.0.weight"], c["tokens.0.weight"])


def test_sdxl_distillation_learns_tokens_and_pooled(host, tiny_llama, small_caption_file, pack):
    quick(host, tiny_llama, small_caption_file, run="sdxl", out="trained-sdxl", arch="sdxl", steps=120, lr=3e-3)
    h = history(host, "sdxl")
    assert h["mapper_config"]["target"] == "sdxl"
    assert h["final_val_loss"] < h["initial_val_loss"] / 2
    t = mapper_tensors(host, "trained-sdxl")
    assert t["pooled.2.weight"].shape == (1280, 128) and t["tokens.2.weight"].shape == (2048, 128)


def test_resume_with_other_settings_is_refused(host, tiny_llama, small_caption_file):
    quick(host, tiny_llama, small_caption_file, run="mismatch", out="mismatch", steps=10)
    forget_everything(host)
    with pytest.raises(Exception, match=r"train_config.lr \(0.003 then, 0.01 now\)"):
        quick(host, tiny_llama, small_caption_file, run="mismatch", out="mismatch", steps=20, lr=1e-2)


def test_training_never_replaces_a_file_of_another_kind(host, tiny_llama, small_caption_file, mapper_files):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(host.models_dir / "bridges" / "someone-elses.safetensors"))
    with pytest.raises(Exception, match="not a Beyond CLIP mapper written by this pack"):
        quick(host, tiny_llama, small_caption_file, run="clobber", out="someone-elses", steps=5)


# ---- the trained bridge drives the stock KSampler: the shipped workflow and Load Mapper --------------------

def test_shipped_training_workflow_end_to_end(host, pack, tiny_llama, caption_file):
    wf = pack_module(pack, "headless.workflow")
    prompt = wf.to_api(wf.load_workflow(PACK_DIR / "workflows" / "beyond_clip_train_sd15.json"),
                       host.nodes.NODE_CLASS_MAPPINGS)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="BeyondCLIP_TinyCheckpoint", inputs={"arch": "sd15"})
        elif kind == "BeyondCLIP_LLMLoader":
            inputs.update(llm_name=tiny_llama, dtype="fp32")
        elif kind == "BeyondCLIP_TrainMapper":
            assert inputs["seed"] == 0 and inputs["resume"] is True
            inputs.update(captions=caption_file, steps=300, batch_size=16, learning_rate=3e-3, hidden_dim=128,
                          eval_every=100, checkpoint_every=100, val_fraction=0.2, cache_precision="fp32",
                          run_name="workflow", output_name="workflow-mapper")
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
    train_id = next(i for i, n in prompt.items() if n["class_type"] == "BeyondCLIP_TrainMapper")
    encode_id = next(i for i, n in prompt.items() if n["class_type"] == "BeyondCLIP_TextEncode")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "beyond_clip_train_sd15.json", first)
    mapper, name, val_loss = host.node_output(train_id)
    assert name == "workflow-mapper.safetensors" and val_loss < history(host, "workflow")["initial_val_loss"] / 10
    positive = host.node_output(encode_id)[0][0][0]
    assert positive.shape == (1, 77, 768) and positive.dtype == torch.float32

    # queued again after a restart: resumes at the last step (nothing to do), same file, same picture
    again = run_saved_image(host, prompt)
    assert again.png == first.png

    other = json.loads(json.dumps(prompt))
    other[encode_id]["inputs"]["prompt"] = "a purple boat by the sea"
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\ntrained mapper: another prompt changes the pixels by {change:.2f} levels")
    assert change > 0.5

    # the file is listed by Load Mapper at once and gives the same conditioning and picture
    folders = pack_module(pack, "loaders.folders")
    assert "workflow-mapper.safetensors" in folders.list_bridge_files()
    loaded = json.loads(json.dumps(prompt))
    loaded[train_id] = {"class_type": "BeyondCLIP_MapperLoader",
                        "inputs": {"mapper_name": "workflow-mapper.safetensors"}}
    via_loader = run_saved_image(host, loaded)
    assert via_loader.pixels == first.pixels
    assert torch.equal(host.node_output(encode_id)[0][0][0], positive)


# ---- the command line, one process and two gloo processes (DDP) ------------------------------------------

def test_command_line_ddp_on_two_gloo_processes_matches_one_process(host, tiny_llama, small_caption_file):
    quick(host, tiny_llama, small_caption_file, run="cli-source", out="cli-source", steps=1)
    runs = Path(host.folder_paths.get_output_directory()) / "beyond_clip_training"
    for name in ("cli-one", "cli-two"):
        shutil.rmtree(runs / name, ignore_errors=True)
        shutil.copytree(runs / "cli-source" / "cache", runs / name / "cache")
    common = ["--steps", "40", "--batch-size", "8", "--lr", "3e-3", "--hidden-dim", "128", "--val-fraction", "0.2",
              "--eval-every", "20", "--device", "cpu"]
    one = train_cli(host, "mapper", "--run-name", "cli-one", "--out", "cli-one", *common)
    two = train_cli(host, "mapper", "--run-name", "cli-two", "--out", "cli-two", *common, nproc=2)
    ranks = [line for line in two.splitlines() if line.startswith("rank ")]
    print("\n" + "\n".join(ranks))
    assert len(ranks) == 2 and {"rank 0/2", "rank 1/2"} == {line.split(":")[0] for line in ranks}
    assert len({line.split("weights ")[1].split(",")[0] for line in ranks}) == 1, "ranks must hold identical weights"
    assert "all 2 ranks hold identical weights" in two
    h1, h2 = history(host, "cli-one"), history(host, "cli-two")
    assert h2["final_val_loss"] < h2["initial_val_loss"] / 2
    # the global batch is the same, only the gradient sum is split: one process trains the same mapper
    a, b = mapper_tensors(host, "cli-one"), mapper_tensors(host, "cli-two")
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"one process vs two gloo processes: max weight difference {err:.2e}, held-out loss "
          f"{h1['final_val_loss']:.6f} vs {h2['final_val_loss']:.6f}")
    assert err < 1e-4 and abs(h1["final_val_loss"] - h2["final_val_loss"]) < 1e-4 * h1["final_val_loss"] + 1e-6
    assert "step 40/40" in one


# ---- small classifiers ------------------------------------------------------------------------------------

def test_router_training_writes_a_router_the_assistant_lists(host, pack):
    src = PACK_DIR / "data" / "router_instructions.tsv"
    shutil.copy(src, Path(host.folder_paths.get_input_directory()) / "my_router_examples.tsv")
    forget_everything(host)
    ui = host.run({"1": {"class_type": "BeyondCLIP_TrainRouter", "inputs": {
        "examples": "my_router_examples.tsv", "output_name": "my-router", "alpha": 1.0, "bigrams": True,
        "val_fraction": 0.2, "seed": 0}}})
    name, accuracy = host.node_output("1")
    print(f"\nrouter: {ui['1']['text'][0]}")
    assert name == "my-router.router.json" and accuracy > 0.85
    beyond = pack_module(pack, "nodes.beyond_clip")
    assert name in beyond._router_choices()
    router = beyond._load_router(name)
    assert router.predict("draw a lighthouse at dusk")[0] == "draw"
    assert router.predict("what is the capital of france?")[0] == "chat"


@pytest.fixture(scope="module")
def tiny_opt_gill(host, pack):
    """A small OPT and a GILL model for it without a decision model (pack format, random weights)."""
    pack_module(pack, "headless.tiny_llm").write_llm_folder(host.models_dir / "LLM" / "tiny-opt-train", arch="opt")
    gill = pack_module(pack, "bridges.gill")
    files = pack_module(pack, "loaders.gill")
    torch.manual_seed(11)
    config = gill.GILLConfig(llm_dim=64, mapper_hidden=64, mapper_heads=4, encoder_layers=1, decoder_layers=1,
                             mapper_ffn=128, vision_dim=64, ret_dim=16, decision_in=0)
    model = gill.GILLModel(config)
    with torch.no_grad():  # [IMG] rows at the scale of the OPT's own token embeddings (initializer_range 0.02)
        model.input_embeddings.weight.normal_(0, 0.02)
    name = "tiny-gill-nodecision.safetensors"
    pack_module(pack, "loaders.bridge_files").save_bridge(host.models_dir / "bridges" / name, files.KIND,
                                                           config.to_dict(), model.state_dict())
    return "tiny-opt-train", name


def test_gill_decision_training(host, pack, tiny_opt_gill):
    llm, gill_name = tiny_opt_gill
    rows = ["label\ttext"]
    for c, t in itertools.product(COLOURS, THINGS):
        rows.append(f"generate\tdraw me an imaginary {c} {t} as a painting")
        rows.append(f"retrieve\tshow me a real photo of the {c} {t}")
    (Path(host.folder_paths.get_input_directory()) / "gill_decisions.tsv").write_text("\n".join(rows) + "\n")
    forget_everything(host)
    ui = host.run({
        "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": gill_name}},
        "3": {"class_type": "BeyondCLIP_TrainGILLDecision", "inputs": {
            "llm": ["1", 0], "gill": ["2", 0], "examples": "gill_decisions.tsv", "output_name": "tiny-gill-decided",
            "steps": 200, "learning_rate": 1e-2, "val_fraction": 0.25, "seed": 0}}})
    gill, name, f1 = host.node_output("3")
    print(f"\nGILL decision: {ui['3']['text'][0]}")
    assert name == "tiny-gill-decided.safetensors" and f1 >= 0.8
    assert gill.config.decision_in == 64 and gill.inner.decision_model is not None
    gill_nodes = pack_module(pack, "nodes.gill")
    assert name in gill_nodes._gill_choices()
    llm_handle = pack_module(pack, "loaders.llm").load_llm(llm, host.models_dir / "LLM" / llm, "fp32")
    with torch.no_grad():
        states = pack_module(pack, "engine.gill").img_states(llm_handle, gill, "show me a real photo of the red fox")
        assert gill.inner.retrieve_probability(states) > 0.5
        states = pack_module(pack, "engine.gill").img_states(llm_handle, gill,
                                                             "draw me an imaginary red fox as a painting")
        assert gill.inner.retrieve_probability(states) < 0.5


def test_gill_mapper_distillation(host, pack, tiny_opt_gill, caption_file):
    llm, gill_name = tiny_opt_gill
    forget_everything(host)
    ui = host.run({
        "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": gill_name}},
        "6": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}},
        "3": {"class_type": "BeyondCLIP_TrainGILLMapper", "inputs": {
            "llm": ["1", 0], "gill": ["2", 0], "clip": ["6", 1], "captions": caption_file, "run_name": "gill",
            "output_name": "tiny-gill-trained", "steps": 400, "batch_size": 8, "learning_rate": 3e-3,
            "loss": "gill_l2", "val_fraction": 0.2, "seed": 0, "resume": True, "checkpoint_every": 50,
            "eval_every": 50}},
        "4": {"class_type": "BeyondCLIP_GILLEncode", "inputs": {"llm": ["1", 0], "gill": ["3", 0],
                                                                "prompt": "a red fox in the snow"}},
        "99": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}}})
    h = history(host, "gill")
    # The floor: GILL's loss is a norm (not squared), and the error left is the caption-specific part of CLIP's
    # encoding, which is small here (a random 2-layer OPT's [IMG] states vary by ~2 % across captions). The
    # mapper must beat the best caption-blind answer, the mean training target, so it reads the caption.
    data = pack_module(pack, "loaders.run_folder").read_cache(h["cache"])
    train_idx, val_idx = pack_module(pack, "bridges.training.data").split_indices(len(data), 0.2, 0)
    blind = (data.targets[val_idx] - data.targets[train_idx].mean(0)).norm(dim=-1).mean().item()
    print(f"\nGILL mapper: {ui['3']['text'][0]}; the mean training target scores {blind:.5f} held out")
    assert h["final_val_loss"] < h["initial_val_loss"] / 4 and h["final_val_loss"] < blind
    assert host.node_output("4")[0][0][0].shape == (1, 77, 768)
    assert "tiny-gill-trained.safetensors" in pack_module(pack, "nodes.gill")._gill_choices()


def test_gill_img_tokens_train_with_the_mapper(host, pack, tiny_opt_gill, small_caption_file):
    """train_img_tokens: the 8 [IMG] rows train too, through the frozen OPT each step. At step 0 the loss equals
    the cached-states path's (the same inputs reach the mapper); the rows move; the result encodes."""
    from safetensors.torch import load_file
    llm, gill_name = tiny_opt_gill

    def train(run, rows, steps):
        forget_everything(host)
        host.run({
            "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
            "2": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": gill_name}},
            "6": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}},
            "3": {"class_type": "BeyondCLIP_TrainGILLMapper", "inputs": {
                "llm": ["1", 0], "gill": ["2", 0], "clip": ["6", 1], "captions": small_caption_file, "run_name": run,
                "output_name": run, "steps": steps, "batch_size": 8, "learning_rate": 2e-3, "loss": "gill_l2",
                "val_fraction": 0.2, "seed": 0, "resume": False, "checkpoint_every": 50, "eval_every": 20,
                "train_img_tokens": rows}},
            "4": {"class_type": "BeyondCLIP_GILLEncode", "inputs": {"llm": ["1", 0], "gill": ["3", 0],
                                                                    "prompt": "a red fox in the snow"}},
            "99": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}}})
        return history(host, run), load_file(str(host.models_dir / "bridges" / f"{run}.safetensors"))

    fixed, fixed_file = train("gill-rows-fixed", False, 1)
    h, written = train("gill-rows", True, 60)
    print(f"\nGILL with [IMG] rows trained: held-out {h['initial_val_loss']:.4f} -> {h['final_val_loss']:.4f}")
    assert h["initial_val_loss"] == pytest.approx(fixed["initial_val_loss"], rel=1e-5)
    assert h["final_val_loss"] < h["initial_val_loss"] / 2 and h["img_tokens_trained"] is True
    assert not torch.equal(written["input_embeddings.weight"], fixed_file["input_embeddings.weight"])
    assert host.node_output("4")[0][0][0].shape == (1, 77, 768)

