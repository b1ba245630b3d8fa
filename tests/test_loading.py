"""The direct safetensors loader (loaders/direct_weights.py) against transformers' from_pretrained.

Every state-dict tensor, buffer, config and generation config must be identical, and so must the outputs, for
Llama (untied, tied, sharded), OPT (tied) and Idefics2, in the file's dtype (memory-mapped) and in another one
(converted), and through the copying reader used where memory maps are not; a checkpoint that does not match
falls back to from_pretrained; a truncated or corrupt file is a LoadError naming the file.

The direct reader needs transformers 5; on older ones it declines and the loaders use from_pretrained: the tests
of the reader itself skip there, those of the loaders (same model as from_pretrained, same messages) run on both.
"""
import json
import logging
import shutil
import struct
import sys

import pytest
import torch
from conftest import pack_module

DIRECT = "loaded directly"
FALLBACK = "loading with transformers' from_pretrained"


def _transformers_major():
    import transformers
    return int(transformers.__version__.split(".")[0])


needs_transformers_5 = pytest.mark.skipif(
    _transformers_major() < 5,
    reason="the direct weight reader needs transformers 5 (older ones load with from_pretrained: see the loader tests)")


@pytest.fixture(scope="module")
def direct(pack):
    return pack_module(pack, "loaders.direct_weights")


@pytest.fixture(scope="module")
def LoadError(pack):
    return pack_module(pack, "loaders.errors").LoadError


@pytest.fixture(scope="module")
def folders(pack, tmp_path_factory):
    """Small causal LM folders: llama (lm_head saved), llama-tied (lm_head not saved), llama-sharded (several
    files + index), llama-bf16 (bf16 file, as most releases), opt (its embeddings tied by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tiny_llm = pack_module(pack, "headless.tiny_llm")
    base = tmp_path_factory.mktemp("direct-llms")
    out = {"llama": tiny_llm.write_llm_folder(base / "llama", "llama", seed=1),
           "opt": tiny_llm.write_llm_folder(base / "opt", "opt", seed=2)}
    for name, tie, shard, dtype in (("llama-tied", True, None, torch.float32),
                                    ("llama-sharded", False, "60KB", torch.float32),
                                    ("llama-bf16", False, None, torch.bfloat16)):
        folder = tiny_llm.write_llm_folder(base / name, "llama")
        config = LlamaConfig.from_pretrained(str(folder))
        config.tie_word_embeddings = tie
        torch.manual_seed(3)
        (folder / "model.safetensors").unlink()
        kwargs = {"max_shard_size": shard} if shard else {}
        LlamaForCausalLM(config).to(dtype).save_pretrained(str(folder), **kwargs)
        out[name] = folder
    assert len(list(out["llama-sharded"].glob("*.safetensors"))) > 1
    from safetensors import safe_open
    for name in ("llama-tied", "opt"):  # tied weights are saved once: loading must tie them
        with safe_open(str(out[name] / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - safe_open handles are not iterable
    return out


def assert_same_model(got, ref, skip=()):
    """Identical tensors (values, dtypes, parameter or buffer), configs and generation configs."""
    assert type(got) is type(ref)
    a, b = ({k: v for k, v in m.state_dict().items() if not k.startswith(skip)} for m in (got, ref))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    a, b = ({k: v for k, v in m.named_buffers() if not k.startswith(skip)} for m in (got, ref))
    assert a.keys() == b.keys()  # non-persistent buffers (rotary inv_freq) too
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    a, b = ({k: p.requires_grad for k, p in m.named_parameters() if not k.startswith(skip)} for m in (got, ref))
    assert a == b
    assert not got.training and not ref.training
    assert got.config.to_dict() == ref.config.to_dict()
    if ref.can_generate():
        assert got.generation_config.to_dict() == ref.generation_config.to_dict()


def from_pretrained(cls, folder, dtype):
    import transformers
    from packaging.version import Version
    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return cls.from_pretrained(str(folder), local_files_only=True, **{dtype_arg: dtype})


def in_file_map(tensor, file) -> bool:
    """Whether the tensor's memory lies in a memory map of `file` (Linux: /proc/self/maps)."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= ptr < end and len(parts) > 5 and parts[5] == str(file.resolve()):
                return True
    return False


@needs_transformers_5
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "llama-sharded", "llama-bf16", "opt"])
@pytest.mark.parametrize("dtype,use_mmap", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False),
                                            (torch.bfloat16, False)])
