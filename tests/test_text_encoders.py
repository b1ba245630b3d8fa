"""A stock ComfyUI CLIP holding a decoder LLM as the pack's LLM: small text-encoder files in the layout ComfyUI's own
loader detects (headless/tiny_text_encoders.py), read by comfy.sd.load_clip, run by ComfyUI's own model classes."""
import importlib
import logging

import pytest
import torch
from conftest import api_workflow, node_of, pack_module, pixel_change, run_saved_image


@pytest.fixture(scope="module")
def text_encoders(host, pack):
    """{Load CLIP type: file name in models/text_encoders}; skipped on hosts without LLM text encoders."""
    try:
        importlib.import_module("comfy.text_encoders.llama")
    except ImportError:
        pytest.skip(f"ComfyUI {host.version} predates LLM text encoders (comfy/text_encoders/, 2025 on); these tests "
                    f"run on ComfyUI 0.3.64 (COMFYUI_PATH=<ComfyUI 0.3.64>)")
    tiny = pack_module(pack, "headless.tiny_text_encoders")
    files = {}
    for kind in ("omnigen2", "lumina2"):
        name = f"tiny-{kind}.safetensors"
        tiny.write_text_encoder(host.models_dir / "text_encoders" / name, kind, seed=4)
        files[kind] = name
    return files


def _clip(host, pack, text_encoders, kind, **options):
    tiny = pack_module(pack, "headless.tiny_text_encoders")
    return tiny.load_tiny_clip(host.models_dir / "text_encoders" / text_encoders[kind], kind, options)


@pytest.mark.parametrize("kind", ["omnigen2", "lumina2"])
def test_hidden_states_are_comfyuis_own_encoding(host, pack, text_encoders, kind):
    clip = _clip(host, pack, text_encoders, kind)
    llm = pack_module(pack, "loaders.text_encoders").from_clip(clip)
    tokens = clip.tokenize("a red fox in the snow")
    ids = torch.tensor([[t for t, _ in next(iter(tokens.values()))[0]]])
    encoder = getattr(clip.cond_stage_model, llm.encoder_name)
    default = -1 if encoder.options_default[0] == "last" else encoder.options_default[1]
    decoder = llm.module()
    with torch.no_grad():
        assert torch.equal(decoder.hidden_state(ids=ids, layer=default), clip.encode_from_tokens(tokens))
        clip.clip_layer(-2)  # ComfyUI's own choice of another layer: the same numbering as the pack's
        assert torch.equal(decoder.hidden_state(ids=ids, layer=-2), clip.encode_from_tokens(tokens))
        every = decoder(input_ids=ids).hidden_states
    assert len(every) == encoder.num_layers + 1
    assert torch.equal(every[-2], decoder.hidden_state(ids=ids, layer=-2))
    # the tokenizer is ComfyUI's: the same ids for the text as CLIPTextEncode feeds (after its template)
    plain = clip.tokenizer.tokenize_with_weights("a red fox", disable_weights=True) if kind == "lumina2" else None
    if plain is not None:
        assert llm.tokenizer("a red fox")["input_ids"] == [t for t, _ in next(iter(plain.values()))[0]]


def test_a_clip_without_a_decoder_is_refused_naming_the_encoders_that_qualify(host, pack):
    clip = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sd15")[1]
    errors = pack_module(pack, "loaders.text_encoders")
    with pytest.raises(errors.NotADecoderError) as e:
        errors.from_clip(clip)
    message = str(e.value)
    assert "clip_l" in message and "Gemma 2 2B" in message and "Qwen2.5-VL" in message and "Llama 3.1" in message
    assert type(e.value).__module__ == "beyond_clip"


def _record_mapper(pack, llm, target, path, seed=1, hidden_layer=-1, template="none"):
    """A mapper file for `llm` that records it as its text encoder (as Train Mapper writes it)."""
    tiny_llm = pack_module(pack, "headless.tiny_llm")
    record = pack_module(pack, "engine.encoder_identity").record_of(llm, hidden_layer, template)
    mapper = tiny_llm.random_mapper(llm.hidden_size, target, seed=seed, encoder=record.to_dict(),
                                    hidden_layer=hidden_layer)
    pack_module(pack, "loaders.mappers").save_mapper(path, mapper)
    return path.name


