"""SEED v1: parity with a transcription of the reference forward, the official-file loader, the nodes, and the
shipped workflows end to end in the real host with small models in the official layout."""
import copy
import logging
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PACK_DIR,
    api_workflow,
    check_golden_pixels,
    headless_module,
    host_module,
    node_of,
    pack_module,
    pixel_change,
    run_saved_image,
)
from PIL import Image

WORKFLOWS = PACK_DIR / "workflows"
TINY_DIR = ("seed", "tiny")  # models/bridges/seed/tiny/{seed_tokenizer,causal_qformer,eva_vit_g}.pth
TINY_LABEL = "seed/tiny/seed_tokenizer.pth"
# The small official-layout files (headless/tiny_seed.py, shared with the workflow runner) and their sizes.
tiny_seed = headless_module("tiny_seed")
official_state, write_official, FULL = tiny_seed.official_state, tiny_seed.write_official, tiny_seed.FULL
W, VIT_LAYERS, VIT_MLP, PATCH = tiny_seed.W, tiny_seed.VIT_LAYERS, tiny_seed.VIT_MLP, tiny_seed.PATCH
D, Q_LAYERS, NQ, N_EMBED, CDIM = tiny_seed.D, tiny_seed.Q_LAYERS, tiny_seed.NQ, tiny_seed.N_EMBED, tiny_seed.CDIM
DEC_BLOCKS, R_LAYERS, NR, OUT = tiny_seed.DEC_BLOCKS, tiny_seed.R_LAYERS, tiny_seed.NR, tiny_seed.OUT


# ------------------------------------------------------------------ the reference forward, transcribed