def test_causal_lm_equals_from_pretrained(direct, folders, arch, dtype, use_mmap, caplog):
    from transformers import AutoModelForCausalLM
    folder = folders[arch]
    ref = from_pretrained(AutoModelForCausalLM, folder, dtype)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger=direct.__name__):
        got = direct.load_pretrained(AutoModelForCausalLM, folder, dtype, use_mmap=use_mmap)
    assert got is not None, caplog.text
    assert DIRECT in caplog.text
    assert torch.equal(torch.get_rng_state(), rng), "loading must not move the caller's random numbers"
    assert_same_model(got, ref)
    tied = got.config.tie_word_embeddings
    assert tied == (arch in ("llama-tied", "opt"))
    assert (got.get_output_embeddings().weight is got.get_input_embeddings().weight) == tied
    ids = torch.tensor([[1, 17, 40, 3, 99, 250, 7]])
    with torch.no_grad():
        a, b = (m(ids, output_hidden_states=True) for m in (got, ref))
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    if sys.platform.startswith("linux"):
        weight = got.get_input_embeddings().weight
        files = sorted(folder.glob("*.safetensors"))
        # Same dtype, memory map: the weights are the file's pages (no copy); converted or read: own memory.
        file_dtype = direct.read_header(files[0])[0].dtype
        assert any(in_file_map(weight, f) for f in files) == (use_mmap and dtype == file_dtype)


@needs_transformers_5
def test_idefics2_equals_from_pretrained(host, pack, direct, tiny_idefics2):
    """The whole Idefics2Model (the LM head of the released checkpoint skipped, as from_pretrained drops it), in the
    file's dtype and converted."""
    from transformers import Idefics2Model
    folder = host.models_dir / "LLM" / tiny_idefics2
    for dtype in (torch.float32, torch.float16):
        got = direct.load_pretrained(Idefics2Model, folder, dtype, skip=("lm_head.",))
        assert got is not None
        assert_same_model(got, from_pretrained(Idefics2Model, folder, dtype))
    assert direct.load_pretrained(Idefics2Model, folder, torch.float32) is None, "lm_head is not in Idefics2Model"


def test_load_idefics2_equals_from_pretrained(host, pack, direct, tiny_idefics2, caplog, tmp_path):
    """load_idefics2 (without the perceiver) against from_pretrained's model: read directly on transformers 5,
    by from_pretrained on older ones, the same model either way."""
    from transformers import Idefics2Model
    folder = tmp_path / "idefics2"  # a folder of its own: not one another test already loaded (and cached)
    shutil.copytree(host.models_dir / "LLM" / tiny_idefics2, folder)
    files = pack_module(pack, "loaders.mumu")
    with caplog.at_level(logging.DEBUG, logger=direct.__name__):
        vlm = files.load_idefics2("direct-test", folder, "fp32")
    assert (DIRECT if _transformers_major() >= 5 else FALLBACK) in caplog.text
    model, ref = vlm.inner, from_pretrained(Idefics2Model, folder, torch.float32).requires_grad_(False)
    assert model.connector.perceiver_resampler is None
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert_same_model(model, ref, skip=("connector.perceiver_resampler.",))
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.no_grad():
        vision = [m.vision_model(pixel_values=pixels).last_hidden_state for m in (model, ref)]
        projected = [m.connector.modality_projection(v) for m, v in zip((model, ref), vision)]
        text = [m.text_model(input_ids=ids, output_hidden_states=True).hidden_states for m in (model, ref)]
    assert torch.equal(*vision) and torch.equal(*projected)
    assert all(torch.equal(x, y) for x, y in zip(*text))