def _workflow(host, pack, text_encoders, mapper, prompt_text=None):
    prompt = api_workflow(host, pack, "beyond_clip_from_text_encoder.json")
    for node_id, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyCheckpoint", "inputs": {"arch": "sdxl"}}
        elif kind == "CLIPLoader":  # the same file and type, read with the small config (full sizes are fixed)
            assert inputs["type"] == "omnigen2"
            prompt[node_id] = {"class_type": "BeyondCLIP_TinyTextEncoderLoader",
                               "inputs": {"clip_name": text_encoders["omnigen2"], "type": inputs["type"]}}
        elif kind == "BeyondCLIP_MapperLoader":
            inputs["mapper_name"] = mapper
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 8
        elif kind == "BeyondCLIP_TextEncode" and prompt_text is not None:
            inputs["prompt"] = prompt_text
    return prompt


def test_shipped_text_encoder_workflow_end_to_end(host, pack, text_encoders):
    llm = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "omnigen2"))
    mapper = _record_mapper(pack, llm, "sdxl", host.models_dir / "bridges" / "tiny-omnigen2-sdxl.safetensors")
    prompt = _workflow(host, pack, text_encoders, mapper)
    first = run_saved_image(host, prompt)
    positive, negative = host.node_output(node_of(prompt, "BeyondCLIP_TextEncode"))
    assert positive[0][0].shape == (1, 77, 2048) and positive[0][1]["pooled_output"].shape == (1, 1280)
    assert torch.isfinite(positive[0][0]).all() and not torch.equal(positive[0][0], negative[0][0])
    assert run_saved_image(host, prompt).png == first.png, "same seed and prompt must give the same image"
    other = run_saved_image(host, _workflow(host, pack, text_encoders, mapper, "an oil painting of a red fox"))
    change = pixel_change(other.pixels, first.pixels)
    print(f"\nbeyond_clip_from_text_encoder.json: another prompt changes the pixels by {change:.2f} levels")
    assert change > 0.5


def test_mapper_of_another_text_encoder_is_refused_by_name(host, pack, text_encoders, tiny_llama):
    qwen = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "omnigen2"))
    gemma = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "lumina2"))
    mapper_path = host.models_dir / "bridges" / "tiny-gemma-sd1.safetensors"
    _record_mapper(pack, gemma, "sd1", mapper_path)
    mapper = pack_module(pack, "loaders.mappers").load_mapper(mapper_path)
    check = pack_module(pack, "engine.beyond_clip").check_mapper_fits
    check(gemma, mapper)  # its own encoder
    with pytest.raises(Exception) as e:
        check(qwen, mapper)  # both 64 wide: told apart by the record
    assert "Gemma 2 2B" in str(e.value) and "Qwen2.5-VL 3B" in str(e.value) and "architecture" in str(e.value)


def test_stock_clip_cannot_chat_or_take_a_repadapter_and_says_so(host, pack, text_encoders, adapter_file):
    llm = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "omnigen2"))
    with pytest.raises(Exception, match="chat reply cannot use text encoder .*output head"):
        pack_module(pack, "engine.llm").chat(llm, "hello", max_new_tokens=2)
    adapters = pack_module(pack, "loaders.repadapters")
    with pytest.raises(Exception, match="Apply RepAdapter cannot use text encoder"):
        adapters.apply_repadapter(llm, adapters.load_repadapter(host.models_dir / "bridges" / adapter_file), "merged")


class _Quantized(torch.Tensor):
    """int8 values with a float scale per row: stands in for ComfyUI-GGUF's GGMLTensor (raw quantized data that only
    its own operations can read)."""

    @staticmethod
    def of(weight):
        scale = weight.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        q = torch.Tensor._make_subclass(_Quantized, (weight.float() / scale).round().to(torch.int8), False)
        q.scale = scale
        return q



