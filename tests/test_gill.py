"""GILL: official-layout loading, parity with the reference TextFcLayer, images in the prompt, retrieval, the
lazy generate-or-retrieve switch, and the shipped workflows end to end in the real host with small models."""
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    PACK_DIR,
    api_workflow,
    check_golden_pixels,
    headless_module,
    node_of,
    pack_module,
    pixel_change,
    run_saved_image,
)
from PIL import Image
from torch import nn

WORKFLOWS = PACK_DIR / "workflows"
LLM_DIM = 64  # the small OPT's width
VISION_DIM = headless_module("tiny_clip_vision").WIDTH  # the small CLIP tower's width


# ---- a faithful transcription of the reference (kohjingyu/gill, gill/layers.py) ---------------------------

class TextFcLayer(nn.Module):
    """Layers used in mapping text embeddings to visual outputs."""

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int = 1, num_output_tokens: int = 1,
                 mode: str = 'linear'):
        super().__init__()

        self.num_input_tokens = num_input_tokens
        self.num_output_tokens = num_output_tokens
        self.mode = mode

        if mode == 'linear':
            self.model = nn.Linear(in_dim, out_dim)
        elif mode == 'gill_mapper':  # TODO(jykoh): Rename to GILLMapper
            hidden_dim = 512
            self.fc = nn.Linear(in_dim, hidden_dim)
            self.tfm = nn.Transformer(batch_first=True, norm_first=True,
                                      d_model=hidden_dim, num_encoder_layers=4, num_decoder_layers=4,
                                      dim_feedforward=hidden_dim * 4, dropout=0.0, nhead=4)
            self.model = nn.Linear(hidden_dim, out_dim)
            self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden_dim))
        else:
            raise NotImplementedError(mode)

    def forward(self, x: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        outputs = None

        if self.mode == 'gill_mapper':
            x = x + input_embs

        if isinstance(self.model, nn.ModuleList):
            assert len(self.model) == x.shape[1] == self.num_input_tokens, \
                (len(self.model), x.shape, self.num_input_tokens)
            outputs = []
            for i in range(self.num_input_tokens):
                outputs.append(self.model[i](x[:, i, :]))  # (N, D)
            outputs = torch.stack(outputs, dim=1)  # (N, T, D)
        else:
            if self.mode == 'gill_mapper':
                x = self.fc(x)
                x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
            outputs = self.model(x)

            if outputs.shape[1] != self.num_output_tokens and self.mode == 'linear':
                if self.mode == 'linear':
                    outputs = outputs[:, :self.num_output_tokens, :]
                else:
                    raise NotImplementedError

        assert outputs.shape[1] == 1 or (outputs.shape[1] * outputs.shape[2] == self.num_output_tokens * 768), \
            (outputs.shape, self.num_output_tokens)
        return outputs  # (N, T, D)


class Reference(nn.Module):
    """The trained parts of the reference GILLModel, with its attribute names (so state-dict keys are official)."""

    def __init__(self, llm_dim, vision_dim, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.input_embeddings = nn.Embedding(8, llm_dim)
        self.ret_text_hidden_fcs = nn.ModuleList([TextFcLayer(llm_dim, 256, 8, 1, mode='linear')])
        self.gen_text_hidden_fcs = nn.ModuleList([TextFcLayer(llm_dim, 768, 8, 77, mode='gill_mapper')])
        self.visual_embeddings = nn.Linear(vision_dim, llm_dim * 4)
        self.visual_fc = nn.Linear(vision_dim, 256)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.decision_model = nn.Sequential(nn.Dropout(0.5), nn.Linear(llm_dim, 2))
        # Random but input-sensitive: at the default N(0, 1) the [IMG] rows swamp the OPT's 0.02-sized residual
        # stream (its [IMG] states would barely see the prompt) and the learnt queries swamp the mapper's output.
        with torch.no_grad():
            self.input_embeddings.weight.mul_(0.02)
            self.gen_text_hidden_fcs[0].query_embs.mul_(0.02)
        self.eval()


def write_release(folder: Path, ref: Reference, **args_override) -> Path:
    """The reference's weights in the jykoh/gill release layout (headless/tiny_gill.py writes it)."""
    return headless_module("tiny_gill").write_release(folder, ref.state_dict(), **args_override)


# ---- a small CLIP vision tower (headless/tiny_clip_vision.py), as transformers' model for the reference side --

def hf_tower(seed):
    return headless_module("tiny_clip_vision").hf_tower(seed)


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gill(pack):
    return pack_module(pack, "loaders.gill")


@pytest.fixture(scope="module")
def gill_nodes(pack):
    return pack_module(pack, "nodes.gill")


def gill_engine(pack):
    return pack_module(pack, "engine.gill")


@pytest.fixture(scope="module")
def tiny_opt(host, pack):
    """models/LLM/tiny-opt (headless/tiny_gill.py): a small OPT with strong attention outputs, so the [IMG] states
    depend on the prompt and the pictures before them."""
    from safetensors import safe_open
    folder = pack_module(pack, "headless.tiny_gill").write_opt_folder(host.models_dir / "LLM" / "tiny-opt")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert sum(k.endswith("self_attn.out_proj.weight") for k in f.keys()) == 2  # noqa: SIM118 - safe_open handles are not iterable
    return "tiny-opt"


@pytest.fixture(scope="module")
def reference():
    return Reference(LLM_DIM, VISION_DIM, seed=0)


@pytest.fixture(scope="module")
def release(host, reference):
    """models/bridges/gill-tiny/: random weights in the official layout, for the small OPT and CLIP tower."""
    return write_release(host.models_dir / "bridges" / "gill-tiny", reference)


@pytest.fixture(scope="module")
def towers(pack):
    """The same towers the BeyondCLIP_TinyCLIPVision node gives, as ComfyUI CLIP_VISION objects."""
    return pack_module(pack, "headless.tiny_clip_vision").comfy_tower


@pytest.fixture(scope="module")
def loaded(gill, release):
    return gill.load_gill(release, "gill-tiny")


@pytest.fixture(scope="module")
def llm(pack, host, tiny_opt):
    return pack_module(pack, "loaders.llm").load_llm(tiny_opt, host.models_dir / "LLM" / tiny_opt, "fp32")


def picture(seed, size=(96, 80)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def as_image_tensor(img):
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


# ---- parity with the reference ----------------------------------------------------------------------------

def test_mapper_is_the_reference_textfclayer(loaded, reference):
    """Same weights (written in the official layout, read back by the loader): same outputs, fp32."""
    torch.manual_seed(5)
    hidden = torch.randn(3, 8, LLM_DIM)
    embs = reference.input_embeddings.weight[None].expand(3, -1, -1)
    with torch.no_grad():
        want = reference.gen_text_hidden_fcs[0](hidden, embs)
        tokens, pooled = loaded.inner.generation_embedding(hidden)
        ret_want = reference.ret_text_hidden_fcs[0](hidden, None)[:, 0, :]
        ret_want = ret_want / ret_want.norm(dim=-1, keepdim=True)
        ret = loaded.inner.text_retrieval_embedding(hidden)
    assert tokens.shape == (3, 77, 768) and pooled is None
    err = (tokens - want).abs().max().item()
    print(f"GILLMapper vs reference TextFcLayer: max abs error {err:.2e}")
    assert err <= 1e-5
    assert (ret - ret_want).abs().max().item() <= 1e-6
    cfg = loaded.config
    assert (cfg.out_tokens, cfg.out_dim, cfg.visual_tokens, cfg.decision_in) == (77, 768, 4, LLM_DIM)


def reference_img_states(llm_model, tokenizer, reference, parts):
    """The reference's interleaved input (generate_for_images_and_texts): BOS once, each string tokenized on its
    own, images as visual_embeddings(pooler_output) -> 4 tokens, then the [IMG] embeddings appended."""
    embed = llm_model.get_input_embeddings()
    pieces, add_bos = [], True
    for p in parts:
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=add_bos, return_tensors="pt").input_ids
            add_bos = False
            pieces.append(embed(ids))
        else:
            pieces.append(reference.visual_embeddings(p).reshape(1, 4, -1))
    pieces.append(reference.input_embeddings.weight[None])
    out = llm_model(inputs_embeds=torch.cat(pieces, dim=1), use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][:, -8:, :]


@pytest.mark.parametrize("prompt,texts", [
    ("Q: what is on the table?\nA: a bowl of fruit. <image> Q: and on the wall?\nA: a painting",
     ["Q: what is on the table?\nA: a bowl of fruit.", None, "Q: and on the wall?\nA: a painting"]),
    ("<image> a red fox in the snow", [None, "a red fox in the snow"]),  # BOS after the image, as the reference
])
def test_encode_matches_the_reference_pipeline(gill_nodes, loaded, llm, reference, towers, prompt, texts):
    model = llm.inner
    img = as_image_tensor(picture(1, (224, 224)))
    tower = towers(0)
    with torch.no_grad():
        conditioning, states = gill_nodes.GILLEncode().encode(llm, loaded, prompt, images=img, clip_vision=tower)
        # the reference's CLIP path: transformers' CLIPVisionModel pooler_output on CLIP-normalized pixels
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        pixels = ((img.movedim(-1, 1) * 255).round() / 255 - mean) / std
        hf = hf_tower(0)(pixel_values=pixels)
        pooled = hf_tower(0).vision_model(pixel_values=pixels).pooler_output
        raw = reference_img_states(model, llm.tokenizer, reference, [pooled if t is None else t for t in texts])
        want = reference.gen_text_hidden_fcs[0](raw, reference.input_embeddings.weight[None])
    assert hf.image_embeds.shape == (1, 32)  # the projected output ComfyUI exposes: not what GILL reads
    tokens, extra = conditioning[0]
    assert tokens.shape == (1, 77, 768) and tokens.dtype == torch.float32
    assert set(extra) <= {"hooks"}  # only the family check the sampler consults (engine.conditioning.guard_family)
    state_err = (states - raw).abs().max().item()
    err = (tokens - want).abs().max().item()
    print(f"[IMG] states vs reference: {state_err:.2e}; conditioning vs reference: {err:.2e}")
    assert state_err <= 1e-5 and err <= 1e-5


def test_clip_vision_pooler_output_from_comfy(gill, towers):
    """ComfyUI's CLIP_VISION exposes last_hidden_state (pre-layernorm) and the projected image_embeds; the
    pooled output GILL needs is its post_layernorm of the class token, equal to transformers' pooler_output."""
    img = as_image_tensor(picture(2, (224, 224)))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = hf_tower(0).vision_model(
            pixel_values=((img.movedim(-1, 1) * 255).round() / 255 - mean) / std).pooler_output
        got = gill.clip_pooled(towers(0), img)
        projected = towers(0).encode_image(img)["image_embeds"]
    assert got.shape == (1, VISION_DIM) and projected.shape == (1, 32)
    err = (got - want).abs().max().item()
    print(f"pooler_output from ComfyUI's CLIP_VISION vs transformers: {err:.2e} (tower stored as {towers(0).dtype})")
    assert err <= 1e-5


def test_prompt_longer_than_the_context_keeps_the_latest_story(pack, llm, loaded):
    bridge = pack_module(pack, "bridges.gill")
    model = llm.inner
    parts = bridge.split_prompt("one two three " * 60 + "<image> the end")
    image_embeds = torch.randn(1, 4, LLM_DIM)
    img = loaded.inner.img_embeddings()
    inputs = bridge.build_inputs(model.get_input_embeddings(), llm.tokenizer, parts, image_embeds, img, 128)
    assert inputs.tokens == 128 and inputs.dropped > 0 and inputs.images_used == 1
    bos = model.get_input_embeddings()(torch.tensor([llm.tokenizer.bos_token_id]))
    assert torch.equal(inputs.embeds[0, 0], bos[0])  # BOS stays in front
    assert torch.equal(inputs.embeds[0, -8:], img)  # [IMG0]..[IMG7] last
    with pytest.raises(ValueError, match="more <image> placeholders than images"):
        bridge.build_inputs(model.get_input_embeddings(), llm.tokenizer, bridge.split_prompt("a <image> b <image>"),
                            image_embeds, img, 128)


# ---- loading, conversion, bad files -----------------------------------------------------------------------

def test_convert_to_safetensors_round_trip(gill, loaded, release, host, gill_nodes):
    out = Path(gill_nodes.GILLConvert().convert("gill-tiny", "gill-tiny-converted", True)["result"][0])
    assert out == host.models_dir / "bridges" / "gill-tiny-converted.safetensors" and gill.is_gill_file(out)
    with pytest.raises(ValueError, match="exists"):
        gill_nodes.GILLConvert().convert("gill-tiny", "gill-tiny-converted", False)
    again = gill.load_gill(out)
    for (k, a), (k2, b) in zip(loaded.inner.state_dict().items(), again.inner.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert again.config == loaded.config
    choices = gill_nodes.GILLLoader.INPUT_TYPES()["required"]["gill_name"][0]
    assert "gill-tiny" in choices and "gill-tiny-converted.safetensors" in choices


def test_bad_checkpoints_are_refused_by_name(gill, reference, tmp_path):
    good = {f"model.{k}": v for k, v in reference.state_dict().items() if not k.startswith("decision_model.")}

    def release_with(sd, name, decision=None):
        folder = tmp_path / name
        folder.mkdir()
        torch.save({"state_dict": sd}, folder / "pretrained_ckpt.pth.tar")
        if decision is not None:
            torch.save(decision, folder / "decision_model.pth.tar")
        return folder

    # another model's checkpoint (FROMAGe has GILL's retrieval parts but no GILLMapper)
    fromage = {k: v for k, v in good.items() if "gen_text_hidden_fcs" not in k}
    with pytest.raises(Exception, match="not a GILL checkpoint.*gen_text_hidden_fcs"):
        gill.load_gill(release_with(fromage, "fromage"))
    with pytest.raises(Exception, match="not a GILL checkpoint"):
        gill.load_gill(release_with({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "sd"))
    # partial: one tensor missing, one unexpected -> refused, both named
    partial = dict(good)
    del partial["model.gen_text_hidden_fcs.0.tfm.decoder.layers.3.norm3.weight"]
    partial["model.extra_head.weight"] = torch.zeros(2)
    # the message names the release's file and gives the advice that fits a download, not "write it again"
    with pytest.raises(Exception, match=r"partial/pretrained_ckpt\.pth\.tar does not match the GILL model.*missing 1 "
                                        r"tensor.*decoder\.layers\.3\.norm3\.weight.*unexpected.*extra_head.*Download "
                                        r"pretrained_ckpt\.pth\.tar .*again from the jykoh/gill release") as e:
        gill.load_gill(release_with(partial, "partial"))
    assert "write it again" not in str(e.value)
    wrong = dict(good)
    wrong["model.gen_text_hidden_fcs.0.tfm.decoder.layers.3.norm3.weight"] = torch.zeros(5)
    with pytest.raises(Exception, match=r"wrong/pretrained_ckpt\.pth\.tar does not match.*wrong shapes.*norm3\.weight"):
        gill.load_gill(release_with(wrong, "wrong"))
    # a decision file of another model
    with pytest.raises(Exception, match="not GILL's decision model"):
        gill.load_gill(release_with(good, "bad-decision", {"state_dict": {"0.weight": torch.zeros(2, 2)}}))
    # a checkpoint holding Python objects, and a plain pickle: never unpickled, named for what they are, and the pack
    # never relays torch's advice to load with weights_only=False
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"state_dict": {"x": Path("x")}}, folder / "pretrained_ckpt.pth.tar")
    with pytest.raises(Exception, match=r"evil/pretrained_ckpt\.pth\.tar holds Python objects besides tensors "
                                        r"\(pathlib\.\w*Path\).*Download it again from the jykoh/gill release") as e:
        gill.load_gill(folder)
    assert "weights_only" not in str(e.value)
    with open(folder / "pretrained_ckpt.pth.tar", "wb") as f:
        pickle.dump({"state_dict": Path("x")}, f)
    with pytest.raises(Exception, match=r"evil/pretrained_ckpt\.pth\.tar is a Python pickle \(protocol \d\) that "
                                        r"torch\.save did not write") as e:
        gill.load_gill(folder)
    assert "weights_only" not in str(e.value)
    # model_args.json from another model
    folder = write_release(tmp_path / "args", Reference(LLM_DIM, VISION_DIM, 1), n_visual_tokens=1)
    with pytest.raises(Exception, match="n_visual_tokens=1 but .* holds 4"):
        gill.load_gill(folder)


def test_decision_file_saved_on_cuda_is_read_on_cpu(gill, reference, tmp_path):
    """The official decision file was saved from a CUDA device; map_location='cpu' reads it anywhere."""
    folder = write_release(tmp_path / "cuda", reference)
    data = (folder / "decision_model.pth.tar").read_bytes()
    # torch.save records each storage's device as a string inside the archive; rewrite it to 'cuda'
    import io
    import zipfile
    src, dst = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(dst, "w") as out:
        for item in src.infolist():
            payload = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"cpu" in payload
                payload = payload.replace(b"\x58\x03\x00\x00\x00cpu", b"\x58\x04\x00\x00\x00cuda")
            out.writestr(item, payload)
    (folder / "decision_model.pth.tar").write_bytes(dst.getvalue())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(folder / "decision_model.pth.tar", weights_only=True)  # what the upstream loader does
    g = gill.load_gill(folder)
    assert torch.equal(g.inner.decision_model[1].weight, reference.decision_model[1].weight)


# ---- images in the prompt, retrieval ----------------------------------------------------------------------

def test_placeholders_and_images_must_match(gill_nodes, llm, loaded, towers):
    encode = gill_nodes.GILLEncode().encode
    two = torch.cat([as_image_tensor(picture(i, (64, 64))) for i in range(2)])
    with pytest.raises(ValueError, match="3 <image> placeholders but 2 image"):
        encode(llm, loaded, "a <image> b <image> c <image>", images=two, clip_vision=towers(0))
    with pytest.raises(ValueError, match="2 image.* but the prompt has 1 <image>"):
        encode(llm, loaded, "a <image> b", images=two, clip_vision=towers(0))
    with pytest.raises(ValueError, match="no clip_vision"):
        encode(llm, loaded, "a <image> b <image>", images=two)
    # pictures no model can read are refused by name, not drawn as NaN, cut to 3 channels, or failed inside torch
    nan = two.clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="GILL Encode: picture 2 of 2 holds NaN or infinite pixel values"):
        encode(llm, loaded, "a <image> b <image>", images=nan, clip_vision=towers(0))
    with pytest.raises(ValueError, match="has 5 channels"):
        encode(llm, loaded, "a <image> b", images=torch.rand(1, 32, 32, 5), clip_vision=towers(0))
    with pytest.raises(ValueError, match="is 0x32 pixels"):
        encode(llm, loaded, "a <image> b", images=torch.rand(1, 0, 32, 3), clip_vision=towers(0))


def write_photos(folder: Path, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        picture(10 + i, (64 + 8 * i, 48)).save(folder / f"photo_{i}.png")


def test_index_build_update_corrupt_files_and_towers(pack, gill, gill_nodes, loaded, towers, host, tmp_path):
    root = Path(host.folder_paths.get_input_directory()) / "gill_index_test"
    write_photos(root, 3)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "sub").mkdir()
    write_photos(root / "sub", 1, start=3)
    index_dir = tmp_path / "indexes"
    index, report = gill_engine(pack).build_index(loaded, towers(0), root, index_dir, "t")
    assert report["added"] == 4 and report["kept"] == 0 and len(index) == 4
    assert len(report["skipped"]) == 1 and report["skipped"][0].startswith("broken.jpg")
    assert (index_dir / "t.safetensors").is_file() and (index_dir / "t.json").is_file()
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    # each row is visual_fc(pooler_output) of its image, normalized
    with torch.no_grad():
        pooled = gill.clip_pooled(towers(0), as_image_tensor(Image.open(root / "photo_1.png")))
        row = loaded.inner.image_retrieval_embedding(pooled)[0]
    assert torch.allclose(index.embeddings[index.paths.index("photo_1.png")], row, atol=1e-5)
    rows, scores = index.search(row, 2)
    assert index.paths[rows[0]] == "photo_1.png" and abs(scores[0] - 1) < 1e-5

    # incremental: only the new file is embedded; a removed file leaves the index
    write_photos(root, 1, start=7)
    (root / "photo_0.png").unlink()
    index2, report = gill_engine(pack).build_index(loaded, towers(0), root, index_dir, "t")
    assert (report["added"], report["kept"], report["removed"], len(index2)) == (1, 3, 1, 4)
    assert torch.equal(index2.embeddings[index2.paths.index("photo_1.png")],
                       index.embeddings[index.paths.index("photo_1.png")])
    assert gill.read_index(index_dir, "t").paths == index2.paths

    # another vision tower: refused in update mode, rebuilt on request
    with pytest.raises(Exception, match="built with another CLIP vision tower.*rebuild"):
        gill_engine(pack).build_index(loaded, towers(1), root, index_dir, "t")
    _, report = gill_engine(pack).build_index(loaded, towers(1), root, index_dir, "t", rebuild=True)
    assert report["added"] == 4 and report["kept"] == 0

    # an index built with another GILL (another retrieval head) is not searched with this one
    other = gill.load_gill(write_release(tmp_path / "other-gill", Reference(LLM_DIM, VISION_DIM, seed=7)))
    with pytest.raises(Exception, match="another GILL model"):
        gill.check_index(other, index2)

    # a folder with nothing readable, and an empty index
    bad = tmp_path / "only-broken"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    with pytest.raises(Exception, match="no readable images.*a.png"):
        gill_engine(pack).build_index(loaded, towers(0), bad, index_dir, "bad")
    empty = copy.copy(index2)
    empty.paths, empty.stamps, empty.embeddings = [], [], index2.embeddings[:0]
    with pytest.raises(Exception, match="is empty"):
        gill.check_index(loaded, empty)


def test_retrieve_ranks_by_the_img0_embedding(pack, gill_nodes, gill, loaded, llm, towers, host, tmp_path):
    root = tmp_path / "photos"
    write_photos(root, 5)
    index, _ = gill_engine(pack).build_index(loaded, towers(0), root, tmp_path / "idx", "p")
    _, states = gill_nodes.GILLEncode().encode(llm, loaded, "a red fox in the snow")
    out = gill_nodes.GILLRetrieve().retrieve(loaded, index, states, 3)["result"]
    images, scores, best = out
    query = loaded.inner.text_retrieval_embedding(states)[0]
    expected = sorted(((float(index.embeddings[i] @ query), p) for i, p in enumerate(index.paths)), reverse=True)[:3]
    got = [(float(line.split()[0]), line.split()[1]) for line in scores.splitlines()]
    assert [p for _, p in got] == [p for _, p in expected]
    assert all(abs(a - b[0]) < 1e-4 for (a, _), b in zip(got, expected)) and abs(best - expected[0][0]) < 1e-4
    top = as_image_tensor(Image.open(root / expected[0][1]))
    assert images.shape == (3,) + tuple(top.shape[1:]) and torch.equal(images[:1], top)


def test_decision_threshold(pack, gill_nodes, loaded, llm, reference):
    _, states = gill_nodes.GILLEncode().encode(llm, loaded, "a red fox in the snow")
    with torch.no_grad():
        want = reference.decision_model(states[:, 0]).softmax(-1)[0, 1].item()
    decision, p = gill_engine(pack).decide(loaded, states, 0.5)
    assert abs(p - want) < 1e-6 and decision == ("retrieve" if want >= 0.5 else "generate")
    assert gill_engine(pack).decide(loaded, states, 0.0)[0] == "retrieve"
    assert gill_engine(pack).decide(loaded, states, 1.0)[0] == "generate"


def test_decision_model_that_reads_the_retrieval_score(pack, gill, gill_nodes, loaded, llm, towers, tmp_path):
    """The repository's other decision model: Linear(4097, 2) on [IMG0] + logit_scale.exp() * best cosine."""
    bridge = pack_module(pack, "bridges.gill")
    sd = dict(loaded.inner.state_dict())
    torch.manual_seed(4)
    sd["decision_model.1.weight"] = torch.randn(2, LLM_DIM + 1) * 0.3
    cfg = bridge.GILLConfig.from_state_dict(sd)
    assert cfg.decision_in == LLM_DIM + 1
    path = tmp_path / "gill-4097.safetensors"
    pack_module(pack, "loaders.bridge_files").save_bridge(path, gill.KIND, cfg.to_dict(), sd)
    g = gill.load_gill(path)
    root = tmp_path / "photos"
    write_photos(root, 3)
    index, _ = gill_engine(pack).build_index(g, towers(0), root, tmp_path / "idx", "p")
    _, states = gill_nodes.GILLEncode().encode(llm, g, "a red fox in the snow")
    with pytest.raises(ValueError, match="connect the image index"):
        gill_engine(pack).decide(g, states, 0.5)
    query = g.inner.text_retrieval_embedding(states)[0]
    best = float((index.embeddings @ query).max())
    x = torch.cat([states[:, 0], (sd["logit_scale"].exp() * best).reshape(1, 1)], dim=-1)
    want = (x @ sd["decision_model.1.weight"].T + sd["decision_model.1.bias"]).softmax(-1)[0, 1].item()
    assert abs(gill_engine(pack).decide(g, states, 0.5, index)[1] - want) < 1e-5


# ---- SDXL mappers ------------------------------------------------------------------------------------------

def test_sdxl_mapper_plugs_into_the_same_nodes(pack, gill, gill_nodes, loaded, llm, host, tiny_opt):
    bridge = pack_module(pack, "bridges.gill")
    cfg = bridge.GILLConfig.from_dict(dict(loaded.config.to_dict(), out_dim=2048, pooled_dim=1280))
    torch.manual_seed(3)
    model = bridge.GILLModel(cfg)
    with torch.no_grad():
        model.gen_text_hidden_fcs[0].query_embs.normal_()
    name = "gill-tiny-sdxl.safetensors"
    pack_module(pack, "loaders.bridge_files").save_bridge(host.models_dir / "bridges" / name, gill.KIND,
                                                          cfg.to_dict(), model.state_dict())
    prompt = {
        "1": {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}},
        "2": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": tiny_opt, "dtype": "fp32"}},
        "3": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": name}},
        "4": {"class_type": "BeyondCLIP_GILLEncode", "inputs": {"llm": ["2", 0], "gill": ["3", 0], "model": ["1", 0],
                                                               "prompt": "a lighthouse at dusk"}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "gill_sdxl"}},
    }
    host.reset_cache()
    assert len(host.saved_images(host.run(prompt))) == 1
    tokens, extra = host.node_output("4")[0][0]
    assert tokens.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280)
    # the official SD1.5 mapper on an SDXL model is refused before sampling
    sd15 = copy.deepcopy(prompt)
    sd15["3"]["inputs"]["gill_name"] = "gill-tiny"
    with pytest.raises(host_error(host), match="768-wide tokens .*SD1.x.* MODEL expects 2048"):
        host.run(sd15)