@needs_transformers_5
def test_generation_config_from_config_json(direct, folders, tmp_path):
    """Without generation_config.json, from_pretrained takes the generation settings from config.json."""
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "no-generation-config"
    shutil.copytree(folders["opt"], folder)
    (folder / "generation_config.json").unlink()
    got = direct.load_pretrained(AutoModelForCausalLM, folder, torch.float32)
    ref = from_pretrained(AutoModelForCausalLM, folder, torch.float32)
    assert got.generation_config.to_dict() == ref.generation_config.to_dict()
    assert got.generation_config.eos_token_id == json.loads((folder / "config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "llama-sharded", "llama-bf16", "opt"])
def test_load_llm_equals_from_pretrained(pack, folders, arch, caplog):
    """load_llm reads directly on transformers 5 and by from_pretrained on older ones: the same model either way."""
    from transformers import AutoModelForCausalLM
    folder = folders[arch]
    with caplog.at_level(logging.DEBUG, logger=pack_module(pack, "loaders.direct_weights").__name__):
        llm = pack_module(pack, "loaders.llm").load_llm(f"direct-path-test-{arch}", folder, "fp32")
    if _transformers_major() >= 5:
        assert DIRECT in caplog.text and FALLBACK not in caplog.text
    else:
        assert FALLBACK in caplog.text and "transformers older than 5" in caplog.text and DIRECT not in caplog.text
    model = llm.inner
    assert not any(p.requires_grad for p in model.parameters())
    ref = from_pretrained(AutoModelForCausalLM, folder, torch.float32).requires_grad_(False)
    assert_same_model(model, ref)
    ids = torch.tensor([[1, 17, 40, 3, 99, 250, 7]])
    with torch.no_grad():
        a, b = (m(ids, output_hidden_states=True) for m in (model, ref))
    assert torch.equal(a.logits, b.logits)


def rewrite(file, change):
    """Rewrite a safetensors file with change(dict of tensors) applied."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["extra key", "missing key", "bin only"])
def test_a_checkpoint_that_does_not_match_falls_back(host, pack, direct, folders, tmp_path, damage, caplog):
    """from_pretrained loads it (warning about or ignoring what it does); the direct path must not guess. A missing
    weight (from_pretrained would initialise it at random) is refused by name."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "llm"
    shutil.copytree(folders["llama"], folder)
    weights = folder / "model.safetensors"
    if damage == "extra key":
        rewrite(weights, lambda t: t.update({"model.extra_scale": torch.ones(3)}))
    elif damage == "missing key":
        rewrite(weights, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    else:
        torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
        weights.unlink()
    with caplog.at_level(logging.DEBUG, logger=direct.__name__):
        assert direct.load_pretrained(AutoModelForCausalLM, folder, torch.float32) is None
    assert FALLBACK in caplog.text
    caplog.clear()
    loaders_llm = pack_module(pack, "loaders.llm")
    if damage == "missing key":  # from_pretrained would run the missing weight with random values: refused by name
        with pytest.raises(loaders_llm.LoadError, match=r"lack 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
            loaders_llm.load_llm("fallback-test", folder, "fp32")
        return
    with caplog.at_level(logging.DEBUG, logger=direct.__name__):
        llm = loaders_llm.load_llm("fallback-test", folder, "fp32")
    assert FALLBACK in caplog.text and DIRECT not in caplog.text
    ref = from_pretrained(AutoModelForCausalLM, folder, torch.float32).requires_grad_(False)
    assert_same_model(llm.inner, ref)


@needs_transformers_5
def test_a_quantized_checkpoint_falls_back(direct, folders, tmp_path, caplog):
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "quantized"
    shutil.copytree(folders["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.DEBUG, logger=direct.__name__):
        assert direct.load_pretrained(AutoModelForCausalLM, folder, torch.float16) is None
    assert "quantized checkpoint" in caplog.text


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size * 2 // 3])


def test_truncated_or_corrupt_files_name_the_file(host, pack, direct, folders, tiny_idefics2, tmp_path, LoadError):
    from transformers import AutoModelForCausalLM
    llm_mod, files = pack_module(pack, "loaders.llm"), pack_module(pack, "loaders.mumu")

    folder = tmp_path / "cut-llm"
    shutil.copytree(folders["llama"], folder)
    truncate(folder / "model.safetensors")
    with pytest.raises(LoadError) as error:
        llm_mod.load_llm("cut-llm", folder, "fp32")
    assert str(folder / "model.safetensors") in str(error.value) and "truncated" in str(error.value)
    assert "Copy it again" in str(error.value)
    assert not any(str(folder) in str(key) for key in pack_module(pack, "loaders.handles")._LIVE)

    sharded = tmp_path / "cut-shard"
    shutil.copytree(folders["llama-sharded"], sharded)
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    truncate(shard)
    with pytest.raises(LoadError, match="truncated") as error:
        direct.load_pretrained(AutoModelForCausalLM, sharded, torch.float32)
    assert str(shard) in str(error.value)

    shard.unlink()
    with pytest.raises(LoadError, match="lacks") as error:
        llm_mod.load_llm("cut-shard", sharded, "fp32")
    assert shard.name in str(error.value)

    garbage = tmp_path / "bad-header"
    shutil.copytree(folders["opt"], garbage)
    data = (garbage / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    (garbage / "model.safetensors").write_bytes(data[:8] + b"{" * length + data[8 + length:])
    with pytest.raises(LoadError, match="corrupt") as error:
        llm_mod.load_llm("bad-header", garbage, "fp32")
    assert str(garbage / "model.safetensors") in str(error.value)

    vlm = tmp_path / "cut-idefics2"
    shutil.copytree(host.models_dir / "LLM" / tiny_idefics2, vlm)
    truncate(vlm / "model.safetensors")
    with pytest.raises(LoadError, match="truncated") as error:
        files.load_idefics2("cut-idefics2", vlm, "fp32")
    assert str(vlm / "model.safetensors") in str(error.value) and "Copy it again" in str(error.value)
    assert not any(str(vlm) in str(key) for key in pack_module(pack, "loaders.handles")._LIVE)


def test_header_reader_checks_sizes(direct, tmp_path, LoadError):
    """Offsets that disagree with shape x dtype are corrupt; dtypes this reader does not know fall back."""
    def write(header, data=b""):
        blob = json.dumps(header).encode()
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        return path

    entries = direct.read_header(write({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [8, 14]}}, bytes(14)))
    assert [(e.key, e.dtype, e.shape, e.end - e.start) for e in entries] == \
        [("a", torch.float32, (2,), 8), ("b", torch.bfloat16, (1, 3), 6)]
    with pytest.raises(LoadError, match="corrupt"):
        direct.read_header(write({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)))
    with pytest.raises(direct.Fallback, match="dtype"):
        direct.read_header(write({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)))