def _quantized_ops():
    """Operations built the way ComfyUI-GGUF builds its GGMLOps: comfy.ops.manual_cast layers that keep the file's
    quantized tensors as they are and dequantize them in forward."""
    import comfy.ops
    import torch.nn.functional as F

    def load(module, state_dict, prefix):
        for name in ("weight", "bias"):
            value = state_dict.get(prefix + name)
            if value is None:
                continue
            if isinstance(value, _Quantized):  # kept quantized, as GGMLOps keeps a GGMLTensor
                object.__setattr__(module, name + "_scale", value.scale)
                value = value.as_subclass(torch.Tensor)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))

    def read(module, name, dtype, device):
        tensor = getattr(module, name)
        if tensor is None:
            return None
        scale = getattr(module, name + "_scale", None)
        value = tensor.to(dtype) * scale.to(dtype) if scale is not None else tensor.to(dtype)
        return value.to(device)

    class QuantizedOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
                load(self, state_dict, prefix)

            def forward_comfy_cast_weights(self, x):
                return F.linear(x, read(self, "weight", x.dtype, x.device), read(self, "bias", x.dtype, x.device))

        class Embedding(comfy.ops.manual_cast.Embedding):
            def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
                load(self, state_dict, prefix)

            def forward_comfy_cast_weights(self, ids, out_dtype=None):
                return F.embedding(ids, read(self, "weight", out_dtype or torch.float32, ids.device))

    return QuantizedOps


