"""int8 and nf4 LLMs (bitsandbytes) in the real host: the shipped 4-bit workflow, the memory accounting, adapters,
and what the loader says when bitsandbytes is missing or cannot run on the device. bitsandbytes runs on the CPU
here (its CPU backend); on a GPU the same code quantizes on CUDA."""
import copy
import sys
import types

import bitsandbytes as bnb  # noqa: E402, F401 - the test extras install it: missing, these tests fail
import pytest
import torch
from conftest import check_golden_pixels, forget_everything, node_of, pack_module, pixel_change, run_saved_image
from test_beyond_clip_nodes import encode_graph, positive_tokens, run_error
from test_beyond_clip_workflows import workflow_prompt

CHOICES = {"int8": "int8 (bitsandbytes)", "nf4": "nf4 (bitsandbytes)"}
LAYERS = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


def state_dict_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def skip_unless_releases_run(pack, kind):
    """Skip, naming the versions, where this transformers or bitsandbytes cannot run the choice here (CI's oldest
    release set); test_too_old_releases_are_named checks the loader's message on every release."""
    import comfy.model_management as mm
    needs = pack_module(pack, "loaders.llm").quantization_needs(CHOICES[kind], mm.text_encoder_device())
    if needs:
        pytest.skip(f"{CHOICES[kind]} needs {needs}")


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_llm_is_accounted_at_its_packed_size_and_encodes_like_fp32(host, pack, tiny_llama, mapper_files,
                                                                             kind):
    import comfy.model_management as mm
    skip_unless_releases_run(pack, kind)
    llm_mod = pack_module(pack, "loaders.llm")
    g = encode_graph(tiny_llama, mapper_files["sdxl"], prompt="a tern over the waves")
    full = positive_tokens(host, g)
    fp32 = host.node_output("1")[0]
    fp32_linears = {n: m.weight.numel() for n, m in fp32.inner.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not fp32.inner.get_output_embeddings()}

    g["1"]["inputs"]["dtype"] = CHOICES[kind]
    forget_everything(host)
    quantized = positive_tokens(host, g)
    llm = host.node_output("1")[0]
    inner = llm.inner
    layers = {n: m for n, m in inner.named_modules() if n in fp32_linears}
    assert {type(m).__name__ for m in layers.values()} == {LAYERS[kind]}, "every linear but the output is quantized"
    for name, layer in layers.items():  # a byte per weight, or half a byte
        assert layer.weight.numel() * layer.weight.element_size() == fp32_linears[name] // (1 if kind == "int8" else 2)
    assert llm.quantized == CHOICES[kind] and llm.dtype == torch.float32  # compute dtype on a CPU

    # ComfyUI's memory manager holds it from the load on, at the bytes it really takes; the size hint the loader
    # frees before loading is within 2 % of that.
    size = llm.patcher.model_size()
    assert size == state_dict_bytes(inner) < 0.75 * fp32.patcher.model_size()
    hint = llm_mod.quantized_size(host.models_dir / "LLM" / tiny_llama, CHOICES[kind], torch.float32)
    print(f"\n{kind}: {size} bytes in ComfyUI's accounting, hint {hint}, fp32 {fp32.patcher.model_size()}")
    assert abs(hint - size) <= 0.02 * size
    assert llm.patcher in [m.model for m in mm.current_loaded_models]

    similarity = cosine(quantized, full)
    print(f"{kind}: cosine similarity of the conditioning with the fp32 LLM's {similarity:.4f}")
    assert similarity > (0.99 if kind == "int8" else 0.95) and not torch.equal(quantized, full)

    # When the UNet needs the memory, ComfyUI unloads what it can: the quantized LLM stays on its device and
    # encodes the same afterwards.
    mm.free_memory(1e30, mm.get_torch_device())
    assert next(iter(layers.values())).weight.device == llm.patcher.load_device
    host.reset_cache()
    pack_module(pack, "loaders.encode_cache").MEMORY.clear()
    assert torch.equal(positive_tokens(host, g), quantized)


