"""Beyond CLIP nodes in the real host: adapters, router, caching, progress, interruption, stock nodes, bad input."""
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import forget_everything, host_module, pack_module

ENCODE = "BeyondCLIP_TextEncode"


def encode_graph(llm, mapper, prompt="a red fox in the snow", *, adapter=None, mode="merged", negative="zeros",
                 model_arch=None):
    """API prompt: LLM loader (+ RepAdapter) + mapper -> encode node '4'."""
    g = {
        "1": {"class_type": "BeyondCLIP_LLMLoader", "inputs": {"llm_name": llm, "dtype": "fp32"}},
        "2": {"class_type": "BeyondCLIP_MapperLoader", "inputs": {"mapper_name": mapper}},
        "4": {"class_type": ENCODE, "inputs": {"llm": ["1", 0], "mapper": ["2", 0], "prompt": prompt,
                                               "negative_prompt": "", "negative": negative, "hidden_layer": -1,
                                               "template": "none", "cache_to_disk": False}},
        "99": {"class_type": "TestConditioningSink", "inputs": {"conditioning": ["4", 0]}},
    }
    if adapter:
        g["3"] = {"class_type": "BeyondCLIP_RepAdapterLoader", "inputs": {"adapter_name": adapter}}
        g["5"] = {"class_type": "BeyondCLIP_ApplyRepAdapter", "inputs": {"llm": ["1", 0], "repadapter": ["3", 0],
                                                                         "mode": mode}}
        g["4"]["inputs"]["llm"] = ["5", 0]
    if model_arch:
        g["6"] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": model_arch}}
        g["4"]["inputs"]["model"] = ["6", 0]
    return g


def add_sampler(g, arch, positive=("4", 0), negative=("4", 1), model=None, seed=1):
    g.setdefault("6", {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}})
    g["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["8"] = {"class_type": "KSampler", "inputs": {
        "model": list(model or ("6", 0)), "positive": list(positive), "negative": list(negative),
        "latent_image": ["7", 0], "seed": seed, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 1.0}}
    g["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["6", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "nodes"}}
    return g


def positive_tokens(host, g):
    host.run(g)
    return host.node_output("4")[0][0][0]


def test_repadapter_merged_equals_unmerged_and_leaves_the_plain_llm_intact(host, tiny_llama, mapper_files,
                                                                            adapter_file):
    mapper = mapper_files["sd1"]
    plain = positive_tokens(host, encode_graph(tiny_llama, mapper))
    merged = positive_tokens(host, encode_graph(tiny_llama, mapper, adapter=adapter_file, mode="merged"))
    unmerged = positive_tokens(host, encode_graph(tiny_llama, mapper, adapter=adapter_file, mode="unmerged"))
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4), (merged - unmerged).abs().max()
    assert (merged - plain).abs().max() > 1e-2, "the adapter must change the encoding"
    # The merge is a patch on a clone: the plain LLM, used after it, still gives its own encoding.
    forget_everything(host)
    assert torch.equal(positive_tokens(host, encode_graph(tiny_llama, mapper)), plain)


def test_merged_forward_costs_the_plain_flops(host, pack, tiny_llama, adapter_file):
    from torch.utils.flop_counter import FlopCounterMode
    llm_mod, rep, patcher = (pack_module(pack, m) for m in ("loaders.llm", "loaders.repadapters", "loaders.patcher"))
    text = pack_module(pack, "bridges.llm_text")
    llm = llm_mod.load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama, "fp32")
    adapters = rep.load_repadapter(host.models_dir / "bridges" / adapter_file)

    def flops(handle):
        model = patcher.load_to_device(handle.patcher)
        ctx = handle.adapter.attach(model) if handle.adapter else torch.no_grad()
        with FlopCounterMode(display=False) as counter, ctx, torch.no_grad():
            text.encode(model, handle.tokenizer, "a lighthouse at dusk", num_tokens=16)
        return counter.get_total_flops()

    plain = flops(llm)
    assert flops(rep.apply_repadapter(llm, adapters, "merged")) == plain
    assert flops(rep.apply_repadapter(llm, adapters, "unmerged")) > plain


def test_unchanged_graph_reencodes_nothing_and_a_new_seed_only_resamples(host, tiny_llama, mapper_files):
    host.reset_cache()
    g = add_sampler(encode_graph(tiny_llama, mapper_files["sd1"]), "sd15")
    host.run(g)
    host.run(g)
    assert {"1", "2", "4", "8", "10"} <= host.cached_nodes()
    g["8"]["inputs"]["seed"] = 2
    host.run(g)
    cached = host.cached_nodes()
    assert {"1", "2", "4"} <= cached and "8" not in cached


