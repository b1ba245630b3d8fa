"""Single-file GGUF LLMs in models/LLM, read through transformers' GGUF support (needs the optional gguf package).
The files are written with the gguf package's own writer in llama.cpp's layout (headless/tiny_gguf.py), from the
small Llama the other tests use."""
import random
import sys

import pytest
import torch
from conftest import pack_module


@pytest.fixture(scope="module")
def gguf_llm(host, pack, tiny_llama):
    pytest.importorskip("gguf", reason="GGUF files need the optional gguf package (pip install gguf)")
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
    pack_module(pack, "headless.tiny_gguf").write_gguf(no_tokenizer, host.models_dir / "LLM" / "tiny-llama", with_tokenizer=False)
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