def host_error(host):
    import conftest
    return conftest.host_module.HostError


# ---- the shipped workflows, end to end ---------------------------------------------------------------------

def workflow_prompt(host, pack, name, *, llm, seed=None, prompt_text=None, threshold=None, prefix="gill"):
    prompt = api_workflow(host, pack, name)
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}}
        elif kind == "CLIPVisionLoader":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCLIPVision", "inputs": {"seed": 0}}
        elif kind == "BeyondCLIP_LLMLoader":
            inputs.update(llm_name=llm, dtype="fp32")
        elif kind == "BeyondCLIP_GILLLoader":
            inputs["gill_name"] = "gill-tiny"
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 6
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "BeyondCLIP_GILLEncode" and prompt_text is not None:
            inputs["prompt"] = prompt_text
        elif kind == "BeyondCLIP_GILLGenerateOrRetrieve" and threshold is not None:
            inputs["threshold"] = threshold
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


def test_workflow_generate_sd15(host, pack, tiny_opt, release, towers):
    prompt = workflow_prompt(host, pack, "gill_generate_sd15.json", llm=tiny_opt, prefix="gill_gen")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "gill_generate_sd15.json", first)
    tokens, extra = host.node_output(node_of(prompt, "BeyondCLIP_GILLEncode"))[0][0]
    assert tokens.shape == (1, 77, 768) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert run_saved_image(host, prompt).png == first.png, "same seed and prompt: byte-identical image"
    other = workflow_prompt(host, pack, "gill_generate_sd15.json", llm=tiny_opt, prefix="gill_gen",
                            prompt_text="an oil painting of a red fox in the snow")
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\nGILL: another prompt changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "another prompt must change the image"