def test_loading_shows_progress_and_stops_when_interrupted(host, pack, tiny_llama, mapper_files):
    import comfy.model_management as mm
    import comfy.utils
    host.reset_cache()
    pack_module(pack, "loaders.handles").forget_all()
    host.progress.clear()
    host.run(encode_graph(tiny_llama, mapper_files["sd1"]))
    assert (4, 4) in host.progress and (2, 2) in host.progress  # loader (4 steps) and encoder (2 steps)

    def interrupt_at_first_step(value, total, *args, **kwargs):
        mm.interrupt_current_processing(True)
    host.reset_cache()
    pack_module(pack, "loaders.handles").forget_all()
    comfy.utils.set_progress_bar_global_hook(interrupt_at_first_step)
    try:
        with pytest.raises(host_module.HostError, match="interrupted"):
            host.run(encode_graph(tiny_llama, mapper_files["sd1"]))
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: host.progress.append((value, total)))


@pytest.mark.parametrize("arch,target", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_stock_conditioning_nodes_accept_the_output(host, tiny_llama, mapper_files, arch, target):
    """Users mix the LLM conditioning with CLIP's (for LoRA trigger words) through the stock nodes."""
    g = encode_graph(tiny_llama, mapper_files[target], negative="encode negative text")
    g["6"] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": arch}}
    g["11"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 1], "text": "loratrigger, a fox"}}
    g["12"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["11", 0]}}
    g["13"] = {"class_type": "ConditioningConcat",
               "inputs": {"conditioning_to": ["12", 0], "conditioning_from": ["11", 0]}}
    g["14"] = {"class_type": "ConditioningAverage",
               "inputs": {"conditioning_to": ["4", 0], "conditioning_from": ["11", 0], "conditioning_to_strength": 0.5}}
    g["15"] = {"class_type": "ConditioningSetTimestepRange",
               "inputs": {"conditioning": ["14", 0], "start": 0.0, "end": 0.5}}
    g["16"] = {"class_type": "ConditioningCombine",
               "inputs": {"conditioning_1": ["13", 0], "conditioning_2": ["15", 0]}}
    g["17"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["4", 1], "width": 64, "height": 64,
                                                               "x": 0, "y": 0, "strength": 1.0}}
    g["18"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["17", 0]}}
    add_sampler(g, arch, positive=("16", 0), negative=("18", 0))
    host.reset_cache()
    images = host.saved_images(host.run(g))
    assert len(images) == 1
    concat = host.node_output("13")[0]
    assert concat[0][0].shape[1] == 154  # 77 LLM tokens + 77 CLIP tokens, one sequence


def test_router_answers_chat_and_draws_draw(host, tiny_llama, mapper_files):
    g = encode_graph(tiny_llama, mapper_files["sd1"])
    g["4"] = {"class_type": "BeyondCLIP_Assistant", "inputs": {
        "llm": ["1", 0], "mapper": ["2", 0], "router": "builtin (trained on the pack's instructions)",
        "prompt": "What is the capital of France? Explain briefly.", "max_new_tokens": 8, "template": "none"}}
    add_sampler(g, "sd15")
    forget_everything(host)
    ui = host.run(g)
    answer, route = host.node_output("4")[2:4]
    assert route == "chat" and isinstance(answer, str)
    assert ui["4"]["text"] == [answer]
    blockable = host_module.Host.supports_execution_blocker()
    # Where the host can block a branch, the chat route spends no time sampling.
    assert bool(host.saved_images(ui)) != blockable

    g["4"]["inputs"]["prompt"] = "a watercolor painting of a fox in the snow"
    host.reset_cache()
    ui = host.run(g)
    positive, negative, answer, route, p_draw, conversation = host.node_output("4")
    assert route == "draw" and p_draw > 0.5 and answer == ""
    assert [t.role for t in conversation.turns] == ["user", "assistant"] and conversation.pending() == [(1, 0)]
    assert positive[0][0].shape == (1, 77, 768)
    assert len(host.saved_images(ui)) == 1


# ---- bad input: each fails with a message that names the file or input and says what to do ----

def run_error(host, g):
    forget_everything(host)
    with pytest.raises(host_module.HostError) as info:
        host.run(g)
    return str(info.value)


def test_missing_llm_folder(host, mapper_files):
    msg = run_error(host, encode_graph("no-such-llm", mapper_files["sd1"]))
    assert "no-such-llm" in msg and "models/LLM" in msg


def test_llm_folder_without_tokenizer(host, tiny_llama, mapper_files):
    folder = host.models_dir / "LLM" / "no-tokenizer"
    folder.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(host.models_dir / "LLM" / tiny_llama / f, folder / f)
    msg = run_error(host, encode_graph("no-tokenizer", mapper_files["sd1"]))
    assert "no-tokenizer" in msg and "tokenizer files" in msg


