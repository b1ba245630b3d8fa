"""MUMU: interleaved word + image prompts through Idefics2 (no perceiver) and the connector into SDXL.

Unit tests of the prompt syntax, image preparation and token budget; parity of the perceiver-less encoding with
transformers' own merge and of the LoRA with peft; the shipped workflows end to end in the real host with a small
Idefics2 folder and the small SDXL-like model; the stock LoRA loaders reading the MUMU UNet LoRA; bad input.
"""
import copy
import json
import logging
import shutil

import pytest
import torch
from conftest import (
    PACK_DIR,
    api_workflow,
    check_golden_pixels,
    host_module,
    node_of,
    pack_module,
    pixel_change,
    run_saved_image,
)

WORKFLOWS = PACK_DIR / "workflows"
ENCODE = "BeyondCLIP_MUMUEncode"
TINY_RES = 32  # 4 px patches -> 8 x 8 = 64 tokens per image


@pytest.fixture(scope="module")
def mumu(pack):
    return pack_module(pack, "bridges.mumu")


@pytest.fixture(scope="module")
def files(pack):
    return pack_module(pack, "loaders.mumu")


@pytest.fixture(scope="module")
def vlm(host, files, tiny_idefics2):
    return files.load_idefics2(tiny_idefics2, host.models_dir / "LLM" / tiny_idefics2, "fp32")


