"""MUMU stage 2: the stage-1 connector trained on, with LoRAs on Idefics2's text attention and on the SDXL UNet's
attention, by the frozen UNet's denoising loss on captioned pictures whose crops sit before their words. The
frozen weights stay byte-identical; the three outputs drive the stock KSampler; the UNet LoRA is read by the stock
LoraLoaderModelOnly and the Idefics2 LoRA by peft and by Load Idefics2 LoRA; resume is exact."""
import copy
import itertools
from pathlib import Path

import pytest
import torch
from conftest import (
    check_golden_pixels,
    forget_everything,
    history,
    pack_module,
    pixel_change,
    run_saved_image,
    same,
    snapshot,
)
from safetensors.torch import load_file

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}
SHAPES = ["square", "dot"]


@pytest.fixture(scope="module")
def mumu_pairs(host, mumu_input_images):
    """input/mumu_stage2/pairs.tsv: 6 pictures, each caption with a crop placed before the word it shows."""
    from PIL import Image, ImageDraw
    folder = Path(host.folder_paths.get_input_directory()) / "mumu_stage2"
    folder.mkdir(parents=True, exist_ok=True)
    crops = {"man": mumu_input_images["man"], "dog": mumu_input_images["dog"]}
    lines = []
    for k, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        img = Image.new("RGB", (64, 64), (128, 128, 128))
        box = (16, 16, 48, 48)
        (ImageDraw.Draw(img).ellipse if shape == "dot" else ImageDraw.Draw(img).rectangle)(box, fill=COLOURS[colour])
        img.save(folder / f"{colour}_{shape}.png")
        who = list(crops)[k % 2]
        lines.append(f"{colour}_{shape}.png\ta <image> {who} with a {colour} {shape}\t../{crops[who]}")
    (folder / "pairs.tsv").write_text("# picture<TAB>caption<TAB>crops\n" + "\n".join(lines) + "\n")
    return "mumu_stage2/pairs.tsv"


def train_node(pairs, *, run, out, steps=12, resume=True, lrs=(1e-3, 1e-3, 1e-3), seed=0):
    return {"class_type": "BeyondCLIP_TrainMUMU", "inputs": {
        "idefics2": ["1", 0], "connector": ["2", 0], "model": ["6", 0], "vae": ["6", 2], "pairs": pairs,
        "run_name": run, "output_name": out, "steps": steps, "batch_size": 2, "connector_lr": lrs[0],
        "idefics2_lora_lr": lrs[1], "unet_lora_lr": lrs[2], "rank": 4, "resolution": 64, "image_resolution": 32,
        "val_fraction": 0.34, "seed": seed, "resume": resume, "checkpoint_every": 4, "eval_every": 4}}


def graph(idefics2, connector, pairs, prompt="a <man> with a red square", **train):
    g = {
        "1": {"class_type": "BeyondCLIP_MUMULoadIdefics2", "inputs": {"idefics2_name": idefics2, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_MUMULoadConnector", "inputs": {"connector_name": connector}},
        "6": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}},
        "20": train_node(pairs, **train),
        "30": {"class_type": "LoadImage", "inputs": {"image": "mumu_man.png"}},
        "31": {"class_type": "BeyondCLIP_MUMUReferenceImage", "inputs": {"image": ["30", 0], "name": "man"}},
        "4": {"class_type": "BeyondCLIP_MUMUEncode", "inputs": {
            "idefics2": ["20", 0], "connector": ["20", 1], "prompt": prompt, "negative_prompt": "",
            "negative": "zeros", "image_resolution": 32, "token_budget": 0, "width": 1024, "height": 1024,
            "target_width": 1024, "target_height": 1024, "images": ["31", 0], "model": ["20", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["20", 2], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0], "seed": 3,
            "steps": 6, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["6", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "mumu_stage2"}},
    }
    return g


def stock_graph(trained, idefics2, connector, unet_lora, idefics2_lora):
    """The sampling half with the written files read by the loaders: Load Connector, Apply Idefics2 LoRA and
    the stock LoraLoaderModelOnly in place of the trainer's outputs."""
    g = copy.deepcopy(trained)
    del g["20"]
    g["2"]["inputs"]["connector_name"] = connector
    g["21"] = {"class_type": "BeyondCLIP_MUMUIdefics2LoRA", "inputs": {"idefics2": ["1", 0], "lora_name": idefics2_lora,
                                                                       "strength": 1.0, "mode": "unmerged"}}
    g["22"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["6", 0], "lora_name": unet_lora,
                                                               "strength_model": 1.0}}
    g["4"]["inputs"].update(idefics2=["21", 0], connector=["2", 0], model=["22", 0])
    g["7"]["inputs"]["model"] = ["22", 0]
    return g