def test_truncated_llm_weights(host, tiny_llama, mapper_files, pack):
    folder = host.models_dir / "LLM" / "truncated-llm"
    shutil.copytree(host.models_dir / "LLM" / tiny_llama, folder, dirs_exist_ok=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    msg = run_error(host, encode_graph("truncated-llm", mapper_files["sd1"]))
    assert "truncated-llm" in msg and ("corrupt" in msg or "truncated" in msg)
    assert not any("truncated-llm" in str(key) for key in pack_module(pack, "loaders.handles")._LIVE)


def test_folder_of_another_kind_of_model(host, mapper_files):
    from transformers import CLIPTextConfig, CLIPTextModel
    folder = host.models_dir / "LLM" / "a-clip-text-encoder"
    CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100)).save_pretrained(str(folder))
    shutil.copy(host.models_dir / "LLM" / "tiny-llama" / "tokenizer.json", folder / "tokenizer.json")
    msg = run_error(host, encode_graph("a-clip-text-encoder", mapper_files["sd1"]))
    assert "a-clip-text-encoder" in msg and "not a causal language model" in msg


def test_mapper_for_another_llm_width(host, pack, tiny_llama):
    tiny_llm = pack_module(pack, "headless.tiny_llm")
    name = "width-32-mapper.safetensors"
    pack_module(pack, "loaders.mappers").save_mapper(host.models_dir / "bridges" / name, tiny_llm.random_mapper(32))
    msg = run_error(host, encode_graph(tiny_llama, name))
    assert name in msg and "32-wide" in msg and "64" in msg


def test_sd1_mapper_with_sdxl_model_fails_before_sampling(host, tiny_llama, mapper_files):
    g = add_sampler(encode_graph(tiny_llama, mapper_files["sd1"], model_arch="sdxl"), "sdxl")
    msg = run_error(host, g)
    assert "node 4" in msg and "768" in msg and "SDXL" in msg and mapper_files["sd1"] in msg


def test_empty_prompt(host, tiny_llama, mapper_files):
    msg = run_error(host, encode_graph(tiny_llama, mapper_files["sd1"], prompt="   "))
    assert "prompt is empty" in msg


