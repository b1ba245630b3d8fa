"""Seeded fuzzing of every parser of user files in loaders/ (and of prompts through the real tokenizers), in the host:
examples and caption files, MUMU caption lines and picture tables, router JSON, the pack's bridge files of each kind
(mutated configs, dtypes, shapes, offsets and bytes), safetensors headers of LLM weights, pickled checkpoints of
every kind the pack reads, model folders' JSON (config.json with auto_map, GILL's model_args.json, peft's
adapter_config.json), picture files, GILL image indexes and the encoding cache. Each case comes from a fixed seed;
only the pack's own errors (PackError subclasses) may come out. The figures are printed (pytest -s)."""
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import pack_module
from fuzzing import (
    check,
    fuzz,
    json_text,
    mutate_bytes,
    mutate_json,
    mutate_safetensors,
    mutate_text,
    to_bytes,
)
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def allowed(pack):
    return pack_module(pack, "bridges.errors").PackError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def writer(path: Path, make_bytes):
    """A case maker that writes make_bytes(rng) to `path` and returns the path."""
    def make(rng):
        path.write_bytes(make_bytes(rng))
        return path
    return make


# ---- text files the user writes -------------------------------------------------------------------------------

EXAMPLES = "label\ttext\nchat\tWhat is impressionism?\ndraw\ta red fox in the snow\n# note\ndraw\tpaint a lake\n"


def test_fuzz_router_examples_and_caption_files(pack, allowed, scratch):
    routers, inputs = pack_module(pack, "loaders.routers"), pack_module(pack, "loaders.training_inputs")
    path = scratch / "examples.tsv"
    text_file = writer(path, lambda rng: to_bytes(rng, mutate_text(rng, EXAMPLES)))
    check(fuzz("router examples file (.tsv)", routers.read_labelled_tsv, text_file, allowed))
    check(fuzz("GILL decision examples file (.tsv)", lambda p: routers.read_labelled_tsv(p, ("generate", "retrieve")),
               writer(path, lambda rng: to_bytes(rng, mutate_text(rng, EXAMPLES.replace("chat", "generate")
                                                                  .replace("draw", "retrieve")))), allowed))
    check(fuzz("caption file (.txt)", inputs.read_captions,
               writer(scratch / "captions.txt", lambda rng: to_bytes(rng, mutate_text(
                   rng, "# captions\na red fox\n\na lighthouse at dusk\n"))), allowed))
    check(fuzz("MUMU caption line", inputs.parse_mumu_caption,
               lambda rng: mutate_text(rng, "a <image> man and his <image> dog\tman.png\tdog.png"), allowed))


def test_fuzz_router_json(pack, allowed, scratch):
    routers = pack_module(pack, "loaders.routers")
    valid = routers.builtin_router().to_dict()
    valid["token_counts"] = {k: dict(list(v.items())[:20]) for k, v in valid["token_counts"].items()}
    check(fuzz("router file (.router.json)", routers.load_router,
               writer(scratch / "r.router.json", lambda rng: to_bytes(rng, json_text(rng, mutate_json(rng, valid)))),
               allowed))


def test_fuzz_picture_tables_in_the_input_folder(host, pack, allowed):
    from PIL import Image
    inputs = pack_module(pack, "loaders.training_inputs")
    base = Path(host.folder_paths.get_input_directory())
    for name in ("fuzz_a.png", "fuzz_b.png"):
        Image.new("RGB", (8, 8)).save(base / name)
    table = "fuzz_a.png\ta <image> red fox\tfuzz_b.png\nfuzz_b.png\ta lake\n# x\nfuzz_a.png\ta cat\n"
    path = base / "fuzz_pairs.tsv"
    check(fuzz("picture table (.tsv, with crops)", lambda _: inputs.read_pair_set("fuzz_pairs.tsv", crops=True),
               writer(path, lambda rng: to_bytes(rng, mutate_text(rng, table))), allowed))


# ---- the pack's bridge files ----------------------------------------------------------------------------------

def bridge_bytes(tmp, save):
    path = tmp / "valid.safetensors"
    save(path)
    return path.read_bytes()