def test_workflow_multimodal_story(host, pack, tiny_opt, release, towers):
    wf = json.loads((WORKFLOWS / "gill_multimodal_story.json").read_text())
    input_dir = Path(host.folder_paths.get_input_directory())
    names = wf["extra"]["beyond_clip"]["inputs"]
    for i, name in enumerate(names):
        picture(20 + i, (80 + 16 * i, 64)).save(input_dir / name)
    prompt = workflow_prompt(host, pack, "gill_multimodal_story.json", llm=tiny_opt, prefix="gill_story")
    encode_id = node_of(prompt, "BeyondCLIP_GILLEncode")
    assert prompt[encode_id]["inputs"]["prompt"].count("<image>") == 4 == len(names)
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "gill_multimodal_story.json", first)
    tokens = host.node_output(encode_id)[0][0][0]
    assert tokens.shape == (1, 77, 768)
    assert run_saved_image(host, prompt).png == first.png
    # the images are read: another third picture changes the conditioning and the picture
    picture(99, (64, 64)).save(input_dir / names[2])
    second = run_saved_image(host, prompt)
    assert not torch.equal(host.node_output(encode_id)[0][0][0], tokens)
    change = pixel_change(second.pixels, first.pixels)
    print(f"\nGILL story: another third picture changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "another input picture must change the image"
    # more placeholders than images
    bad = copy.deepcopy(prompt)
    bad[encode_id]["inputs"]["prompt"] += " <image>"
    with pytest.raises(host_error(host), match="5 <image> placeholders but 4 image"):
        host.run(bad)


def test_workflow_retrieve_or_generate(host, pack, tiny_opt, release, towers):
    photos = Path(host.folder_paths.get_input_directory()) / "gill_photos"
    write_photos(photos, 4)
    (photos / "corrupt.png").write_bytes(b"\x89PNG broken")
    # threshold 0: always retrieve
    prompt = workflow_prompt(host, pack, "gill_retrieve_or_generate.json", llm=tiny_opt, threshold=0.0,
                             prefix="gill_ret")
    sampler, switch, build = (node_of(prompt, k) for k in ("KSampler", "BeyondCLIP_GILLGenerateOrRetrieve",
                                                           "BeyondCLIP_GILLBuildIndex"))
    retrieved_picture = run_saved_image(host, prompt)
    check_golden_pixels(host, "gill_retrieve_or_generate.json/retrieve", retrieved_picture)
    path = retrieved_picture.path
    image, decision, p = host.node_output(switch)
    assert decision == "retrieve" and 0.0 <= p <= 1.0
    retrieved, scores, _ = host.node_output(node_of(prompt, "BeyondCLIP_GILLRetrieve"))
    best = scores.splitlines()[0].split()[1]
    assert torch.equal(image, retrieved) and torch.equal(image, as_image_tensor(Image.open(photos / best)))
    saved = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(saved - np.asarray(Image.open(photos / best).convert("RGB"), dtype=np.int16)).max() <= 1
    index, report = host.node_output(build)
    assert "4 images (4 embedded" in report and "corrupt.png" in report and len(index) == 4
    # the sampler branch never ran where the host has lazy inputs; older hosts run it and discard it
    assert (host.node_output(sampler) is None) == host.supports_execution_blocker()
    # the index is kept on disk and updated incrementally: the next run embeds nothing new
    run_saved_image(host, prompt)
    assert "4 images (0 embedded, 4 kept" in host.node_output(build)[1]
    assert (Path(host.folder_paths.get_output_directory()) / "gill_index" / "gill_photos.safetensors").is_file()
    # threshold 1: generate; the retrieval branch is not needed
    prompt = workflow_prompt(host, pack, "gill_retrieve_or_generate.json", llm=tiny_opt, threshold=1.0,
                             prefix="gill_ret")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "gill_retrieve_or_generate.json/generate", first)
    image, decision, _ = host.node_output(switch)
    assert decision == "generate" and image.shape == (1, 64, 64, 3)
    assert torch.equal(image, host.node_output(node_of(prompt, "VAEDecode"))[0])
    retrieve_ran = host.node_output(node_of(prompt, "BeyondCLIP_GILLRetrieve")) is not None
    assert retrieve_ran != host.supports_execution_blocker()
    assert run_saved_image(host, prompt).png == first.png