def picture(h, w, c=3, seed=0):
    return torch.rand(h, w, c, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------------- parity

def test_perceiverless_encoding_matches_transformers_own_merge(host, mumu, files, vlm, tiny_idefics2):
    """Our sequence + scatter of per-patch features == Idefics2Model's inputs_merger fed the same features."""
    from transformers import Idefics2Model
    reference = Idefics2Model.from_pretrained(str(host.models_dir / "LLM" / tiny_idefics2)).eval()
    assert vlm.inner.connector.perceiver_resampler is None, "the perceiver is dropped at load"
    grid, res = files.grid_for(vlm, TINY_RES)
    assert grid == 8
    segments = mumu.bind_placeholders("a <man> man and his <dog> dog, <man> again", ["man", "dog"])
    seq = mumu.build_sequence(vlm.tokenizer, segments, grid, context=vlm.context)
    assert seq.input_ids.shape[1] == seq.text_tokens + 3 * 64
    fake = vlm.tokenizer.convert_tokens_to_ids(mumu.FAKE_TOKEN)
    for span in seq.spans:  # each image framed like Idefics2's processor frames it
        assert seq.input_ids[0, span.start - 1] == fake and seq.input_ids[0, span.start + 64] == fake
    pixels = torch.stack([mumu.prepare_image(picture(40, 30, seed=s), res, vlm.image_mean, vlm.image_std)
                          for s in (1, 2)])
    with torch.no_grad():
        ours = mumu.encode(vlm.inner, seq, pixels, hidden_layer=-1)
        features = reference.connector.modality_projection(
            reference.vision_model(pixel_values=pixels).last_hidden_state)
        per_occurrence = torch.stack([features[s.image] for s in seq.spans])
        # transformers' own merge of precomputed image features (its forward's keyword for them has changed
        # name and type across releases; the merger itself has kept its signature since 4.40)
        merged = reference.inputs_merger(input_ids=seq.input_ids,
                                         inputs_embeds=reference.text_model.get_input_embeddings()(seq.input_ids),
                                         image_hidden_states=per_occurrence)
        theirs = reference.text_model(inputs_embeds=merged, output_hidden_states=True,
                                      use_cache=False).hidden_states[-1]
    assert ours.shape == (1, seq.input_ids.shape[1], 64)
    err = (ours - theirs).abs().max().item()
    print(f"\nperceiver-less encoding vs transformers' merge: max abs error {err:.2e}")
    assert err < 1e-5
    # Text only, no images: the plain text model's states.
    seq = mumu.build_sequence(vlm.tokenizer, ["a dog"], grid, context=vlm.context)
    with torch.no_grad():
        assert torch.allclose(mumu.encode(vlm.inner, seq, None, -2),
                              reference(input_ids=seq.input_ids, output_hidden_states=True).hidden_states[-2],
                              atol=1e-5)


def test_idefics2_lora_matches_peft_merged_and_unmerged(host, mumu, files, vlm, tiny_idefics2, mumu_idefics2_lora):
    import peft  # the test extras install it: missing, the test fails
    from transformers import Idefics2ForConditionalGeneration
    patching = pack_module(host.pack, "loaders.patcher")
    base = Idefics2ForConditionalGeneration.from_pretrained(str(host.models_dir / "LLM" / tiny_idefics2))
    with_peft = peft.PeftModel.from_pretrained(base, str(host.models_dir / "LLM" / mumu_idefics2_lora)).eval()
    lora = files.load_idefics2_lora(host.models_dir / "LLM" / mumu_idefics2_lora, vlm)
    assert any(p.startswith("vision_model.") for p in lora.factors) and \
        any(p.startswith("text_model.") for p in lora.factors)
    assert any(p.startswith("connector.modality_projection") for p in lora.factors)
    grid, res = files.grid_for(vlm, TINY_RES)
    seq = mumu.build_sequence(vlm.tokenizer, mumu.bind_placeholders("a <image> dog", [""]), grid, context=vlm.context)
    pixels = mumu.prepare_image(picture(30, 50), res, vlm.image_mean, vlm.image_std)[None]

    def run(handle):
        model = patching.load_to_device(handle.patcher)
        with torch.no_grad(), handle.attach(model):
            return mumu.encode(model, seq, pixels, -1)

    with torch.no_grad():
        expected = mumu.encode(with_peft.base_model.model.model, seq, pixels, -1)
    plain = run(vlm)
    merged = run(files.apply_idefics2_lora(vlm, lora, 1.0, "merged"))
    unmerged = run(files.apply_idefics2_lora(vlm, lora, 1.0, "unmerged"))
    errors = [(x - expected).abs().max().item() for x in (merged, unmerged)]
    print(f"\nIdefics2 LoRA vs peft: merged {errors[0]:.2e}, unmerged {errors[1]:.2e}; "
          f"LoRA effect {(expected - plain).abs().max().item():.3f}")
    assert max(errors) < 1e-4
    assert (expected - plain).abs().max() > 1e-2
    assert torch.equal(run(vlm), plain), "the plain Idefics2 is unchanged after the merged clone ran"


# --------------------------------------------------------------------------------------- shipped workflows

def workflow_prompt(host, pack, name, *, idefics2, connector, idefics2_lora, unet_lora, images, seed=None):
    """The shipped UI-format workflow as an API prompt, pointed at the small test models and pictures."""
    prompt = api_workflow(host, pack, name)
    pictures = iter(images)
    for node_id, node in sorted(prompt.items(), key=lambda item: int(item[0])):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}}
        elif kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = unet_lora
        elif kind == "BeyondCLIP_MUMULoadIdefics2":
            inputs.update(idefics2_name=idefics2, dtype="fp32")
        elif kind == "BeyondCLIP_MUMUIdefics2LoRA":
            inputs["lora_name"] = idefics2_lora
        elif kind == "BeyondCLIP_MUMULoadConnector":
            inputs["connector_name"] = connector
        elif kind == "LoadImage":
            inputs["image"] = next(pictures)
        elif kind == ENCODE:
            inputs["image_resolution"] = TINY_RES
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=8, **({"seed": seed} if seed is not None else {}))
    return prompt