def test_mumu_stage2_trains_the_three_parts_and_drives_ksampler(host, pack, tiny_idefics2, mumu_connector_file,
                                                                mumu_pairs):
    forget_everything(host)
    vlm = pack_module(pack, "loaders.mumu").load_idefics2(tiny_idefics2, host.models_dir / "LLM" / tiny_idefics2,
                                                          "fp32")
    unet = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sdxl")[0].model.diffusion_model
    vlm_before, unet_before = snapshot(vlm.inner), snapshot(unet)
    stage1 = load_file(str(host.models_dir / "bridges" / mumu_connector_file))

    g = graph(tiny_idefics2, mumu_connector_file, mumu_pairs, run="mumu-s2", out="mumu-s2")
    # training alone first (sampling with the LoRA'd MODEL patches the shared UNet in place until ComfyUI unloads it)
    host.run({k: g[k] for k in ("1", "2", "6", "20")})
    assert same(snapshot(vlm.inner), vlm_before) and same(snapshot(unet), unet_before)
    first = run_saved_image(host, g)  # resumes at the last step: nothing more is trained
    check_golden_pixels(host, "mumu_train_sdxl.json", first)
    h = history(host, "mumu-s2")
    vals = [e["val_loss"] for e in h["history"] if "val_loss" in e]
    print(f"\nMUMU stage 2: {host.node_output('20')[3]}; held-out loss every 4 steps {[round(v, 4) for v in vals]}")
    assert h["steps"] == 12 and h["val_examples"] == 2 and h["train_examples"] == 4
    # held-out loss with a fixed draw of noise and timesteps (training losses draw anew each step: too noisy
    # over 4 pictures to compare)
    assert h["final_val_loss"] < 0.95 * h["initial_val_loss"]
    _, _, _, connector_name, unet_lora_name, val_loss = host.node_output("20")
    assert (connector_name, unet_lora_name) == ("mumu-s2.safetensors", "mumu-s2-unet-lora.safetensors")
    assert val_loss == pytest.approx(h["final_val_loss"])

    # trained: the connector moved, both LoRAs off zero
    connector = load_file(str(host.models_dir / "bridges" / connector_name))
    assert connector.keys() == stage1.keys() and not same(connector, stage1)
    unet_lora = load_file(str(host.models_dir / "loras" / unet_lora_name))
    ups = [k for k in unet_lora if k.endswith("lora_up.weight")]
    assert ups and all(k.startswith("lora_unet_") for k in unet_lora) and all(unet_lora[k].abs().sum() > 0 for k in ups)
    folder = host.models_dir / "LLM" / "mumu-s2-idefics2-lora"
    peft_weights = load_file(str(folder / "adapter_model.safetensors"))
    assert all(".text_model.layers." in k for k in peft_weights)
    assert all(peft_weights[k].abs().sum() > 0 for k in peft_weights if ".lora_B." in k)

    # the files, read back by Load Connector, Apply Idefics2 LoRA and the stock LoraLoaderModelOnly, give the
    # trainer's own picture
    again = run_saved_image(host, stock_graph(g, tiny_idefics2, connector_name, unet_lora_name, folder.name))
    assert again.pixels == first.pixels

    # the training changes the picture: the stage-1 connector with no LoRA draws another one
    before = copy.deepcopy(g)
    del before["20"]
    before["4"]["inputs"].update(idefics2=["1", 0], connector=["2", 0], model=["6", 0])
    before["7"]["inputs"]["model"] = ["6", 0]
    change = pixel_change(run_saved_image(host, before).pixels, first.pixels)
    print(f"stage 2 changes the picture by {change:.2f} levels")
    assert change > 0.1