def test_a_quantized_clip_from_another_pack_works_without_the_pack_knowing(host, pack, text_encoders):
    """ComfyUI-GGUF builds its CLIP with comfy.sd.load_text_encoder_state_dicts(quantized state dict,
    model_options={custom_operations, initial_device}) and swaps the patcher for a subclass; this stand-in does the
    same with int8 rows. The pack's code has no branch for it: ComfyUI's model runs its own operations."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    tiny = pack_module(pack, "headless.tiny_text_encoders")
    path = host.models_dir / "text_encoders" / text_encoders["omnigen2"]
    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    config = tiny.config_from_file(state, 128)
    quantized = {k: (_Quantized.of(v) if v.ndim == 2 else v) for k, v in state.items()}

    class OtherPatcher(comfy.model_patcher.ModelPatcher):
        pass

    clip = comfy.sd.load_text_encoder_state_dicts(
        [quantized], clip_type=comfy.sd.CLIPType.OMNIGEN2,
        model_options={"custom_operations": _quantized_ops(), "qwen25_3b_model_config": config,
                       "initial_device": comfy.model_management.text_encoder_offload_device()})
    clip.patcher = OtherPatcher.clone(clip.patcher)
    assert clip.cond_stage_model.qwen25_3b.transformer.model.embed_tokens.weight.dtype == torch.int8

    encoders = pack_module(pack, "loaders.text_encoders")
    llm, plain = encoders.from_clip(clip), encoders.from_clip(_clip(host, pack, text_encoders, "omnigen2"))
    tokens = clip.tokenize("a red fox in the snow")
    ids = torch.tensor([[t for t, _ in next(iter(tokens.values()))[0]]])
    with torch.no_grad():
        ours = llm.module().hidden_state(ids=ids, layer=-1)
        assert torch.equal(ours, clip.encode_from_tokens(tokens))  # what CLIPTextEncode gives on that CLIP
        reference = plain.module().hidden_state(ids=ids, layer=-1)
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0).item()
    assert cos > 0.99, cos
    # the same model quantized: a mapper trained on the bf16 file fits it; the exact weights differ (a note only)
    mapper_path = host.models_dir / "bridges" / "tiny-omnigen2-from-bf16.safetensors"
    _record_mapper(pack, plain, "sd1", mapper_path)
    mapper = pack_module(pack, "loaders.mappers").load_mapper(mapper_path)
    pack_module(pack, "engine.beyond_clip").check_mapper_fits(llm, mapper)
    assert llm.identity != plain.identity
    conditioning = pack_module(pack, "engine.beyond_clip").encode_conditioning(llm, mapper, "a (red:1.3) fox",
                                                                                hidden_layer=-1, template="none")
    assert conditioning[0][0].shape == (1, 77, 768) and torch.isfinite(conditioning[0][0]).all()


def test_train_mapper_on_a_stock_clip_records_it(host, pack, text_encoders):
    """Mapper distillation with the stock CLIP as the LLM: the cache comes from ComfyUI's own model, the held-out
    loss falls, and the file records the text encoder (then refuses another)."""
    from conftest import history
    tiny = pack_module(pack, "headless.tiny_llm")
    (host.models_dir.parent / "input").mkdir(exist_ok=True)
    captions = host.models_dir.parent / "input" / "te_captions.txt"
    captions.write_text("\n".join(tiny.CORPUS * 3) + "\n")
    llm = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "lumina2"))
    teacher = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sd15")[1]
    train = pack_module(pack, "nodes.train").TrainMapper()
    out = train.train(llm, teacher, "te_captions.txt", "te_mapper_run", "te_mapper", 60, 8, 3e-3, "mse", 64, 2, "gelu",
                      -2, "none", 0.2, 0, False, 1000, 20, "fp32")
    mapper = out["result"][0]
    record = mapper.config.encoder
    assert record["name"] == "Gemma 2 2B (Lumina 2)" and record["arch"] == "gemma2" and record["hidden_layer"] == -2
    h = history(host, "te_mapper_run")
    assert h["final_val_loss"] < h["initial_val_loss"]
    qwen = pack_module(pack, "loaders.text_encoders").from_clip(_clip(host, pack, text_encoders, "omnigen2"))
    with pytest.raises(Exception, match="Gemma 2 2B"):
        pack_module(pack, "engine.beyond_clip").check_mapper_fits(qwen, mapper)


def test_old_mapper_without_record_loads_with_one_warning(host, pack, tiny_llama, mapper_files, caplog):
    llm = pack_module(pack, "loaders.llm").load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama)
    mapper = pack_module(pack, "loaders.mappers").load_mapper(host.models_dir / "bridges" / mapper_files["sd1"])
    assert mapper.config.encoder is None
    check = pack_module(pack, "engine.beyond_clip").check_mapper_fits
    with caplog.at_level(logging.WARNING):
        check(llm, mapper)
        check(llm, mapper)
    said = [r for r in caplog.records if "does not record which text encoder" in r.getMessage()]
    assert len(said) <= 1  # once per file and process (an earlier test may have used the file already)


def test_llama_and_mistral_of_the_same_width_are_told_apart(host, pack, tmp_path):
    """Two LLMs of the same width: another architecture, and the same architecture with other weights."""
    tiny = pack_module(pack, "headless.tiny_llm")
    load = pack_module(pack, "loaders.llm").load_llm
    llama = load("llama-a", tiny.write_llm_folder(tmp_path / "llama-a", "llama", seed=1))
    other = load("llama-b", tiny.write_llm_folder(tmp_path / "llama-b", "llama", seed=2))
    mistral = load("mistral", tiny.write_llm_folder(tmp_path / "mistral", "mistral", seed=3))
    path = tmp_path / "m.safetensors"
    _record_mapper(pack, llama, "sd1", path)
    mapper = pack_module(pack, "loaders.mappers").load_mapper(path)
    check = pack_module(pack, "engine.beyond_clip").check_mapper_fits
    check(llama, mapper)
    with pytest.raises(Exception, match="'llama-a' .*'mistral' .*another architecture"):
        check(mistral, mapper)
    with pytest.raises(Exception, match="'llama-a' .*'llama-b' .*other weights"):
        check(other, mapper)


def test_mapper_record_damaged_is_refused_by_file(host, pack, tmp_path, tiny_llama):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    llm = pack_module(pack, "loaders.llm").load_llm(tiny_llama, host.models_dir / "LLM" / tiny_llama)
    good = tmp_path / "good.safetensors"
    _record_mapper(pack, llm, "sd1", good)
    with safe_open(str(good), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open handles are not iterable
    config = json.loads(meta["config"])
    for damage in ({"signature": "%%%"}, {"arch": None, "signature": None, "extra": 1}, {"width": 999}):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), {**meta, "config": json.dumps({**config, "encoder": {**config["encoder"],
                                                                                        **damage}})})
        with pytest.raises(Exception, match="bad.safetensors: its mapper config is not valid"):
            pack_module(pack, "loaders.mappers").load_mapper(bad)