@pytest.mark.parametrize("name,pictures,named", [
    ("mumu_sdxl_two_subjects.json", ("man", "dog", "style"), True),
    ("mumu_style_transfer.json", ("dog", "style"), False),
    ("mumu_with_community_finetune.json", ("man",), False),
])
def test_shipped_workflow_end_to_end(host, pack, tiny_idefics2, mumu_connector_file, mumu_idefics2_lora,
                                     mumu_unet_lora, mumu_input_images, name, pictures, named):
    meta = json.loads((WORKFLOWS / name).read_text())["extra"]["beyond_clip"]
    assert meta["arch"] == "sdxl" and meta["models"]["loras"] and meta["about"]
    images = [mumu_input_images[p] for p in pictures]
    prompt = workflow_prompt(host, pack, name, idefics2=tiny_idefics2, connector=mumu_connector_file,
                             idefics2_lora=mumu_idefics2_lora, unet_lora=mumu_unet_lora, images=images)
    encode = prompt[node_of(prompt, ENCODE)]["inputs"]
    assert ("<image>" not in encode["prompt"]) == named
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, name, first)
    positive, negative = host.node_output(node_of(prompt, ENCODE))
    tokens, extra = positive[0]
    assert tokens.dtype == torch.float32 and tokens.shape[0] == 1 and tokens.shape[2] == 2048
    assert tokens.shape[1] > 64 * len(pictures), "one token per patch: 64 per image at 32 px, plus the words"
    assert torch.isfinite(tokens).all()
    assert extra["pooled_output"].shape == (1, 1280)
    assert (extra["width"], extra["target_height"], extra["crop_w"]) == (1024, 1024, 0)
    assert negative[0][0].shape[2] == 2048 and negative[0][0].shape[1] < tokens.shape[1]

    again = run_saved_image(host, prompt)
    assert again.png == first.png, "same seed, prompt and images must give a byte-identical image"

    other = copy.deepcopy(prompt)
    loaders = sorted((i for i, n in other.items() if n["class_type"] == "LoadImage"), key=int)
    unused = [v for v in mumu_input_images.values() if v not in images]
    if unused:
        other[loaders[0]]["inputs"]["image"] = unused[0]
    else:  # every picture is in use: swap the first two
        other[loaders[0]]["inputs"]["image"], other[loaders[1]]["inputs"]["image"] = images[1], images[0]
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\n{name}: another reference image changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "a different reference image must change the image"


# ------------------------------------------------------------------------------------------ SDXL UNet LoRA