def test_the_idefics2_lora_is_a_peft_folder(host, pack, tiny_idefics2, mumu_connector_file, mumu_pairs):
    """peft itself reads the written folder into Idefics2 and gives the pack's encoding."""
    import peft  # the test extras install it: missing, the test fails
    from transformers import Idefics2Model
    folder = host.models_dir / "LLM" / "mumu-s2-idefics2-lora"
    if not folder.exists():
        forget_everything(host)
        run_saved_image(host, graph(tiny_idefics2, mumu_connector_file, mumu_pairs, run="mumu-s2", out="mumu-s2"))
    base = Idefics2Model.from_pretrained(str(host.models_dir / "LLM" / tiny_idefics2)).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        plain = base.text_model(input_ids=ids).last_hidden_state
        model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        adapted = model.base_model.model.text_model(input_ids=ids).last_hidden_state
    from safetensors.torch import load_file as read
    weights = read(str(folder / "adapter_model.safetensors"))
    a = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    layer = model.base_model.model.text_model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["default"].weight, weights[a])
    assert (adapted - plain).abs().max() > 1e-6
    # the pack's own reading of the folder (unmerged, as in training) gives peft's states
    files = pack_module(pack, "loaders.mumu")
    vlm = files.load_idefics2(tiny_idefics2, host.models_dir / "LLM" / tiny_idefics2, "fp32")
    ours_vlm = files.apply_idefics2_lora(vlm, files.load_idefics2_lora(folder, vlm), 1.0, "unmerged")
    module = ours_vlm.module()
    with torch.no_grad(), ours_vlm.attach(module):
        ours = module.text_model(input_ids=ids).last_hidden_state
    err = (ours - adapted).abs().max().item()
    print(f"\nthe pack's Idefics2 LoRA vs peft's on the trained folder: max abs error {err:.2e}")
    assert err < 1e-5 and err < (adapted - plain).abs().max().item() / 10


def test_mumu_stage2_resume_is_exact(host, tiny_idefics2, mumu_connector_file, mumu_pairs):
    def train(run, steps, resume=True):
        forget_everything(host)
        g = graph(tiny_idefics2, mumu_connector_file, mumu_pairs, run=run, out=run, steps=steps, resume=resume)
        host.run({k: g[k] for k in ("1", "2", "6", "20")})

    train("mumu-s2-straight", 8, resume=False)
    train("mumu-s2-halves", 4, resume=False)
    train("mumu-s2-halves", 8)
    assert history(host, "mumu-s2-halves")["history"] == history(host, "mumu-s2-straight")["history"]
    for folder, name in (("bridges", "{}.safetensors"), ("loras", "{}-unet-lora.safetensors"),
                         ("LLM", "{}-idefics2-lora/adapter_model.safetensors")):
        a, b = (load_file(str(host.models_dir / folder / name.format(r)))
                for r in ("mumu-s2-straight", "mumu-s2-halves"))
        assert same(a, b), folder


def test_mumu_stage2_refusals(host, pack, tiny_idefics2, mumu_connector_file, mumu_pairs):
    g = graph(tiny_idefics2, mumu_connector_file, mumu_pairs, run="mumu-s2-bad", out="mumu-s2-bad", steps=1)
    train_only = {k: g[k] for k in ("1", "2", "6", "20")}
    # an SD1.x MODEL: the connector writes SDXL conditioning
    sd1 = copy.deepcopy(train_only)
    sd1["6"]["inputs"]["arch"] = "sd15"
    forget_everything(host)
    with pytest.raises(Exception,
                       match=r"MUMU connector .*tiny-mumu-connector.safetensors. "
                             r"produces 2048-wide.*MODEL expects 768"):
        host.run(sd1)
    # a file of someone else's under the UNet LoRA's name is never replaced
    foreign = host.models_dir / "loras" / "mumu-s2-bad-unet-lora.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(foreign))
    forget_everything(host)
    with pytest.raises(Exception,
                       match=r"mumu-s2-bad-unet-lora.safetensors exists and is not a MUMU UNet LoRA "
                             r"written by this pack"):
        host.run(train_only)
    assert load_file(str(foreign)).keys() == {"x"}
    # a caption whose crops do not match its <image> placeholders is refused by line
    folder = Path(host.folder_paths.get_input_directory()) / "mumu_stage2"
    (folder / "bad.tsv").write_text("red_square.png\ta <image> man and a <image> dog\t../mumu_man.png\n"
                                    "blue_dot.png\ta dog\n")
    bad = copy.deepcopy(train_only)
    bad["20"]["inputs"].update(pairs="mumu_stage2/bad.tsv", output_name="mumu-s2-bad2")
    forget_everything(host)
    with pytest.raises(Exception, match=r"<image> #2"):
        host.run(bad)


