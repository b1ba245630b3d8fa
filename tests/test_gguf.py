"""Single-file GGUF LLMs in models/LLM, read through transformers' GGUF support (needs the optional gguf package).
The files are written with the gguf package's own writer in llama.cpp's layout (headless/tiny_gguf.py), from the
small Llama the other tests use."""
import random
import sys

import pytest
import torch
from conftest import pack_module


def needs_transformers_gguf():
    """transformers reads GGUF from 4.41 on; on older ones Load LLM refuses a .gguf file by name (loaders/llm.py)."""
    import transformers
    try:
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no GGUF support (4.41 on); the pack refuses .gguf "
                    f"files by name there")


def needs_streamed_reader():
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"the tensor-by-tensor reader follows transformers 5's GGUF code; {transformers.__version__} loads "
                    f"through from_pretrained (test_gguf_loads_as_the_llm_it_was_made_from covers that)")


@pytest.fixture(scope="module")
def gguf_llm(host, pack, tiny_llama):
    pytest.importorskip("gguf", reason="GGUF files need the optional gguf package (pip install gguf)")
    needs_transformers_gguf()
    path = host.models_dir / "LLM" / "tiny-llama-Q8_0.gguf"
    write = pack_module(pack, "headless.tiny_gguf").write_gguf
    model, tokenizer = write(path, host.models_dir / "LLM" / tiny_llama)
    return path, model, tokenizer


def test_gguf_loads_as_the_llm_it_was_made_from(host, pack, gguf_llm):
    path, reference, tokenizer = gguf_llm
    node = pack_module(pack, "nodes.beyond_clip").LLMLoader
    assert path.name in node.INPUT_TYPES()["required"]["llm_name"][0]
    assert node.VALIDATE_INPUTS(path.name) is True
    llm = node().load(path.name, "fp32")[0]
    # the tokenizer is built from the file's metadata. llama.cpp's byte-level BPE adds no prefix space (Llama 3's
    # behaviour) where the small test tokenizer does: texts that start with a space read the same in both
    for text in (" a photo of a red fox in the snow", " Draw a castle! ünïcode"):
        assert llm.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    encode = pack_module(pack, "engine.llm").hidden_states
    ours = encode(llm, " a photo of a red fox in the snow").hidden
    with torch.no_grad():
        ids = tokenizer(" a photo of a red fox in the snow", return_tensors="pt")["input_ids"]
        theirs = reference.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
    print(f"\nGGUF Q8_0 vs the Hugging Face weights: hidden-state cosine {cos:.5f}")
    assert cos > 0.995
    # ComfyUI accounts it at its dequantized size (fp32 here), which the header announced
    info = pack_module(pack, "loaders.llm").gguf_info(path)
    assert llm.patcher.model_size() == info.dequantized_elements * 4
    # a mapper trained on the Hugging Face folder fits its GGUF (the same model, quantized; the probe's first token
    # differs here by the prefix space above)
    records = pack_module(pack, "bridges.encoder_record")
    assert records.similarity(
        pack_module(pack, "engine.encoder_identity").record_of(llm, -1, "none").signature,
        pack_module(pack, "engine.encoder_identity").record_of(
            pack_module(pack, "loaders.llm").load_llm("tiny-llama", host.models_dir / "LLM" / "tiny-llama"), -1,
            "none").signature) > records.SAME_MODEL


def test_gguf_files_the_pack_cannot_use_are_refused_by_name(host, pack, gguf_llm, tmp_path):
    path = gguf_llm[0]
    load = pack_module(pack, "loaders.llm").load_llm
    errors = pack_module(pack, "bridges.errors")
    with pytest.raises(errors.LoadError, match="cannot also be quantized"):
        load(path.name, path, "int8 (bitsandbytes)")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(errors.LoadError, match="truncated.gguf"):
        load("truncated.gguf", truncated)
    other = tmp_path / "other-arch.gguf"
    pack_module(pack, "headless.tiny_gguf").write_gguf(other, host.models_dir / "LLM" / "tiny-llama", arch="tinyfoo")
    with pytest.raises(errors.LoadError, match="holds a 'tinyfoo' model, which this transformers"):
        load("other-arch.gguf", other)
    no_tokenizer = tmp_path / "no-tokenizer.gguf"
    pack_module(pack, "headless.tiny_gguf").write_gguf(no_tokenizer, host.models_dir / "LLM" / "tiny-llama",
                                                       with_tokenizer=False)
    with pytest.raises(errors.LoadError, match="no tokenizer in its metadata"):
        load("no-tokenizer.gguf", no_tokenizer)
    assert not list(tmp_path.glob("*.tmp"))