def ref_eva(sd, x):
    """LAVIS eva_vit.VisionTransformer.forward_features (no final norm), then ln_vision."""
    heads = W // 88
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + sd["pos_embed"]
    for i in range(VIT_LAYERS):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (W,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv_bias = torch.cat((sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]))
        B, N, C = h.shape
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], qkv_bias).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (C // heads) ** -0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (W,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        x = x + h
    return x


def ref_bert(sd, prefix, layers, query_embeds, encoder_hidden_states):
    """LAVIS Qformer_casual.BertModel.forward with query_embeds only: causal iff there are 32 queries,
    the mask (1 - causal) * -10000 added to the scores; cross-attention in layers i % 2 == 0."""
    heads = D // 64
    bs, n, _ = query_embeds.shape
    x = F.layer_norm(query_embeds, (D,), sd[prefix + "embeddings.LayerNorm.weight"],
                     sd[prefix + "embeddings.LayerNorm.bias"], eps=1e-12)
    if n == 32:
        ids = torch.arange(n)
        causal = (ids[None, None, :].repeat(bs, n, 1) <= ids[None, :, None]).float()
        ext = (1.0 - causal[:, None, :, :]) * -10000.0
    else:
        ext = torch.zeros(bs, 1, 1, n)

    def attention(p, hidden, enc, mask):
        src = enc if enc is not None else hidden

        def split(t):
            return t.view(*t.shape[:-1], heads, -1).permute(0, 2, 1, 3)
        ql = split(F.linear(hidden, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
        kl = split(F.linear(src, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
        vl = split(F.linear(src, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
        scores = torch.matmul(ql, kl.transpose(-1, -2)) / math.sqrt(D // heads)
        if mask is not None:
            scores = scores + mask
        ctx = torch.matmul(scores.softmax(dim=-1), vl).permute(0, 2, 1, 3).reshape(bs, -1, D)
        out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
        return F.layer_norm(out + hidden, (D,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"],
                            eps=1e-12)

    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}."
        x = attention(p + "attention.", x, None, ext)
        if i % 2 == 0:
            x = attention(p + "crossattention.", x, encoder_hidden_states,
                          torch.zeros(bs, 1, 1, encoder_hidden_states.shape[1]))
        h = F.gelu(F.linear(x, sd[p + "intermediate_query.dense.weight"], sd[p + "intermediate_query.dense.bias"]))
        h = F.linear(h, sd[p + "output_query.dense.weight"], sd[p + "output_query.dense.bias"])
        x = F.layer_norm(h + x, (D,), sd[p + "output_query.LayerNorm.weight"], sd[p + "output_query.LayerNorm.bias"],
                         eps=1e-12)
    return x


def ref_block(sd, p, x):
    """LAVIS vit.Block with 12 heads in the reference (head width 64: D // 64 here)."""
    heads = D // 64
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads) \
        .permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    x = x + F.linear((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), sd[p + "attn.proj.weight"],
                     sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                        sd[p + "mlp.fc2.bias"])


def ref_predict(eva, qf, tok, image):
    """SEEDVisualTokenizer.predict (models/visual_tokenizer.py, branch v1), in fp32: (codes, z, embeddings)."""
    sd = {**qf, **tok}
    image_embeds = F.layer_norm(ref_eva(eva, image), (W,), sd["ln_vision.weight"], sd["ln_vision.bias"], eps=1e-5)
    query_output = ref_bert(sd, "Qformer.bert.", Q_LAYERS, sd["query_tokens"].expand(image.shape[0], -1, -1),
                            image_embeds)
    z = F.linear(torch.tanh(F.linear(query_output, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"])),
                 sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])
    codes = ref_quantize(sd["quantize.embedding.weight"], z)
    return codes, z, ref_decode(sd, codes)


def ref_quantize(embedding, z):
    """VectorQuantizer2.forward: argmin of z^2 + e^2 - 2 z.e."""
    zf = z.reshape(-1, CDIM)
    d = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1) - \
        2 * torch.einsum("bd,dn->bn", zf, embedding.t())
    return torch.argmin(d, dim=1).reshape(z.shape[0], -1)


def ref_decode(sd, codes):
    quant = F.embedding(codes, sd["quantize.embedding.weight"])
    x = F.linear(torch.tanh(F.linear(quant, sd["decode_task_layer.0.weight"], sd["decode_task_layer.0.bias"])),
                 sd["decode_task_layer.2.weight"], sd["decode_task_layer.2.bias"])
    x = x + sd["pos_embed_text"].repeat(x.shape[0], 1, 1)
    for i in range(DEC_BLOCKS):
        x = ref_block(sd, f"blocks_text.{i}.", x)
    reverse = ref_bert(sd, "Reverse_Qformer.bert.", R_LAYERS, sd["reverse_tokens"].expand(x.shape[0], -1, -1), x)
    return F.linear(reverse, sd["distill_text_proj.weight"], sd["distill_text_proj.bias"])


def ref_transform(pil_image):
    """demo_recon.get_transform(224) of the v1 branch."""
    from torchvision import transforms
    from torchvision.transforms.functional import InterpolationMode
    return transforms.Compose([
        transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    ])(pil_image)


def picture(seed, h=96, w=128, channels=3):
    """A smooth random picture as 8-bit values (so that the [0, 1] IMAGE is exact)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(4, 5, channels), dtype=np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    img = Image.fromarray(small[..., 0] if channels == 1 else small, mode).resize((w, h), Image.BILINEAR)
    return img


def as_image_tensor(img):
    a = np.asarray(img).astype(np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(a)[None]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def seed_mods(pack):
    return pack_module(pack, "bridges.seed"), pack_module(pack, "loaders.seed"), pack_module(pack, "nodes.seed")


@pytest.fixture(scope="module")
def official(host):
    """The small official-layout file set in models/bridges/seed/tiny/, as a user would place it."""
    folder = host.models_dir / "bridges" / TINY_DIR[0] / TINY_DIR[1]
    return write_official(folder, seed=0)


@pytest.fixture(scope="module")
def loaded(host, seed_mods, official):
    bridge, loader, _ = seed_mods
    out = loader.prepare(official, host.models_dir / "bridges")
    return loader.load_seed(out), out


# ------------------------------------------------------------------ parity and bridges

def test_converted_config_comes_from_the_shapes(seed_mods, loaded):
    bridge, loader, _ = seed_mods
    seed, path = loaded
    c = seed.config
    assert path.name == "seed-v1-tiny.safetensors"
    assert (c.vision_width, c.vision_layers, c.vision_heads, c.vision_mlp, c.image_size) == \
        (W, VIT_LAYERS, 2, VIT_MLP, 224)
    assert (c.hidden, c.num_queries, c.qformer_layers, c.qformer_heads, c.cross_attention_freq) == \
        (D, NQ, Q_LAYERS, 2, 2)
    assert (c.codebook_size, c.code_dim, c.decoder_blocks, c.reverse_queries, c.reverse_layers, c.out_dim) == \
        (N_EMBED, CDIM, DEC_BLOCKS, NR, R_LAYERS, OUT)
    # The full-size official sizes come out of the same rules.
    full = bridge.SeedConfig()
    assert (full.vision_width // loader.EVA_HEAD_WIDTH, full.hidden // loader.BERT_HEAD_WIDTH) == (16, 12)


def test_full_size_official_layout_gives_the_released_architecture(seed_mods):
    """The released files' shapes (built on the meta device: no memory) derive SEED v1's published sizes, every
    tensor maps to the model, and the last EVA block (LAVIS builds depth 39 of 40) is reported as unused."""
    bridge, loader, _ = seed_mods
    eva, qf, tok = official_state(0, FULL, meta=True)
    merged = {**loader.vit_state(eva, "eva_vit_g.pth"), **qf, **tok}
    config = loader.derive_config(merged)
    assert config == bridge.SeedConfig()
    sources, expected, missing, ignored, unexpected = loader.classify(merged, config)
    assert missing == [] and unexpected == []
    assert any("EVA blocks after the first 39" in reason and all(".blocks.39." in k for k in keys)
               for reason, keys in ignored.items())


def test_parity_with_the_reference_forward(seed_mods, loaded):
    bridge, loader, _ = seed_mods
    seed, _ = loaded
    model = seed.inner
    eva, qf, tok = official_state(0)
    pics = [picture(s, 80 + 16 * s, 60 + 30 * s) for s in range(3)]
    ref_pixels = torch.stack([ref_transform(p) for p in pics])
    ours = torch.cat([bridge.preprocess(as_image_tensor(p), 224) for p in pics])
    assert torch.equal(ours, ref_pixels), "preprocessing differs from the reference transform"
    with torch.no_grad():
        ref_codes, ref_z, ref_embeds = ref_predict(eva, qf, tok, ref_pixels)
        z = model.encode_task_layer(model.causal_embeddings(model.image_embeddings(ours)))
        codes = model.encode(ours)
        embeds = model.decode(codes)
        # Without the causal mask the queries would see their successors: the mask is not a no-op.
        img = model.image_embeddings(ours)
        q = model.query_tokens.expand(3, -1, -1)
        z_bidirectional = model.encode_task_layer(bridge._run_qformer(model.qformer, q, img, None))
    print(f"\nSEED parity: max |z - z_ref| = {(z - ref_z).abs().max():.2e}, "
          f"max |embeds - ref| = {(embeds - ref_embeds).abs().max():.2e}")
    assert codes.shape == (3, NQ) and codes.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert len(set(codes.flatten().tolist())) > 20, "random weights should spread over the codebook"
    assert (z - ref_z).abs().max() <= 1e-5
    assert (embeds - ref_embeds).abs().max() <= 1e-5 and embeds.shape == (3, NR, OUT)
    assert (z_bidirectional - z).abs().max() > 1e-3
    # The first query sees only itself: its embedding does not depend on the later queries.
    q2 = q.clone()
    q2[:, 5:] += 1.0
    with torch.no_grad():
        a = bridge._run_qformer(model.qformer, q, img, bridge.causal_mask(NQ, q.dtype, q.device))
        b = bridge._run_qformer(model.qformer, q2, img, bridge.causal_mask(NQ, q.dtype, q.device))
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
    # Typed-in codes decode like the reference too.
    any_codes = torch.randint(0, N_EMBED, (2, NQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model.decode(any_codes) - ref_decode({**qf, **tok}, any_codes)).abs().max() <= 1e-5


def test_preprocessing_takes_any_size_alpha_and_grey(seed_mods):
    bridge = seed_mods[0]
    rgba = picture(7, 50, 200, channels=4)
    out = bridge.preprocess(as_image_tensor(rgba), 224)
    assert out.shape == (1, 3, 224, 224)
    assert torch.equal(out, ref_transform(rgba.convert("RGB"))[None])  # PIL's convert drops alpha
    grey = picture(8, 300, 40, channels=1)
    assert torch.equal(bridge.preprocess(as_image_tensor(grey), 224), ref_transform(grey.convert("RGB"))[None])
    with pytest.raises(ValueError, match="empty batch"):
        bridge.preprocess(torch.zeros(0, 64, 64, 3), 224)


def test_codes_text_round_trip_mix_and_range(seed_mods):
    bridge = seed_mods[0]
    codes = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(1))
    tokens = bridge.SeedCodes(codes, 8192)
    assert torch.equal(bridge.parse_codes(tokens.text()), codes)
    assert torch.equal(bridge.parse_codes("[" + ", ".join(map(str, codes[0].tolist())) + "]"), codes[:1])
    with pytest.raises(ValueError, match="31 codes; an image takes exactly 32"):
        bridge.parse_codes(" ".join(["1"] * 31))
    with pytest.raises(ValueError, match="'-4' is not a code"):
        bridge.parse_codes(" ".join(["1"] * 31 + ["-4"]))
    with pytest.raises(ValueError, match="no SEED codes"):
        bridge.parse_codes("  \n ")
    a, b = codes[:1], codes[1:]
    mixed = bridge.mix_codes(a, b, 10)
    assert torch.equal(mixed[:, :10], a[:, :10]) and torch.equal(mixed[:, 10:], b[:, 10:])
    assert torch.equal(bridge.mix_codes(a, b, 0), b) and torch.equal(bridge.mix_codes(a, b, 32), a)
    assert bridge.mix_codes(a, codes, 3).shape == (2, 32)  # one image pairs with each of a batch
    with pytest.raises(ValueError, match="cannot pair 2 images with 3"):
        bridge.mix_codes(codes, torch.zeros(3, 32, dtype=torch.int64), 3)
    config = bridge.SeedConfig()
    bad = codes.clone()
    bad[1, 4] = 9000
    with pytest.raises(ValueError, match=r"9000 \(image 2, position 5\) is out of range.*8192 entries"):
        bridge.check_codes(bad, config)
    with pytest.raises(ValueError, match="exactly 32"):
        bridge.check_codes(codes[:, :20], config)


# ------------------------------------------------------------------ the loader on good and bad files

def _convert(loader, tokenizer_path, tmp_path):
    return loader.convert_official(tokenizer_path, tmp_path / "out.safetensors")


def test_conversion_is_one_time_and_reports_what_it_left_out(host, seed_mods, official, loaded, caplog):
    _, loader, _ = seed_mods
    out = loaded[1]
    config, _ = loader.read_bridge_config(out)
    report = config["conversion"]
    assert report["unexpected"] == []
    reasons = " | ".join(report["ignored"])
    assert "text branch" in reasons and "reconstruction head" in reasons
    mtime = out.stat().st_mtime_ns
    assert loader.prepare(official, host.models_dir / "bridges") == out and out.stat().st_mtime_ns == mtime
    # The converted file holds only what SEED uses, in the official names, loadable without the .pth files.
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in keys
    assert "visual_encoder.blocks.0.attn.q_bias" in keys and "ln_vision.weight" in keys
    assert not any(k.startswith(("Qformer.bert.embeddings.word", "blocks.0", "text_proj")) for k in keys)


def test_missing_unexpected_and_wrong_files_are_named(tmp_path, pack, seed_mods, caplog):
    _, loader, _ = seed_mods
    LoadError = pack_module(pack, "loaders.errors").LoadError

    tok = write_official(tmp_path / "missing",
                         tok={"Reverse_Qformer.bert.encoder.layer.1.output_query.dense.weight": None})
    with pytest.raises(LoadError,
                       match=r"lack 1 tensor.*Reverse_Qformer\.bert\.encoder\.layer\.1\.output_query\.dense\.weight"):
        _convert(loader, tok, tmp_path)
    tok = write_official(tmp_path / "noln", qf={"ln_vision.weight": None})
    with pytest.raises(LoadError, match=r"ln_vision\.weight"):
        _convert(loader, tok, tmp_path)

    tok = write_official(tmp_path / "extra", tok={"mystery.weight": torch.zeros(3)})
    with caplog.at_level(logging.WARNING):
        report = _convert(loader, tok, tmp_path)
    assert report["unexpected"] == ["mystery.weight"] and "mystery.weight" in caplog.text

    # SEED-2 (SEED-LLaMA): same encoder, a de-tokenizer for SD 2.1 unCLIP image embeddings.
    seed2 = {k: v for k, v in official_state(0)[2].items()
             if not k.startswith(("distill_text_proj", "Reverse_Qformer", "reverse_tokens", "blocks_text",
                                  "pos_embed_text"))}
    seed2.update({"pos_embed_image": torch.zeros(1, 32, D), "blocks_image.0.norm1.weight": torch.ones(D),
                  "image_down.0.weight": torch.zeros(256, D), "distill_image_proj.weight": torch.zeros(1024, 1024)})
    (tmp_path / "seed2").mkdir()
    torch.save(seed2, tmp_path / "seed2" / "seed_quantizer.pt")
    with pytest.raises(LoadError, match=r"SEED-2 \(SEED-LLaMA\).*unCLIP.*SEED v1"):
        loader.prepare(tmp_path / "seed2" / "seed_quantizer.pt", tmp_path)

    # A checkpoint of another model entirely, in the tokenizer's place and in the ViT's place.
    other = write_official(tmp_path / "other")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}}, other)
    with pytest.raises(LoadError, match="not a SEED tokenizer file"):
        _convert(loader, other, tmp_path)
    vit_wrong = write_official(tmp_path / "vit")
    torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, vit_wrong.parent / "eva_vit_g.pth")
    with pytest.raises(LoadError, match="not the EVA-CLIP ViT-g"):
        _convert(loader, vit_wrong, tmp_path)

    # Truncated download.
    trunc = write_official(tmp_path / "trunc")
    data = (trunc.parent / "causal_qformer.pth").read_bytes()
    (trunc.parent / "causal_qformer.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"causal_qformer\.pth is truncated or corrupt.*Download the SEED causal"):
        _convert(loader, trunc, tmp_path)
    # Not plain tensors: never unpickled.
    unsafe = write_official(tmp_path / "unsafe")
    torch.save({"model": {"layer": torch.nn.Linear(2, 2)}}, unsafe)  # a pickled class, not plain tensors
    with pytest.raises(LoadError, match="holds Python objects besides tensors"):
        _convert(loader, unsafe, tmp_path)
    missing_vit = write_official(tmp_path / "novit")
    os.remove(missing_vit.parent / "eva_vit_g.pth")
    with pytest.raises(LoadError, match=r"eva_vit_g\.pth: no such file"):
        _convert(loader, missing_vit, tmp_path)
    # A damaged converted file is refused by name, not half-loaded.
    good = write_official(tmp_path / "good")
    _convert(loader, good, tmp_path)
    conv = tmp_path / "out.safetensors"
    conv.write_bytes(conv.read_bytes()[:5000])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        loader.load_seed(conv)


# ------------------------------------------------------------------ nodes and shipped workflows in the host

def put_input_image(host, name, seed, size=(72, 56), channels=3):
    path = host.folder_paths.get_input_directory()
    os.makedirs(path, exist_ok=True)
    picture(seed, size[1], size[0], channels).save(os.path.join(path, name))
    return name


def workflow_prompt(host, pack, name, images, prefix, seed=None):
    """The shipped UI-format workflow as an API prompt, pointed at the small models and test images."""
    prompt = api_workflow(host, pack, name)
    images = iter(images)
    for node_id in sorted(prompt, key=int):
        kind, inputs = prompt[node_id]["class_type"], prompt[node_id]["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sd15"}}
        elif kind == "BeyondCLIP_SEEDLoader":
            inputs["seed_model"] = TINY_LABEL
        elif kind == "LoadImage":
            inputs["image"] = next(images)
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


def test_reconstruct_workflow_end_to_end(host, pack, official, seed_mods):
    bridge, _, nodes = seed_mods
    a = put_input_image(host, "seed_a.png", 11)
    b = put_input_image(host, "seed_b.png", 12, size=(40, 90), channels=4)  # another size, with alpha
    prompt = workflow_prompt(host, pack, "seed_reconstruct_sd15.json", [a], "seed_rec")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "seed_reconstruct_sd15.json", first)
    ui = first.ui
    tok_id, det_id = node_of(prompt, "BeyondCLIP_SEEDTokenize"), node_of(prompt, "BeyondCLIP_SEEDDetokenize")
    tokens, text = host.node_output(tok_id)
    assert tokens.codes.shape == (1, 32) and ui[tok_id]["text"] == [text]
    assert torch.equal(bridge.parse_codes(text), tokens.codes)
    positive, negative = host.node_output(det_id)
    assert positive[0][0].shape == (1, 77, 768) and positive[0][0].dtype == torch.float32
    assert negative[0][0].shape == (1, 77, 768) and not torch.equal(negative[0][0], positive[0][0])
    assert torch.isfinite(positive[0][0]).all()

    assert run_saved_image(host, prompt).png == first.png, "same image and seed must give a byte-identical picture"
    other = workflow_prompt(host, pack, "seed_reconstruct_sd15.json", [b], "seed_rec")
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\nSEED: another input image changes the pixels by {change:.2f} levels on average")
    assert change > 0.5, "another image must change the picture"
    assert not torch.equal(host.node_output(tok_id)[0].codes, tokens.codes)

    # Zeroed negative instead of CLIP("").
    zeros = copy.deepcopy(prompt)
    zeros[det_id]["inputs"]["negative"] = "zeros"
    run_saved_image(host, zeros)
    assert not host.node_output(det_id)[1][0][0].any()

    # Typed codes reproduce the image's conditioning.
    text_prompt = {
        "1": {"class_type": "BeyondCLIP_SEEDLoader", "inputs": {"seed_model": TINY_LABEL, "dtype": "auto"}},
        "2": {"class_type": "BeyondCLIP_SEEDCodesFromText", "inputs": {"codes": text}},
        "3": {"class_type": "BeyondCLIP_SEEDDetokenize",
              "inputs": {"seed_model": ["1", 0], "seed_tokens": ["2", 0], "negative": "zeros"}},
        "4": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["3", 0]}},
    }
    host.reset_cache()
    host.run(text_prompt)
    assert torch.equal(host.node_output("3")[0][0][0], positive[0][0])

    # Bad codes are refused with the position and the codebook size.
    bad = copy.deepcopy(text_prompt)
    codes = [str(c) for c in tokens.codes[0].tolist()]
    assert text == "<img>" + "".join(f"<img_{int(c):05d}>" for c in codes) + "</img>"  # SEED-LLaMA's form
    codes[3] = "8192"
    bad["2"]["inputs"]["codes"] = "<img>" + "".join(f"<img_{int(c):05d}>" for c in codes) + "</img>"
    host.reset_cache()
    with pytest.raises(host_module.HostError, match=r"8192 \(image 1, position 4\) is out of range"):
        host.run(bad)
    bad["2"]["inputs"]["codes"] = " ".join(codes[:30])  # the numbers form earlier versions wrote is read too
    with pytest.raises(host_module.HostError, match="30 codes; an image takes exactly 32"):
        host.run(bad)
    # The empty-text negative needs a CLIP.
    no_clip = copy.deepcopy(text_prompt)
    no_clip["3"]["inputs"]["negative"] = "CLIP empty text"
    with pytest.raises(host_module.HostError, match="needs the CLIP of your SD1.x checkpoint"):
        host.run(no_clip)


def test_mix_workflow_takes_a_prefix_of_a_and_the_rest_of_b(host, pack, official, seed_mods):
    a = put_input_image(host, "seed_mix_a.png", 21)
    b = put_input_image(host, "seed_mix_b.png", 22, size=(120, 50))
    prompt = workflow_prompt(host, pack, "seed_mix.json", [a, b], "seed_mix")
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "seed_mix.json", first)
    ta = host.node_output(node_of(prompt, "BeyondCLIP_SEEDTokenize", 0))[0].codes
    tb = host.node_output(node_of(prompt, "BeyondCLIP_SEEDTokenize", 1))[0].codes
    mix_id, det_id = node_of(prompt, "BeyondCLIP_SEEDMixCodes"), node_of(prompt, "BeyondCLIP_SEEDDetokenize")
    mixed, text = host.node_output(mix_id)
    k = prompt[mix_id]["inputs"]["codes_from_a"]
    assert k == 16 and torch.equal(mixed.codes, torch.cat([ta[:, :k], tb[:, k:]], dim=1))
    assert text == mixed.text()
    cond_mixed = host.node_output(det_id)[0][0][0]

    assert run_saved_image(host, prompt).png == first.png
    conds = {}
    for k in (0, 32):
        p = copy.deepcopy(prompt)
        p[mix_id]["inputs"]["codes_from_a"] = k
        conds[k] = (run_saved_image(host, p).pixels, host.node_output(det_id)[0][0][0])
    changes = [pixel_change(conds[k][0], first.pixels) for k in (0, 32)]
    print(f"\nSEED mix: all of b / all of a instead of the mix change the pixels by "
          f"{changes[0]:.2f} / {changes[1]:.2f} levels on average")
    assert min(changes) > 0.5, "the mix must differ from each source picture"
    assert not torch.equal(conds[0][1], cond_mixed) and not torch.equal(conds[32][1], cond_mixed)


def test_empty_batch_and_progress(host, pack, loaded, seed_mods):
    _, _, nodes = seed_mods
    seed, _ = loaded
    with pytest.raises(ValueError, match="the image batch is empty"):
        nodes.SeedTokenize().tokenize(seed, torch.zeros(0, 64, 64, 3))
    with pytest.raises(ValueError, match="is 0x64 pixels"):  # was read as a black picture
        nodes.SeedTokenize().tokenize(seed, torch.zeros(1, 0, 64, 3))
    with pytest.raises(ValueError, match="holds NaN or infinite pixel values"):
        nodes.SeedTokenize().tokenize(seed, torch.full((1, 8, 8, 3), float("inf")))
    batch = torch.cat([as_image_tensor(picture(s, 64, 64)) for s in range(10)])  # two vision passes
    result = nodes.SeedTokenize().tokenize(seed, batch)
    tokens = result["result"][0]
    assert tokens.codes.shape == (10, 32) and len(result["ui"]["text"][0].splitlines()) == 10
    # One at a time gives the same codes as the batch.
    single = nodes.SeedTokenize().tokenize(seed, batch[3:4])["result"][0]
    assert torch.equal(single.codes[0], tokens.codes[3])
    pos, neg = nodes.SeedDetokenize().detokenize(seed, tokens, "zeros")
    assert pos[0][0].shape == (10, 77, 768)


def test_loader_node_lists_official_and_converted_files(host, seed_mods, official, loaded):
    _, _, nodes = seed_mods
    choices = nodes.SeedLoader.INPUT_TYPES()["required"]["seed_model"][0]
    assert TINY_LABEL in choices and "seed-v1-tiny.safetensors" in choices
    assert nodes.SeedLoader.VALIDATE_INPUTS("seed/nothing/seed_tokenizer.pth") is not True
    model = nodes.SeedLoader().load("seed-v1-tiny.safetensors", "fp32")[0]
    assert model.config.num_queries == 32


def test_half_precision_vision_tower(seed_mods, loaded):
    """The vision tower may run in bf16/fp16 (the reference runs it under fp16 autocast); the Q-Former,
    codebook and de-tokenizer stay fp32."""
    bridge, loader, _ = seed_mods
    seed = loader.load_seed(loaded[1], torch.bfloat16)
    model = seed.inner
    assert model.vision_dtype == torch.bfloat16 and model.quantize.embedding.weight.dtype == torch.float32
    pixels = bridge.preprocess(as_image_tensor(picture(3)), 224)
    with torch.no_grad():
        codes = model.encode(pixels)
        full = loaded[0].inner.encode(pixels)
        assert codes.shape == (1, 32) and model.decode(codes).dtype == torch.float32
    assert (codes == full).float().mean() > 0.5  # mostly the same codes as fp32


# ------------------------------------------------------------------ issue 19: files told for what they are

def test_random_bytes_are_not_called_python_objects(tmp_path, pack, seed_mods):
    _, loader, _ = seed_mods
    LoadError = pack_module(pack, "loaders.errors").LoadError
    tok = write_official(tmp_path / "random")
    (tok.parent / "causal_qformer.pth").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(LoadError, match=r"causal_qformer\.pth is not a PyTorch weights file") as e:
        _convert(loader, tok, tmp_path)
    assert "Python objects" not in str(e.value) and "weights_only" not in str(e.value)


def test_the_reverse_qformer_position_ids_buffer_draws_no_warning(tmp_path, seed_mods, caplog):
    """transformers of SEED's time saved BERT's position_ids buffer with the Reverse Q-Former: it is computed, not
    learnt, and is left out with the other unused tensors, never reported as 'not part of SEED v1'."""
    _, loader, _ = seed_mods
    tok = write_official(tmp_path / "posids", tok={
        "Reverse_Qformer.bert.embeddings.position_ids": torch.arange(512)[None]})
    with caplog.at_level(logging.INFO):
        report = _convert(loader, tok, tmp_path)
    assert report["unexpected"] == [] and "not part of SEED v1" not in caplog.text
    assert "the reverse Q-Former's position_ids buffer" in report["ignored"]


def test_conversion_checks_every_shape_before_writing(tmp_path, pack, seed_mods):
    """A wrongly shaped tensor in an official file is named with its file before anything is written: no converted
    file (which would fail at every load and be converted again), no partial file."""
    _, loader, _ = seed_mods
    LoadError = pack_module(pack, "loaders.errors").LoadError
    _, _, tok = official_state(0)
    key = "Reverse_Qformer.bert.encoder.layer.0.attention.output.dense.weight"
    bad = write_official(tmp_path / "shape", tok={key: torch.zeros(tok[key].shape[0], tok[key].shape[1] + 1)})
    out = tmp_path / "converted" / "out.safetensors"
    out.parent.mkdir()
    with pytest.raises(LoadError, match=rf"'{re.escape(key)}' in seed_tokenizer\.pth: .*Nothing was written"):
        loader.convert_official(bad, out)
    assert list(out.parent.iterdir()) == []


def test_fuzz_converted_seed_files(pack, seed_mods, loaded, tmp_path):
    """The converted file's config and tensors, mutated (seeded): every count and shape is checked before anything is
    built, and only the pack's own errors come out."""
    from fuzzing import check, fuzz, mutate_safetensors
    _, loader, _ = seed_mods
    valid = loaded[1].read_bytes()
    path = tmp_path / "seed-fuzz.safetensors"

    def case(rng):
        path.write_bytes(mutate_safetensors(rng, valid))
        return path
    check(fuzz("SEED converted file", lambda p: loader.load_seed(p), case,
               pack_module(pack, "bridges.errors").PackError, budget_s=2.0, min_cases=60))