def test_stock_lora_loaders_read_the_mumu_unet_lora(host, pack, files, mumu_unet_lora, caplog):
    """The kohya-format file maps completely onto the SDXL UNet, and the stock nodes change the image with it."""
    import comfy.lora
    import comfy.utils
    model = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sdxl")[0]
    lora = comfy.utils.load_torch_file(str(host.models_dir / "loras" / mumu_unet_lora), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    targets = files.unet_lora_targets(model.model.state_dict())
    assert len(targets) >= 8 and set(patches) == set(targets)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]

    def graph(node, strength):
        g = {
            "1": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a man and his dog"}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 3, "steps": 6, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "mumu_lora"}},
        }
        if node == "LoraLoader":
            g["2"] = {"class_type": node, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": mumu_unet_lora,
                                                     "strength_model": strength, "strength_clip": strength}}
            g["3"]["inputs"]["clip"] = ["2", 1]
        else:
            g["2"] = {"class_type": node, "inputs": {"model": ["1", 0], "lora_name": mumu_unet_lora,
                                                     "strength_model": strength}}
        return g

    without = run_saved_image(host, graph("LoraLoaderModelOnly", 0.0))
    with_model_only = run_saved_image(host, graph("LoraLoaderModelOnly", 1.0))
    change = pixel_change(with_model_only.pixels, without.pixels)
    print(f"\nMUMU UNet LoRA through LoraLoaderModelOnly changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "the stock LoraLoaderModelOnly must change the image"
    stock = run_saved_image(host, graph("LoraLoader", 1.0))  # another graph: compare pixels, not files
    assert stock.pixels == with_model_only.pixels, "LoraLoader applies the same UNet patch"
    restored = run_saved_image(host, graph("LoraLoaderModelOnly", 0.0))
    assert restored.png == without.png, "the unpatched model is restored"


# ---------------------------------------------------------------------------------------------- nodes, bad input

def encode_graph(idefics2, connector, prompt, pictures=(), names=None, **overrides):
    g = {
        "1": {"class_type": "BeyondCLIP_MUMULoadIdefics2", "inputs": {"idefics2_name": idefics2, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_MUMULoadConnector", "inputs": {"connector_name": connector}},
        "4": {"class_type": ENCODE, "inputs": {"idefics2": ["1", 0], "connector": ["2", 0], "prompt": prompt,
                                               "negative_prompt": "", "negative": "encode negative text",
                                               "image_resolution": TINY_RES, "token_budget": 0, "width": 1024,
                                               "height": 1024, "target_width": 1024, "target_height": 1024}},
        "99": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}},
    }
    previous = None
    for i, picture_name in enumerate(pictures):
        g[f"l{i}"] = {"class_type": "LoadImage", "inputs": {"image": picture_name}}
        g[f"r{i}"] = {"class_type": "BeyondCLIP_MUMUReferenceImage",
                      "inputs": {"image": [f"l{i}", 0], "name": (names or [""] * len(pictures))[i]}}
        if previous:
            g[f"r{i}"]["inputs"]["images"] = [previous, 0]
        previous = f"r{i}"
    if previous:
        g["4"]["inputs"]["images"] = [previous, 0]
    g["4"]["inputs"].update(overrides)
    return g


def run_error(host, g):
    host.reset_cache()
    with pytest.raises(host_module.HostError) as e:
        host.run(g)
    return str(e.value)


def test_text_only_prompt_and_token_budget(host, tiny_idefics2, mumu_connector_file, mumu_input_images):
    host.run(encode_graph(tiny_idefics2, mumu_connector_file, "a man and his dog on a sofa"))
    text_only = host.node_output("4")[0][0][0]
    assert text_only.shape[2] == 2048 and text_only.shape[1] < 20
    pics = [mumu_input_images["man"], mumu_input_images["dog"]]
    host.run(encode_graph(tiny_idefics2, mumu_connector_file, "a <image> man and his <image> dog", pics))
    full = host.node_output("4")[0][0][0]
    text = full.shape[1] - 2 * 64
    host.run(encode_graph(tiny_idefics2, mumu_connector_file, "a <image> man and his <image> dog", pics,
                          token_budget=text + 2 * 16))
    pooled = host.node_output("4")[0][0][0]
    assert pooled.shape[1] == text + 2 * 16, "each 8x8 grid pooled to 4x4"
    assert torch.equal(pooled[:, :3], full[:, :3]), "the words before the first image are untouched"
    error = run_error(host, encode_graph(tiny_idefics2, mumu_connector_file, "a <image> man and his <image> dog",
                                         pics, token_budget=text))
    assert f"token_budget {text}" in error and f"{text} text tokens + 2 image(s)" in error


def test_zero_and_ten_images_and_the_context_limit(host, tiny_idefics2, mumu_connector_file, mumu_input_images):
    error = run_error(host, encode_graph(tiny_idefics2, mumu_connector_file, "a <image> man and his <dog> dog"))
    assert "<image> #1" in error and "no unnamed image is connected" in error
    ten = [mumu_input_images["man"]] * 10
    prompt = " and ".join(["a <image> thing"] * 10)
    error = run_error(host, encode_graph(tiny_idefics2, mumu_connector_file, prompt, ten))
    # 10 x 64 patch tokens do not fit the tiny Idefics2's 512: refused with the numbers, before running it.
    assert "10 image(s) x 64 patch tokens" in error and "context of 512" in error and "at most" in error
    host.reset_cache()
    host.run(encode_graph(tiny_idefics2, mumu_connector_file, prompt, ten, image_resolution=16))
    assert host.node_output("4")[0][0][0].shape[1] > 10 * 16


def test_images_of_any_channel_layout_and_size_through_the_node(host, pack, files, vlm, mumu_connector_file):
    nodes = pack_module(pack, "nodes.mumu")
    connector = files.load_connector(host.models_dir / "bridges" / mumu_connector_file)
    rgb = picture(48, 64, seed=4)

    def encode(image):
        images = nodes.ReferenceImage().add(image[None], "pet")[0]
        with torch.inference_mode():
            positive, _ = nodes.Encode().encode(vlm, connector, "a <pet> dog", "", "zeros", TINY_RES, 0,
                                                1024, 1024, 1024, 1024, images=images)
        return positive[0][0]

    reference = encode(rgb)
    gray = rgb.mean(-1, keepdim=True)
    assert torch.equal(encode(gray), encode(gray.expand(48, 64, 3).contiguous()))
    assert torch.equal(encode(torch.cat([rgb, torch.ones(48, 64, 1)], -1)), reference), "opaque RGBA = RGB"
    assert encode(torch.rand(3000, 4000, 3)).shape == reference.shape, "very large images are resized"
    with pytest.raises(ValueError, match="batch of 2"):
        nodes.ReferenceImage().add(torch.rand(2, 8, 8, 3), "pet")
    # pictures no model can read: refused at the node that got them (a NaN one made a NaN conditioning)
    nan = rgb.clone()
    nan[3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match="reference image 'pet': the picture holds NaN or infinite pixel values"):
        nodes.ReferenceImage().add(nan[None], "pet")
    with pytest.raises(ValueError, match="reference image #1 \\(unnamed\\) is 0x8 pixels"):
        nodes.ReferenceImage().add(torch.rand(1, 0, 8, 3), "")
    # and where the encoder reads them, whatever made them
    with pytest.raises(ValueError, match="'pet'.* holds NaN"), torch.inference_mode():
        nodes.Encode().encode(vlm, connector, "a <pet> dog", "", "zeros", TINY_RES, 0, 1024, 1024, 1024, 1024,
                              images=[("pet", nan)])
    with pytest.raises(ValueError, match="opens a placeholder that never closes"), torch.inference_mode():
        nodes.Encode().encode(vlm, connector, "a <pet dog", "", "zeros", TINY_RES, 0, 1024, 1024, 1024, 1024)


def test_wrong_folders_and_files_are_refused_by_name(host, pack, tiny_idefics2, tiny_llama, mumu_connector_file,
                                                     mumu_input_images):
    error = run_error(host, encode_graph(tiny_llama, mumu_connector_file, "a dog"))
    assert "holds a 'llama' model, not Idefics2" in error
    other_vlm = host.models_dir / "LLM" / "some-idefics3"
    other_vlm.mkdir(exist_ok=True)
    (other_vlm / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    shutil.copy(host.models_dir / "LLM" / tiny_idefics2 / "tokenizer.json", other_vlm)
    (other_vlm / "model.safetensors").write_bytes(b"")
    error = run_error(host, encode_graph("some-idefics3", mumu_connector_file, "a dog"))
    assert "'idefics3' model, not Idefics2" in error and "some-idefics3" in error

    from safetensors.torch import load_file, save_file
    incomplete = host.models_dir / "LLM" / "tiny-idefics2-incomplete"
    shutil.copytree(host.models_dir / "LLM" / tiny_idefics2, incomplete, dirs_exist_ok=True)
    weights = load_file(str(incomplete / "model.safetensors"))
    dropped = next(k for k in weights if "text_model.layers.1.mlp.up_proj" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, str(incomplete / "model.safetensors"),
              metadata={"format": "pt"})
    error = run_error(host, encode_graph(incomplete.name, mumu_connector_file, "a dog"))
    assert "lack 1 tensor(s)" in error and "layers.1.mlp.up_proj" in error

    mumu = pack_module(pack, "bridges.mumu")
    narrow = "tiny-mumu-connector-48.safetensors"
    pack_module(pack, "loaders.mumu").save_connector(
        host.models_dir / "bridges" / narrow,
        mumu.MUMUConnector(mumu.ConnectorConfig(in_dim=48, width=32, depth=1, heads=4)))
    error = run_error(host, encode_graph(tiny_idefics2, narrow, "a dog"))
    assert "reads 48-wide" in error and "produces 64" in error and narrow in error

    mapper = "not-a-connector.safetensors"
    pack_module(pack, "loaders.mappers").save_mapper(host.models_dir / "bridges" / mapper,
                                                     pack_module(pack, "headless.tiny_llm").random_mapper(64, "sdxl"))
    error = run_error(host, encode_graph(tiny_idefics2, mapper, "a dog"))
    assert "holds a Beyond CLIP mapper, not a MUMU connector" in error

    error = run_error(host, encode_graph(tiny_idefics2, mumu_connector_file, "a <image> dog",
                                         [mumu_input_images["dog"]], image_resolution=128))
    assert "image_resolution 128 is above the 64 pixels" in error

    g = encode_graph(tiny_idefics2, mumu_connector_file, "a dog")
    g["6"] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}}
    g["4"]["inputs"]["model"] = ["6", 0]
    assert "2048-wide tokens (SDXL)" in run_error(host, g)


def test_idefics2_lora_node_merged_equals_unmerged(host, tiny_idefics2, mumu_connector_file, mumu_idefics2_lora,
                                                   mumu_input_images):
    def tokens(mode=None):
        g = encode_graph(tiny_idefics2, mumu_connector_file, "a <image> dog", [mumu_input_images["dog"]])
        if mode:
            g["5"] = {"class_type": "BeyondCLIP_MUMUIdefics2LoRA", "inputs": {
                "idefics2": ["1", 0], "lora_name": mumu_idefics2_lora, "strength": 0.5, "mode": mode}}
            g["4"]["inputs"]["idefics2"] = ["5", 0]
        host.reset_cache()
        host.run(g)
        return host.node_output("4")[0][0][0]

    plain, merged, unmerged = tokens(), tokens("merged"), tokens("unmerged")
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()
    assert (merged - plain).abs().max() > 1e-3
    assert torch.equal(tokens(), plain)