def test_fuzz_bridge_files_of_every_kind(pack, allowed, scratch):
    mapper_mod, mappers = pack_module(pack, "bridges.mapper"), pack_module(pack, "loaders.mappers")
    repadapter_mod, repadapters = pack_module(pack, "bridges.repadapter"), pack_module(pack, "loaders.repadapters")
    mumu_mod, mumu = pack_module(pack, "bridges.mumu"), pack_module(pack, "loaders.mumu")
    gill_mod, gill = pack_module(pack, "bridges.gill"), pack_module(pack, "loaders.gill")
    torch.manual_seed(0)

    def adapters():
        s = repadapter_mod.AdapterSet()
        for target in ("layers.0.q", "layers.1.q"):
            s.add(target, repadapter_mod.RepAdapter(16, 4, 2, 0.5, dropout=0.0))
        return s

    gill_config = gill_mod.GILLConfig(llm_dim=16, mapper_hidden=8, mapper_heads=2, mapper_ffn=16, encoder_layers=1,
                                      decoder_layers=1, out_tokens=4, vision_dim=8, ret_dim=4, decision_in=16)
    kinds = [
        ("mapper", mappers.load_mapper, lambda p: mappers.save_mapper(p, mapper_mod.BeyondCLIPMapper(
            mapper_mod.MapperConfig(in_dim=16, hidden_dim=8, target="sdxl")))),
        ("RepAdapter", repadapters.load_repadapter,
         lambda p: repadapters.save_repadapter(p, adapters(), 4, 2, 0.5)),
        ("MUMU connector", mumu.load_connector, lambda p: mumu.save_connector(p, mumu_mod.MUMUConnector(
            mumu_mod.ConnectorConfig(in_dim=16, width=16, depth=1, heads=2, out_dim=32, pooled_dim=8)))),
        ("GILL", gill.load_gill, lambda p: pack_module(pack, "loaders.bridge_files").save_bridge(
            p, "gill", gill_config.to_dict(), gill_mod.GILLModel(gill_config).state_dict())),
    ]
    for name, load, save in kinds:
        valid = bridge_bytes(scratch, save)
        path = scratch / f"{name}.safetensors"
        check(fuzz(f"{name} bridge file", load, writer(path, lambda rng, v=valid: mutate_safetensors(rng, v)),
                   allowed))


def test_fuzz_llm_safetensors_headers(pack, allowed, scratch):
    direct = pack_module(pack, "loaders.direct_weights")
    path = scratch / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.ones(4),
               "lm_head.weight": torch.zeros(8, 4, dtype=torch.float16)}, str(path), metadata={"format": "pt"})
    valid = path.read_bytes()
    # Fallback is read_header's signal to load_pretrained ("let from_pretrained read this one"), never shown
    check(fuzz("LLM safetensors header", direct.read_header,
               writer(path, lambda rng: mutate_safetensors(rng, valid)), (allowed, direct.Fallback)))


# ---- pickles: official checkpoints, peft .bin, the trainer's checkpoints -------------------------------------

def pickled(obj, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def test_fuzz_pickled_checkpoints(pack, allowed, scratch):
    pickles, seed, run_folder = (pack_module(pack, f"loaders.{m}") for m in ("pickles", "seed", "run_folder"))
    gill = pack_module(pack, "loaders.gill")
    state = {"model": {"query_tokens": torch.zeros(1, 4, 8), "quantize.embedding.weight": torch.randn(16, 4)},
             "epoch": 3}
    sources = [pickled(state), pickled(state, legacy=True), pickled({"step": 3, "student": {"w": torch.ones(2)},
                                                                      "history": [{"step": 1, "val_loss": 0.5}]})]

    def mutated(rng):
        return mutate_bytes(rng, rng.choice(sources))

    path = scratch / "weights.pth"
    check(fuzz("weights pickle (torch.load weights_only)", lambda p: pickles.load(p, "Download it again."),
               writer(path, mutated), allowed))
    check(fuzz("SEED official file (.pth)", lambda p: seed.read_pickle(p, "SEED tokenizer"), writer(path, mutated),
               allowed))
    run = scratch / "run"
    run.mkdir()
    check(fuzz("training checkpoint (checkpoint.pt)", lambda _: run_folder.load_checkpoint(run),
               writer(run / "checkpoint.pt", mutated), allowed))
    release = scratch / "gill-release"
    release.mkdir()
    ckpt = pickled({"state_dict": {"model.input_embeddings.weight": torch.zeros(8, 16)}})
    check(fuzz("GILL release (pretrained_ckpt.pth.tar)", lambda _: gill.read_official(release),
               writer(release / gill.CKPT, lambda rng: mutate_bytes(rng, ckpt)), allowed))


# ---- JSON of model folders ------------------------------------------------------------------------------------

def test_fuzz_model_folder_json(host, pack, allowed, scratch, tiny_llama):
    llm, gill, peft_lora = (pack_module(pack, f"loaders.{m}") for m in ("llm", "gill", "peft_lora"))
    source = host.models_dir / "LLM" / tiny_llama
    folder = scratch / "llm-folder"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}

    def folder_case(rng):
        (folder / "config.json").write_bytes(to_bytes(rng, json_text(rng, mutate_json(rng, config))))
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "auto_map": {"AutoTokenizer": ["x.Y", None]}}
        tokenizer_text = json_text(rng, mutate_json(rng, tokenizer_config))
        (folder / "tokenizer_config.json").write_bytes(to_bytes(rng, tokenizer_text))
        return folder
    check(fuzz("model folder (config.json, auto_map)", llm.check_folder, folder_case, allowed))

    args = {"opt_version": "facebook/opt-6.7b", "text_fc_mode": "gill_mapper", "text_emb_layers": [-1],
            "num_tokens": 8, "num_clip_tokens": 77, "n_visual_tokens": 4}
    release = scratch / "gill-args"
    release.mkdir()
    check(fuzz("GILL model_args.json", lambda _: gill._read_args(release),
               writer(release / gill.ARGS, lambda rng: to_bytes(rng, json_text(rng, mutate_json(rng, args)))),
               allowed))

    lora = scratch / "peft-lora"
    lora.mkdir()
    adapter = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none",
               "alpha_pattern": {"q_proj": 8}, "use_rslora": False}
    save_file({"base_model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.text_model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)},
              str(lora / "adapter_model.safetensors"))
    weights = (lora / "adapter_model.safetensors").read_bytes()

    def lora_case(rng):
        (lora / "adapter_config.json").write_bytes(to_bytes(rng, json_text(rng, mutate_json(rng, adapter))))
        data = mutate_safetensors(rng, weights) if rng.random() < 0.3 else weights
        (lora / "adapter_model.safetensors").write_bytes(data)
        return lora

    def read_lora(folder):
        config, _ = peft_lora.read_peft_lora(folder)
        peft_lora.scale_for(config, "text_model.layers.0.self_attn.q_proj", 8)
    check(fuzz("peft adapter folder (adapter_config.json)", read_lora, lora_case, allowed))


# ---- pictures, image indexes, the encoding cache ----------------------------------------------------------------

def test_fuzz_picture_files(pack, allowed, scratch):
    from PIL import Image
    images = pack_module(pack, "loaders.images")
    sources = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), (200, 30, 30)).save(buffer, fmt)
        sources.append(buffer.getvalue())
    check(fuzz("picture file", images.load_image,
               writer(scratch / "picture.img", lambda rng: mutate_bytes(rng, rng.choice(sources))), allowed))