def test_gguf_without_the_package_says_which_pip_command(host, pack, gguf_llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(pack_module(pack, "bridges.errors").LoadError, match="pip install gguf"):
        pack_module(pack, "loaders.llm").gguf_info(gguf_llm[0])


def test_gguf_header_fuzz_only_pack_errors(host, pack, gguf_llm, tmp_path):
    data = bytearray(gguf_llm[0].read_bytes()[:4096])
    info = pack_module(pack, "loaders.llm").gguf_info
    load_error = pack_module(pack, "bridges.errors").LoadError
    rng = random.Random(5)
    for i in range(60):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        f = tmp_path / f"fuzz{i}.gguf"
        f.write_bytes(bytes(damaged[:rng.randint(0, len(damaged))]))
        try:
            info(f)
        except load_error:
            pass


# ------------------------------------------------------------------------ the tensor-by-tensor reader

STREAMED = "loaded tensor by tensor"
FALLBACK = "loading with transformers' from_pretrained"


@pytest.fixture(scope="module")
def gguf_variants(host, pack, tiny_llama, tmp_path_factory):
    """GGUF files of the small Llama in several ggml types, and in the layouts llama.cpp also writes: the head left
    out (tied to the embeddings), an extra rope_freqs tensor (Llama 3 files; transformers has no parameter for it
    and skips it)."""
    pytest.importorskip("gguf", reason="GGUF files need the optional gguf package (pip install gguf)")
    needs_transformers_gguf()
    write = pack_module(pack, "headless.tiny_gguf").write_gguf
    folder = host.models_dir / "LLM" / tiny_llama
    base = tmp_path_factory.mktemp("gguf-variants")
    files = {}
    for quant in ("Q8_0", "Q4_1", "Q5_0", "BF16", "F16", "F32"):
        files[quant] = base / f"tiny-{quant}.gguf"
        write(files[quant], folder, quant=quant)
    files["tied"] = base / "tiny-tied.gguf"
    write(files["tied"], folder, tied=True)
    files["rope_freqs"] = base / "tiny-rope-freqs.gguf"
    write(files["rope_freqs"], folder, extra={"rope_freqs.weight": torch.ones(8)})
    return files


def _transformers_gguf(path, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                local_files_only=True)


def assert_same_as_transformers(got, ref):
    """Tensor by tensor (values, dtypes, strides), buffers, parameters' requires_grad, the config (less the
    quantization marker transformers adds, see loaders/gguf_weights.py) and the generation config."""
    assert type(got) is type(ref)
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].stride() == b[k].stride() and torch.equal(a[k], b[k]), k
    a, b = dict(got.named_buffers()), dict(ref.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ({k: p.requires_grad for k, p in got.named_parameters()}
            == {k: p.requires_grad for k, p in ref.named_parameters()})
    assert not got.training and not ref.training
    theirs = ref.config.to_dict()
    assert theirs.pop("quantization_config")["quant_method"] == "gguf"
    assert got.config.to_dict() == theirs
    assert got.generation_config.to_dict() == ref.generation_config.to_dict()
    assert (got.get_output_embeddings().weight is got.get_input_embeddings().weight) == got.config.tie_word_embeddings


@pytest.mark.parametrize("variant", ["Q8_0", "Q4_1", "Q5_0", "BF16", "F16", "F32", "tied", "rope_freqs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_gguf_equals_transformers_load(pack, gguf_variants, variant, dtype, caplog):
    """The reader gives transformers' own gguf_file= model, tensor for tensor, and the same outputs."""
    import logging

    needs_streamed_reader()
    reader = pack_module(pack, "loaders.gguf_weights")
    path = gguf_variants[variant]
    rng = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger=reader.__name__):
        got = reader.load_gguf(pack_module(pack, "loaders.llm").AutoModelForCausalLM, path, dtype)
    assert got is not None and STREAMED in caplog.text, caplog.text
    assert torch.equal(torch.get_rng_state(), rng), "loading must not move the caller's random numbers"
    ref = _transformers_gguf(path, dtype)
    assert_same_as_transformers(got, ref)
    assert got.config.tie_word_embeddings == (variant == "tied")
    ids = torch.tensor([[1, 17, 40, 3, 99, 250, 7]])
    with torch.no_grad():
        a, b = (m(ids, output_hidden_states=True) for m in (got, ref))
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    if sys.platform.startswith("linux"):  # own memory: nothing of the file stays mapped behind a weight
        from test_loading import in_file_map
        assert not any(in_file_map(p, path) for p in got.parameters())


def test_streamed_in_row_chunks_equals_transformers_load(pack, gguf_variants, monkeypatch):
    """A tensor larger than the reader's chunk is dequantized a few rows at a time: the same values (every ggml type
    quantizes each row by itself). The small model's tensors fit in one chunk: make the chunk one row."""
    needs_streamed_reader()
    reader = pack_module(pack, "loaders.gguf_weights")
    monkeypatch.setattr(reader, "CHUNK", 4)
    auto = pack_module(pack, "loaders.llm").AutoModelForCausalLM
    for variant in ("Q8_0", "Q4_1", "F16", "F32"):
        path = gguf_variants[variant]
        for dtype in (torch.float32, torch.bfloat16):
            assert_same_as_transformers(reader.load_gguf(auto, path, dtype), _transformers_gguf(path, dtype))


def test_load_llm_reads_gguf_tensor_by_tensor(host, pack, gguf_llm, caplog):
    import logging
    needs_streamed_reader()
    reader = pack_module(pack, "loaders.gguf_weights")
    pack_module(pack, "loaders.handles").forget_all()
    with caplog.at_level(logging.DEBUG, logger=reader.__name__):
        llm = pack_module(pack, "loaders.llm").load_llm("gguf-stream", gguf_llm[0], "fp32")
    assert STREAMED in caplog.text and FALLBACK not in caplog.text
    assert not any(p.requires_grad for p in llm.inner.parameters())
    assert_same_as_transformers(llm.inner, _transformers_gguf(gguf_llm[0], torch.float32).requires_grad_(False))


def test_gguf_the_reader_cannot_vouch_for_falls_back(host, pack, tiny_llama, tmp_path, monkeypatch, caplog):
    """A file missing a tensor the model needs (transformers would initialise it at random), an architecture
    transformers reads with its packed-block loader, a tensor processor that sets tensors itself: None, with the
    reason logged; the pack's loader then uses transformers' load."""
    import logging
    needs_streamed_reader()

    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as hf_gguf
    reader = pack_module(pack, "loaders.gguf_weights")
    write = pack_module(pack, "headless.tiny_gguf").write_gguf
    auto = pack_module(pack, "loaders.llm").AutoModelForCausalLM
    folder = host.models_dir / "LLM" / tiny_llama
    missing, packed, plain = tmp_path / "missing.gguf", tmp_path / "lfm2.gguf", tmp_path / "plain.gguf"
    write(missing, folder, leave_out=("blk.1.ffn_norm.weight",))
    write(packed, folder, arch="lfm2")
    write(plain, folder)

    class SetsTensorsItself(hf_gguf.LlamaTensorProcessor):
        def process(self, weights, name, **kwargs):
            if name == "output.weight":
                kwargs["parsed_parameters"]["tensors"]["lm_head.weight"] = torch.from_numpy(np.copy(weights))
                return hf_gguf.GGUFTensor(weights, None, {})
            return super().process(weights, name, **kwargs)

    cases = [(missing, "model.layers.1.post_attention_layernorm.weight"), (packed, "packed-block"),
             (plain, "SetsTensorsItself sets tensors itself")]
    for path, why in cases:
        if path is plain:
            monkeypatch.setitem(hf_gguf.TENSOR_PROCESSORS, "llama", SetsTensorsItself)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=reader.__name__):
            assert reader.load_gguf(auto, path, torch.float32) is None
        assert FALLBACK in caplog.text and why in caplog.text, caplog.text
    # through the pack's loader the file still loads, by transformers (the processor above included)
    monkeypatch.setitem(hf_gguf.TENSOR_PROCESSORS, "llama", SetsTensorsItself)
    pack_module(pack, "loaders.handles").forget_all()
    llm = pack_module(pack, "loaders.llm").load_llm("gguf-fallback", plain, "fp32")
    ref = _transformers_gguf(plain, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(llm.inner.state_dict().values(), ref.state_dict().values()))


def test_streamed_gguf_damaged_files_are_refused_by_name(pack, gguf_llm, tmp_path):
    """Cut inside its tensor data, or with its tensor table pointing past the end: a LoadError naming the file."""
    needs_streamed_reader()
    reader = pack_module(pack, "loaders.gguf_weights")
    load_error = pack_module(pack, "bridges.errors").LoadError
    auto = pack_module(pack, "loaders.llm").AutoModelForCausalLM
    data = gguf_llm[0].read_bytes()
    for cut in (len(data) - 1000, len(data) // 2):
        damaged = tmp_path / f"cut-{cut}.gguf"
        damaged.write_bytes(data[:cut])
        with pytest.raises(load_error, match=damaged.name):
            reader.load_gguf(auto, damaged, torch.float32)