def test_long_prompt_is_cut_with_a_warning(host, pack, tiny_llama, caplog):
    name = "untruncated-mapper.safetensors"  # num_tokens=0: keep the prompt's own length, up to the context
    tiny_llm = pack_module(pack, "headless.tiny_llm")
    pack_module(pack, "loaders.mappers").save_mapper(host.models_dir / "bridges" / name,
                                                     tiny_llm.random_mapper(64, num_tokens=0))
    words = "a fox and a lighthouse on a hill " * 40
    host.reset_cache()
    with caplog.at_level(logging.WARNING):
        tokens = positive_tokens(host, encode_graph(tiny_llama, name, prompt=words))
    assert tokens.shape[1] == 128  # the tiny Llama's context
    assert any("only the first 128 are used" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncated", "other-kind", "not-ours", "missing"])
def test_broken_mapper_files(host, pack, tiny_llama, mapper_files, adapter_file, damage):
    bridges = host.models_dir / "bridges"
    name = f"broken-{damage}.safetensors"
    if damage == "truncated":
        data = (bridges / mapper_files["sd1"]).read_bytes()
        (bridges / name).write_bytes(data[: len(data) - 100])
        expected = "truncated or corrupt"
    elif damage == "other-kind":
        shutil.copy(bridges / adapter_file, bridges / name)
        expected = "holds a RepAdapter, not a Beyond CLIP mapper"
    elif damage == "not-ours":
        from safetensors.torch import save_file
        save_file({"lora_unet_down.lora_up.weight": torch.zeros(4, 4)}, str(bridges / name))
        expected = "not a Beyond CLIP bridge"
    else:
        expected = "not in models/bridges"
    msg = run_error(host, encode_graph(tiny_llama, name))
    assert name in msg and expected in msg


def test_dropdowns_list_what_is_present(host, tiny_llama, mapper_files):
    loader = host.nodes.NODE_CLASS_MAPPINGS["BeyondCLIP_LLMLoader"]
    assert tiny_llama in loader.INPUT_TYPES()["required"]["llm_name"][0]
    mapper_loader = host.nodes.NODE_CLASS_MAPPINGS["BeyondCLIP_MapperLoader"]
    assert mapper_files["sdxl"] in mapper_loader.INPUT_TYPES()["required"]["mapper_name"][0]


def test_half_precision_loads_and_emits_float32(host, tiny_llama, mapper_files):
    g = encode_graph(tiny_llama, mapper_files["sd1"])
    g["1"]["inputs"]["dtype"] = "bf16"
    host.reset_cache()
    host.run(g)
    llm = host.node_output("1")[0]
    assert llm.dtype == torch.bfloat16 and next(llm.patcher.model.parameters()).dtype == torch.bfloat16
    assert host.node_output("4")[0][0][0].dtype == torch.float32


def test_identical_requests_from_another_graph_reuse_the_encoding(host, pack, tiny_llama, mapper_files, monkeypatch):
    engine = pack_module(pack, "engine.beyond_clip")
    calls = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    forget_everything(host)
    g = encode_graph(tiny_llama, mapper_files["sd1"], prompt="a heron in the reeds")
    host.run(g)
    assert calls == ["a heron in the reeds"]
    first = host.node_output("4")[0][0][0].clone()
    other = {f"x{k}": v for k, v in g.items()}  # another graph: other node ids, same requests
    for node in other.values():
        node["inputs"] = {k: [f"x{v[0]}", v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
    host.reset_cache()
    host.run(other)
    assert calls == ["a heron in the reeds"], "the second graph must not encode again"
    assert torch.equal(host.node_output("x4")[0][0][0], first), "the second graph gets the first graph's encoding"


def test_disk_cache_survives_a_restart_and_ignores_damaged_files(host, pack, tiny_llama, mapper_files, monkeypatch):
    engine = pack_module(pack, "engine.beyond_clip")
    calls = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    g = encode_graph(tiny_llama, mapper_files["sdxl"], prompt="a kingfisher on a branch")
    g["4"]["inputs"]["cache_to_disk"] = True
    forget_everything(host)
    first = positive_tokens(host, g)
    cache_dir = Path(host.folder_paths.get_output_directory()) / "beyond_clip_encodings"
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == 1 and len(calls) == 1  # negative = zeros: one text encoded
    forget_everything(host)  # a restart: memory caches are gone, the file is not
    again = positive_tokens(host, g)
    assert len(calls) == 1 and torch.equal(again, first)
    assert host.node_output("4")[0][0][1]["pooled_output"].shape == (1, 1280)
    files[0].write_bytes(b"not a safetensors file")
    forget_everything(host)
    assert torch.equal(positive_tokens(host, g), first) and len(calls) == 2  # recomputed, and written again


def test_memory_manager_accounts_the_llm_and_can_offload_it(host, pack, tiny_llama, mapper_files):
    """ComfyUI's memory manager sees the LLM at its real size and can unload it (on a GPU: to make room for the
    UNet); the next encode loads it back."""
    import comfy.model_management as mm
    forget_everything(host)
    host.run(encode_graph(tiny_llama, mapper_files["sd1"], prompt="a tern over the waves"))
    llm = host.node_output("1")[0]
    inner = llm.inner
    param_bytes = sum(p.numel() * p.element_size() for p in inner.parameters())
    assert llm.patcher.model_size() == param_bytes
    loaded = [m.model for m in mm.current_loaded_models]
    assert llm.patcher in loaded
    mm.free_memory(1e30, mm.get_torch_device())  # what the UNet's load asks for when memory is short
    assert llm.patcher not in [m.model for m in mm.current_loaded_models]
    assert next(inner.parameters()).device == llm.patcher.offload_device
    forget_everything(host)
    host.run(encode_graph(tiny_llama, mapper_files["sd1"], prompt="a tern over the waves"))
    assert host.node_output("1")[0].patcher in [m.model for m in mm.current_loaded_models]


def test_a_little_memory_asked_for_unloads_the_llm_whole(host, pack, tiny_llama, mapper_files):
    """ComfyUI (2025 hosts) first tries to unload a model in part when a little memory is needed; the pack's models
    are not built from comfy.ops and leave whole, so no half of an LLM stays in VRAM beside the UNet."""
    import comfy.model_management as mm
    forget_everything(host)
    host.run(encode_graph(tiny_llama, mapper_files["sd1"], prompt="a tern over the waves"))
    llm = host.node_output("1")[0]
    entry = next(m for m in mm.current_loaded_models if m.model is llm.patcher)
    import inspect
    if "memory_to_free" not in inspect.signature(entry.model_unload).parameters:
        pytest.skip(f"ComfyUI {host.version} never unloads a model in part")
    size = llm.patcher.model_size()
    assert llm.patcher.partially_unload(llm.patcher.offload_device, size // 4) == 0
    assert entry.model_unload(memory_to_free=size // 4) is True, "unloaded whole, not in part"
    assert llm.patcher.loaded_size() == 0
    mm.current_loaded_models.remove(entry)