def test_fuzz_image_index_and_encoding_cache(pack, allowed, scratch):
    gill, encode_cache = pack_module(pack, "loaders.gill"), pack_module(pack, "loaders.encode_cache")
    retrieval = pack_module(pack, "bridges.retrieval")
    index_dir = scratch / "index"
    index = retrieval.ImageIndex(name="fz", root=str(scratch), paths=["a.png", "b.png"],
                                 embeddings=torch.nn.functional.normalize(torch.randn(2, 4), dim=-1),
                                 fingerprint="tower=x;head=y", stamps=[(1, 2), (3, 4)])
    gill.write_index(index_dir, index)
    tensors, listing = (p.read_bytes() for p in gill.index_files(index_dir, "fz"))
    info = json.loads(listing)

    def index_case(rng):
        t_path, l_path = gill.index_files(index_dir, "fz")
        if rng.random() < 0.5:
            l_path.write_bytes(to_bytes(rng, json_text(rng, mutate_json(rng, info))))
            t_path.write_bytes(tensors)
        else:
            l_path.write_bytes(listing)
            t_path.write_bytes(mutate_safetensors(rng, tensors))
        return index_dir
    check(fuzz("GILL image index", lambda d: gill.read_index(d, "fz"), index_case, allowed))

    path = scratch / "cache.safetensors"
    encode_cache.save_encoding(path, {"conditioning": [[torch.zeros(1, 3, 4), {"pooled_output": torch.ones(1, 2)}]],
                                      "codes": torch.zeros(1, 32, dtype=torch.long)}, {"what": "fuzz"})
    cached = path.read_bytes()
    # an unreadable cache file is recomputed: load_encoding answers None, never raises
    check(fuzz("encoding cache file", lambda p: encode_cache.load_encoding(p, "cpu"),
               writer(path, lambda rng: mutate_safetensors(rng, cached)), allowed))


# ---- prompts through the real tokenizers --------------------------------------------------------------------------

def test_fuzz_prompts_through_the_tokenizers(host, pack, allowed, tiny_llama, tiny_idefics2):
    llm_text = pack_module(pack, "bridges.llm_text")
    llm = pack_module(pack, "loaders.llm").load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama, "fp32")

    def llm_prompt(case):
        text, template, num_tokens = case
        ids = llm_text.prompt_ids(llm.tokenizer, text, context=128, num_tokens=num_tokens, template=template)
        assert ids.ids.shape[1] <= 128 and 0 <= ids.last_token < ids.ids.shape[1]
    check(fuzz("LLM prompt (tokenizer)", llm_prompt,
               lambda rng: (mutate_text(rng, "a red fox in the snow, oil painting"),
                            rng.choice(llm_text.TEMPLATES), rng.choice([0, 77, 128])), allowed))

    mumu_engine = pack_module(pack, "engine.mumu")
    vlm = pack_module(pack, "loaders.mumu").load_idefics2(tiny_idefics2, host.models_dir / "LLM" / tiny_idefics2,
                                                          "fp32")
    picture = torch.rand(12, 10, 3)

    def mumu_prompt(case):
        text, names = case
        mumu_engine.prepare_prompt(vlm, text, [(n, picture) for n in names], 2, 8)
    check(fuzz("MUMU prompt (Idefics2 tokenizer)", mumu_prompt,
               lambda rng: (mutate_text(rng, rng.choice(["a <image> man and his <dog> dog", "a <image> cat"])),
                            rng.choice([["", "dog"], [""], []])), allowed, min_cases=100))