# ---- the shipped workflow: stage 1 -> stage 2 -> Encode (MUMU) -> KSampler -----------------------------------

def test_shipped_mumu_training_workflow_end_to_end(host, pack, tiny_idefics2, mumu_pairs, mumu_input_images):
    wf = pack_module(pack, "headless.workflow")
    prompt = wf.to_api(wf.load_workflow(Path(__file__).resolve().parents[1] / "workflows" / "mumu_train_sdxl.json"),
                       host.nodes.NODE_CLASS_MAPPINGS)
    captions = "mumu_workflow_captions.tsv"
    words = [f"a {c} {s} on grey" for c, s in itertools.product(["red", "blue", "green", "white"], ["square", "dot"])]
    lines = words + [f"a <image> man and a {w}\t{mumu_input_images['man']}" for w in words[:4]]
    (Path(host.folder_paths.get_input_directory()) / captions).write_text("\n".join(lines) + "\n")
    ids = {}
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        ids[kind] = node_id
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="BeyondCLIP_TinyCheckpoint", inputs={"arch": "sdxl"})
        elif kind == "BeyondCLIP_MUMULoadIdefics2":
            inputs.update(idefics2_name=tiny_idefics2, dtype="fp32")
        elif kind == "BeyondCLIP_TrainMUMUConnector":
            assert inputs["seed"] == 0 and inputs["resume"] is True
            inputs.update(captions=captions, steps=150, batch_size=8, learning_rate=2e-3, width=64, depth=2, heads=4,
                          image_resolution=32, probes=16, val_fraction=0.25, checkpoint_every=50, eval_every=50,
                          cache_precision="fp32", run_name="wf-mumu-1", output_name="wf-mumu-connector")
        elif kind == "BeyondCLIP_TrainMUMU":
            assert (inputs["connector_lr"], inputs["idefics2_lora_lr"], inputs["unet_lora_lr"], inputs["rank"]) == \
                (1e-5, 3e-6, 5e-6, 8), "MUMU's learning rates and rank"
            inputs.update(pairs=mumu_pairs, steps=8, batch_size=2, connector_lr=1e-3, idefics2_lora_lr=1e-3,
                          unet_lora_lr=1e-3, rank=4, resolution=64, image_resolution=32, val_fraction=0.34,
                          checkpoint_every=4, eval_every=4, run_name="wf-mumu-2", output_name="wf-mumu")
        elif kind == "LoadImage":
            inputs["image"] = mumu_input_images["man"]
        elif kind == "BeyondCLIP_MUMUEncode":
            inputs["image_resolution"] = 32
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 6
    forget_everything(host)
    first = run_saved_image(host, prompt)
    one, two = history(host, "wf-mumu-1"), history(host, "wf-mumu-2")
    print(f"\nworkflow: stage 1 held-out {one['initial_val_loss']:.4f} -> {one['final_val_loss']:.4f}; stage 2 "
          f"{two['initial_val_loss']:.4f} -> {two['final_val_loss']:.4f}")
    assert one["final_val_loss"] < one["initial_val_loss"] and two["final_val_loss"] < two["initial_val_loss"]
    positive = host.node_output(ids["BeyondCLIP_MUMUEncode"])[0][0]
    assert positive[0].shape[0] == 1 and positive[0].shape[2] == 2048 and \
        positive[1]["pooled_output"].shape == (1, 1280)
    assert first.path.name.startswith("MUMU_trained")
    for path in ("bridges/wf-mumu.safetensors", "loras/wf-mumu-unet-lora.safetensors",
                 "LLM/wf-mumu-idefics2-lora/adapter_config.json"):
        assert (host.models_dir / path).is_file(), path

    # queued again after a restart: both runs resume at their last step, the same picture
    forget_everything(host)
    assert run_saved_image(host, prompt).png == first.png
    other = copy.deepcopy(prompt)
    other[ids["BeyondCLIP_MUMUEncode"]]["inputs"]["prompt"] = "a <man> man and a green dot on grey"
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"another prompt changes the picture by {change:.2f} levels")
    assert change > 0.5