def test_shipped_nf4_workflow_end_to_end(host, pack, tiny_llama, mapper_files):
    skip_unless_releases_run(pack, "nf4")
    prompt = workflow_prompt(host, pack, "beyond_clip_sdxl_nf4.json", arch="sdxl", llm=tiny_llama,
                             mapper=mapper_files["sdxl"], prefix="t_nf4")
    loader = node_of(prompt, "BeyondCLIP_LLMLoader")
    assert prompt[loader]["inputs"]["dtype"] == "nf4 (bitsandbytes)"
    first = run_saved_image(host, prompt)
    check_golden_pixels(host, "beyond_clip_sdxl_nf4.json", first)
    assert type(host.node_output(loader)[0].inner.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    encode_id = node_of(prompt, "BeyondCLIP_TextEncode")
    positive, negative = host.node_output(encode_id)
    assert positive[0][0].shape == (1, 77, 2048) and positive[0][0].dtype == torch.float32
    assert positive[0][1]["pooled_output"].shape == (1, 1280) and torch.isfinite(positive[0][0]).all()
    assert run_saved_image(host, prompt).png == first.png, "same seed and prompt must give a byte-identical image"

    other = copy.deepcopy(prompt)
    other[encode_id]["inputs"]["prompt"] = "an oil painting of a red fox in the snow"
    change = pixel_change(run_saved_image(host, other).pixels, first.pixels)
    print(f"\nnf4 workflow: another prompt changes the pixels by {change:.2f} levels on average")
    assert change > 0.5

    # The same graph with the LLM in fp32: close, but not the same picture.
    full = copy.deepcopy(prompt)
    full[loader]["inputs"]["dtype"] = "fp32"
    fp32_change = pixel_change(run_saved_image(host, full).pixels, first.pixels)
    print(f"nf4 vs fp32 LLM: {fp32_change:.2f} levels; another prompt: {change:.2f}")
    assert fp32_change < change


def test_adapters_on_a_quantized_llm(host, pack, tiny_llama, mapper_files, adapter_file):
    skip_unless_releases_run(pack, "int8")
    g = encode_graph(tiny_llama, mapper_files["sd1"], adapter=adapter_file, mode="merged")
    g["1"]["inputs"]["dtype"] = CHOICES["int8"]
    msg = run_error(host, g)
    assert "int8 (bitsandbytes)" in msg and "cannot take a merged adapter" in msg and "unmerged" in msg
    g["5"]["inputs"]["mode"] = "unmerged"
    adapted = positive_tokens(host, g)
    plain = encode_graph(tiny_llama, mapper_files["sd1"])
    plain["1"]["inputs"]["dtype"] = CHOICES["int8"]
    assert (adapted - positive_tokens(host, plain)).abs().max() > 1e-2, "the adapter must change the encoding"


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_without_bitsandbytes_the_choice_says_what_to_install(host, tiny_llama, mapper_files, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when it is absent
    g = encode_graph(tiny_llama, mapper_files["sd1"])
    g["1"]["inputs"]["dtype"] = CHOICES[kind]
    msg = run_error(host, g)
    assert CHOICES[kind] in msg and "pip install bitsandbytes" in msg and "fp32" in msg


def test_a_bitsandbytes_that_cannot_run_on_the_device_is_named(host, tiny_llama, mapper_files, monkeypatch):
    """An older bitsandbytes has no kernels for this device: the message names its version and the way out."""
    old = types.ModuleType("bitsandbytes")
    old.__version__ = "0.41.0"

    def no_kernels(*args, **kwargs):
        raise RuntimeError("CUDA Setup failed despite GPU being available")
    old.nn = types.SimpleNamespace(Linear8bitLt=no_kernels, Linear4bit=no_kernels)
    monkeypatch.setitem(sys.modules, "bitsandbytes", old)
    g = encode_graph(tiny_llama, mapper_files["sd1"])
    g["1"]["inputs"]["dtype"] = CHOICES["nf4"]
    msg = run_error(host, g)
    assert "bitsandbytes 0.41.0 cannot run on cpu" in msg and "CUDA Setup failed" in msg
    assert "pip install -U bitsandbytes" in msg


@pytest.mark.parametrize("kind,transformers_version,bnb_version,needed", [
    ("nf4", "4.52.4", "0.46.0", "transformers 4.53 or newer on the CPU"),
    ("int8", "4.57.6", "0.48.0", "transformers 5.0 or newer on the CPU"),
    ("int8", "5.0.0", "0.46.1", "bitsandbytes 0.48 or newer on the CPU"),
    ("nf4", "5.0.0", "0.46.0", "bitsandbytes 0.46.1 or newer on the CPU"),
])
def test_too_old_releases_are_named(host, tiny_llama, mapper_files, monkeypatch, kind, transformers_version,
                                    bnb_version, needed):
    """Releases that load but cannot run the choice (found by running these tests on them) are refused before
    loading, with what is needed and what is there."""
    import transformers
    monkeypatch.setattr(transformers, "__version__", transformers_version)
    monkeypatch.setattr(bnb, "__version__", bnb_version)
    g = encode_graph(tiny_llama, mapper_files["sd1"])
    g["1"]["inputs"]["dtype"] = CHOICES[kind]
    msg = run_error(host, g)
    assert CHOICES[kind] in msg and needed in msg
    assert f"transformers {transformers_version}, bitsandbytes {bnb_version}" in msg
    assert "pip install -U transformers bitsandbytes" in msg and "fp32" in msg
