"""The encoding cache shared by every encoder node: a second graph (other node ids, the same models, text,
settings and pictures, even loaded by another LoadImage from another file) reuses the encoding without running
a model; any change of prompt, picture, setting, model precision or LoRA misses; the opt-in disk cache is
safetensors with metadata, survives a restart and recomputes a damaged file. GILL, SEED and MUMU, with the
small models of their own tests."""
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import forget_everything, pack_module
from safetensors import safe_open

# The families' small models, as their own tests build them (imported fixtures run once per module here).
from test_gill import picture as gill_picture
from test_gill import reference, release, tiny_opt, towers  # noqa: F401 - fixtures
from test_mumu import ENCODE as MUMU_ENCODE
from test_mumu import TINY_RES, encode_graph
from test_seed import TINY_LABEL, official  # noqa: F401 - fixture
from test_seed import picture as seed_picture

# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def cache(pack):
    return pack_module(pack, "loaders.encode_cache")


@contextmanager
def forward_calls(*modules):
    """Counts the forward calls of every submodule of `modules` while the block runs."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for module in modules for m in module.modules()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def renamed(graph, prefix="x"):
    """The same graph under other node ids. Run after host.reset_cache() (run_counting does): ComfyUI's own
    cache then holds nothing, as when other workflows ran in between (the current host keys it by inputs)."""
    return {prefix + node_id: {"class_type": node["class_type"],
                               "inputs": {k: [prefix + v[0], v[1]] if isinstance(v, list) else v
                                          for k, v in node["inputs"].items()}}
            for node_id, node in graph.items()}


def save_input(host, name, img):
    img.save(Path(host.folder_paths.get_input_directory()) / name)
    return name


def copy_input(host, name, copy_name):
    folder = Path(host.folder_paths.get_input_directory())
    shutil.copyfile(folder / name, folder / copy_name)
    return copy_name


def disk_files(host):
    return set((Path(host.folder_paths.get_output_directory()) / "beyond_clip_encodings").glob("*.safetensors"))


@contextmanager
def new_disk_files(host):
    """Yields the encoding files there were before the block; those written in it are removed afterwards
    (another test counts that folder's files)."""
    before = disk_files(host)
    try:
        yield before
    finally:
        for path in disk_files(host) - before:
            path.unlink()


def written_since(host, before):
    return sorted(disk_files(host) - before)


def read_file(cache, path):
    """(what the header says was encoded, the tensor names) of a safetensors file in the pack's encoding format."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == cache.FORMAT
    about = json.loads(meta["about"])
    assert all(about["identities"])
    return about, names


def run_counting(host, graph, modules, reset=True):
    """(forward calls of `modules`, LRU hits) of one run of `graph`."""
    memory = pack_module(host.pack, "loaders.encode_cache").MEMORY
    if reset:
        host.reset_cache()
    hits = memory.hits
    with forward_calls(*modules) as calls:
        host.run(graph)
    return calls[0], memory.hits - hits


# --------------------------------------------------------------------------------------------- the cache

def test_keys_hash_tensor_contents_and_refuse_opaque_objects(cache):
    a = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    assert cache.cache_key("x", ["id"], ["text", a]) == cache.cache_key("x", ["id"], ["text", a.clone()])
    changed = a.clone()
    changed[0, 3, 3, 1] += 1 / 255
    assert cache.cache_key("x", ["id"], ["text", changed]) != cache.cache_key("x", ["id"], ["text", a])
    assert cache.content_hash(a) != cache.content_hash(a.reshape(1, 8, 24, 1)), "the shape counts"
    assert cache.content_hash(a) != cache.content_hash(a.double()), "the dtype counts"
    assert cache.content_hash(a.transpose(1, 2).contiguous().transpose(1, 2)) == cache.content_hash(a)
    with pytest.raises(TypeError, match="not object"):
        cache.cache_key("x", [object()])


def test_memory_is_bounded_by_count_and_by_bytes(cache):
    lru = cache.EncodingCache(max_items=3, max_bytes=100 * 4)
    for i in range(4):
        lru.put(i, {"t": torch.zeros(10)})
    assert list(lru.items) == [1, 2, 3]
    assert lru.get(1) is not None and lru.get(0) is None and (lru.hits, lru.misses) == (1, 1)
    lru.put("big", {"t": torch.zeros(90)})  # 360 bytes: only the most recent small one (1) still fits beside it
    assert list(lru.items) == [1, "big"]
    lru.put("huge", {"t": torch.zeros(1000)})  # larger than the bound: kept alone (it was just computed)
    assert list(lru.items) == ["huge"]


def test_outputs_are_copies_and_models_without_identity_are_not_cached(pack):
    reuse = pack_module(pack, "engine.cache").reuse_encoding
    calls = []

    def compute():
        calls.append(1)
        return {"c": [[torch.ones(1, 2, 4), {"pooled_output": torch.zeros(1, 3)}]], "t": torch.arange(3)}

    first = reuse("test", ["model-a", "bridge-b"], ["text", 1], compute)
    first["c"][0][1]["width"] = 512  # what a node that does not copy its input would do
    first["c"].append(first["c"][0])
    again = reuse("test", ["model-a", "bridge-b"], ["text", 1], compute)
    assert len(calls) == 1 and len(again["c"]) == 1 and "width" not in again["c"][0][1]
    assert torch.equal(again["t"], torch.arange(3))
    for _ in range(2):  # e.g. a model built in memory by a test or a training run: no file says what it is
        reuse("test", ["model-a", ""], ["text", 1], compute)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------- GILL

# Towers of their own: on the 2024 host, running a tower in a graph leaves inference-mode weights that
# test_gill's direct (autograd-enabled) calls of towers 0 and 1 cannot use.
TOWER, OTHER_TOWER = 5, 6


def gill_graph(llm, image=None, prompt="<image> a red fox in the snow", tower_seed=TOWER, **encode):
    g = {
        "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_GILLLoader", "inputs": {"gill_name": "gill-tiny"}},
        "4": {"class_type": "BeyondCLIP_GILLEncode", "inputs": {"llm": ["1", 0], "gill": ["2", 0], "prompt": prompt,
                                                               **encode}},
        "9": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}},
    }
    if image is not None:
        g["3"] = {"class_type": "BeyondCLIP_TinyCLIPVision", "inputs": {"seed": tower_seed}}
        g["5"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        g["4"]["inputs"].update(images=["5", 0], clip_vision=["3", 0])
    return g


def test_gill_second_graph_reuses_the_encoding_and_changes_miss(host, tiny_opt, release, towers):
    a = save_input(host, "cache_gill_a.png", gill_picture(31, (96, 80)))
    a_copy = copy_input(host, a, "cache_gill_a_copy.png")
    b = save_input(host, "cache_gill_b.png", gill_picture(32, (96, 80)))
    forget_everything(host)
    first = gill_graph(tiny_opt, a)
    host.run(first)
    llm = host.node_output("1")[0]  # held: the loader hands the same instance to the next graph
    opt, tower = llm.inner, towers(TOWER).model
    tokens, states = host.node_output("4")[0][0][0], host.node_output("4")[1]

    other = renamed(gill_graph(tiny_opt, a_copy))  # other ids, the same picture from another file
    calls, hits = run_counting(host, other, [opt, tower])
    assert host.node_output("x1")[0] is llm
    assert (calls, hits) == (0, 1), "the second graph must not run the LLM or the vision tower"
    assert torch.equal(host.node_output("x4")[0][0][0], tokens) and torch.equal(host.node_output("x4")[1], states)

    for change in (dict(prompt="<image> a white owl at night"), dict(image=b), dict(tower_seed=OTHER_TOWER)):
        args = dict(dict(image=a), **change)
        calls, hits = run_counting(host, renamed(gill_graph(tiny_opt, **args), "y"), [opt])
        assert calls > 0 and hits == 0, f"{change} must encode again"
        assert not torch.equal(host.node_output("y4")[0][0][0], tokens), change


def test_gill_disk_cache_round_trip(host, cache, tiny_opt, release, towers):
    g = gill_graph(tiny_opt, prompt="a lighthouse at dusk", cache_to_disk=True)
    with new_disk_files(host) as before:
        forget_everything(host)
        host.run(g)
        llm = host.node_output("1")[0]  # held: the loader hands the same instance to the next runs
        tokens, states = host.node_output("4")[0][0][0], host.node_output("4")[1]
        (path,) = written_since(host, before)
        about, names = read_file(cache, path)
        assert about["what"] == "gill" and about["inputs"][0] == "a lighthouse at dusk" and "gill-tiny" in about["gill"]
        assert names == {"conditioning.0.tokens", "img_states"}
        forget_everything(host)  # a restart: the file is all that is left
        calls, _ = run_counting(host, g, [llm.inner])
        assert calls == 0 and host.node_output("1")[0] is llm
        assert torch.equal(host.node_output("4")[0][0][0], tokens) and torch.equal(host.node_output("4")[1], states)
        path.write_bytes(b"not a safetensors file")
        forget_everything(host)
        calls, _ = run_counting(host, g, [llm.inner])
        assert calls > 0 and torch.equal(host.node_output("4")[0][0][0], tokens)
        assert cache.load_encoding(path, "cpu") is not None, "the damaged file is written again"


# ------------------------------------------------------------------------------------------------- SEED

def seed_graph(image, dtype="auto", **detokenize):
    return {
        "1": {"class_type": "BeyondCLIP_SEEDLoader", "inputs": {"seed_model": TINY_LABEL, "dtype": dtype}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "BeyondCLIP_SEEDTokenize", "inputs": {"seed_model": ["1", 0], "image": ["2", 0],
                                                                 **detokenize}},
        "4": {"class_type": "BeyondCLIP_SEEDDetokenize", "inputs": {"seed_model": ["1", 0], "seed_tokens": ["3", 0],
                                                                   "negative": "zeros", **detokenize}},
        "9": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}},
    }


def codes_graph(text):
    return {
        "1": {"class_type": "BeyondCLIP_SEEDLoader", "inputs": {"seed_model": TINY_LABEL, "dtype": "auto"}},
        "2": {"class_type": "BeyondCLIP_SEEDCodesFromText", "inputs": {"codes": text}},
        "4": {"class_type": "BeyondCLIP_SEEDDetokenize",
              "inputs": {"seed_model": ["1", 0], "seed_tokens": ["2", 0], "negative": "zeros"}},
        "9": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}},
    }


def test_seed_second_graph_reuses_codes_and_conditioning_and_changes_miss(host, official):
    c = save_input(host, "cache_seed_c.png", seed_picture(41, 72, 56))
    c_copy = copy_input(host, c, "cache_seed_c_copy.png")
    d = save_input(host, "cache_seed_d.png", seed_picture(42, 72, 56))
    forget_everything(host)
    host.run(seed_graph(c))
    seed = host.node_output("1")[0]
    model = seed.inner
    codes, text = host.node_output("3")[0].codes, host.node_output("3")[1]
    positive = host.node_output("4")[0][0][0]

    calls, hits = run_counting(host, renamed(seed_graph(c_copy)), [model])
    assert host.node_output("x1")[0] is seed
    assert (calls, hits) == (0, 2), "image -> codes and codes -> conditioning both come from the cache"
    assert torch.equal(host.node_output("x3")[0].codes, codes) and host.node_output("x3")[1] == text
    assert host.node_output("x3")[0].codebook_size == seed.config.codebook_size
    assert torch.equal(host.node_output("x4")[0][0][0], positive)

    # the same codes typed in: the de-tokenizer's encoding is reused
    calls, hits = run_counting(host, renamed(codes_graph(text), "t"), [model])
    assert (calls, hits) == (0, 1) and torch.equal(host.node_output("t4")[0][0][0], positive)
    other_codes = codes.clone()
    other_codes[0, 5] = (other_codes[0, 5] + 1) % 8192
    other_text = pack_module(host.pack, "bridges.seed").SeedCodes(other_codes).text()
    calls, hits = run_counting(host, renamed(codes_graph(other_text), "u"), [model])
    assert calls > 0 and hits == 0 and not torch.equal(host.node_output("u4")[0][0][0], positive)

    # another picture: both steps run
    calls, hits = run_counting(host, renamed(seed_graph(d), "y"), [model])
    assert calls > 0 and hits == 0 and not torch.equal(host.node_output("y3")[0].codes, codes)
    # another precision of the vision tower is another model: its codes are computed, not reused
    memory = pack_module(host.pack, "loaders.encode_cache").MEMORY
    host.reset_cache()
    hits = memory.hits
    host.run(renamed(seed_graph(c, dtype="fp16"), "z"))
    half = host.node_output("z1")[0]
    assert half is not seed and half.identity != seed.identity and memory.hits == hits


def test_seed_disk_cache_round_trip(host, cache, official):
    e = save_input(host, "cache_seed_e.png", seed_picture(43, 64, 64))
    g = seed_graph(e, cache_to_disk=True)
    with new_disk_files(host) as before:
        forget_everything(host)
        host.run(g)
        seed = host.node_output("1")[0]  # held: the loader hands the same instance to the next runs
        codes, positive = host.node_output("3")[0].codes, host.node_output("4")[0][0][0]
        written = written_since(host, before)
        assert len(written) == 2
        files = [read_file(cache, p) for p in written]
        assert {about["what"]: names for about, names in files} == {"seed_codes": {"codes"},
                                                                    "seed_conditioning": {"positive.0.tokens"}}
        assert all(about["inputs"][0].startswith("tensor:") for about, _ in files), "pictures and codes by content"
        forget_everything(host)
        calls, _ = run_counting(host, g, [seed.inner])
        assert calls == 0 and host.node_output("1")[0] is seed and torch.equal(host.node_output("3")[0].codes, codes)
        assert host.node_output("3")[0].codes.dtype == torch.int64
        assert torch.equal(host.node_output("4")[0][0][0], positive)
        for path in written:
            path.write_bytes(b"\0" * 64)
        forget_everything(host)
        calls, _ = run_counting(host, g, [seed.inner])
        assert calls > 0 and torch.equal(host.node_output("4")[0][0][0], positive)
        assert all(cache.load_encoding(p, "cpu") is not None for p in written)


# ------------------------------------------------------------------------------------------------- MUMU

def mumu_graph(idefics2, connector, pictures, prompt="a <image> man on a sofa", lora=None, **overrides):
    g = encode_graph(idefics2, connector, prompt, pictures, **overrides)
    if lora is not None:
        name, strength, mode = lora
        g["5"] = {"class_type": "BeyondCLIP_MUMUIdefics2LoRA", "inputs": {
            "idefics2": ["1", 0], "lora_name": name, "strength": strength, "mode": mode}}
        g["4"]["inputs"]["idefics2"] = ["5", 0]
    return g


def test_mumu_second_graph_reuses_the_encoding_and_changes_miss(host, tiny_idefics2, mumu_connector_file,
                                                                mumu_input_images, mumu_idefics2_lora):
    man, dog = mumu_input_images["man"], mumu_input_images["dog"]
    man_copy = copy_input(host, man, "cache_mumu_man_copy.png")
    forget_everything(host)
    host.run(mumu_graph(tiny_idefics2, mumu_connector_file, [man]))
    vlm = host.node_output("1")[0]
    model = vlm.inner
    positive, negative = host.node_output("4")
    tokens = positive[0][0]

    calls, hits = run_counting(host, renamed(mumu_graph(tiny_idefics2, mumu_connector_file, [man_copy])), [model])
    assert host.node_output("x1")[0] is vlm
    assert (calls, hits) == (0, 2), "positive and negative both come from the cache"
    assert torch.equal(host.node_output("x4")[0][0][0], tokens)
    assert torch.equal(host.node_output("x4")[1][0][0], negative[0][0])

    # SDXL size conditioning is set on a copy: another size reuses the encoding and leaves the cached dict alone
    calls, hits = run_counting(host, renamed(mumu_graph(tiny_idefics2, mumu_connector_file, [man], width=512), "w"),
                               [model])
    assert (calls, hits) == (0, 2) and host.node_output("w4")[0][0][1]["width"] == 512
    assert positive[0][1]["width"] == 1024, "the first graph's output is unchanged"
    memory = pack_module(host.pack, "loaders.encode_cache").MEMORY
    assert all("width" not in entry[1] for value, _ in memory.items.values() for part in value.values()
               for entry in part)

    changes = {"prompt": dict(prompt="a <image> man in the rain"), "picture": dict(pictures=[dog]),
               "resolution": dict(image_resolution=TINY_RES // 2), "budget": dict(token_budget=40)}
    for what, change in changes.items():
        args = dict(dict(pictures=[man]), **change)
        pictures = args.pop("pictures")
        calls, hits = run_counting(host, renamed(mumu_graph(tiny_idefics2, mumu_connector_file, pictures, **args),
                                                 "y"), [model])
        assert calls > 0 and hits == 1, f"another {what}: the positive is encoded again (the negative is reused)"
        assert not torch.equal(host.node_output("y4")[0][0][0], tokens), what

    # the LoRA, its strength and its mode are part of the model
    seen = []
    for lora in ((mumu_idefics2_lora, 1.0, "merged"), (mumu_idefics2_lora, 0.5, "merged"),
                 (mumu_idefics2_lora, 0.5, "unmerged"), (mumu_idefics2_lora, 0.5, "unmerged")):
        calls, hits = run_counting(host, renamed(mumu_graph(tiny_idefics2, mumu_connector_file, [man], lora=lora),
                                                 f"l{len(seen)}"), [model])
        seen.append((calls, hits))
    assert [h for _, h in seen] == [0, 0, 0, 2] and all(c > 0 for c, _ in seen[:3]) and seen[3][0] == 0


def test_mumu_disk_cache_round_trip(host, cache, tiny_idefics2, mumu_connector_file, mumu_input_images):
    g = mumu_graph(tiny_idefics2, mumu_connector_file, [mumu_input_images["dog"]], prompt="a <image> dog",
                   negative="zeros", cache_to_disk=True)
    with new_disk_files(host) as before:
        forget_everything(host)
        host.run(g)
        vlm = host.node_output("1")[0]  # held: the loader hands the same instance to the next runs
        model = vlm.inner
        (tokens, extra), = host.node_output("4")[0]
        (path,) = written_since(host, before)
        about, names = read_file(cache, path)
        assert about["what"] == "mumu" and about["inputs"][0] == "a <image> dog"
        assert about["inputs"][1][0][1].startswith("tensor:"), "the reference picture, by content"
        assert names == {"conditioning.0.tokens", "conditioning.0.pooled_output"}, "size keys are not stored"
        forget_everything(host)
        calls, _ = run_counting(host, g, [model])
        assert calls == 0 and host.node_output("1")[0] is vlm
        (again, again_extra), = host.node_output("4")[0]
        assert torch.equal(again, tokens) and torch.equal(again_extra["pooled_output"], extra["pooled_output"])
        assert again_extra["width"] == 1024
        with open(path, "r+b") as f:  # a header cut short
            f.truncate(20)
        forget_everything(host)
        calls, _ = run_counting(host, g, [model])
        assert calls > 0 and host.node_output("1")[0] is vlm and torch.equal(host.node_output("4")[0][0][0], tokens)
        assert cache.load_encoding(path, "cpu") is not None


def test_every_encoder_node_has_the_disk_option_off_by_default(host):
    """Every encoder node can keep its encodings on disk, off unless asked. The nodes that got the option after
    their first release have it as the last optional input, so widget values stored by position in older
    workflow files still line up; LLM Text Encode had it from the start (a required input before `model`)."""
    for name in ("BeyondCLIP_GILLEncode", "BeyondCLIP_SEEDTokenize", "BeyondCLIP_SEEDDetokenize", MUMU_ENCODE):
        types = host.nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert list(types["optional"])[-1] == "cache_to_disk", name
        assert types["optional"]["cache_to_disk"][1]["default"] is False
    types = host.nodes.NODE_CLASS_MAPPINGS["BeyondCLIP_TextEncode"].INPUT_TYPES()
    assert list(types["required"])[-1] == "cache_to_disk" and list(types["optional"]) == ["model"]
    assert types["required"]["cache_to_disk"][1]["default"] is False
