"""Issue 19 in the real host: every mistake a user can make gets the pack's own message, and nothing runs silently
wrong. A bridge made for another model family sampled without the optional MODEL input, LLM folders that name
code of their own or hold pickled objects or one wrongly shaped tensor, resuming from a checkpoint of another run,
bridge files whose config claims sizes its tensors do not have, the router's examples file, and picture sets where
some pictures have no caption."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pack_module
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def errors(pack):
    return pack_module(pack, "bridges.errors")


def never_advises_unsafe_loading(message: str):
    assert "weights_only" not in message and "trust_remote_code" not in message, message


# ---- a bridge for another model family, sampled with the MODEL input unconnected ------------------------------

def has_conditioning_hooks() -> bool:
    try:
        import comfy.hooks  # noqa: F401  (ComfyUI from December 2024 on)
        return True
    except ImportError:
        return False


def sample(host, model, positive, negative):
    """The stock KSampler node, as a graph runs it, on a 64x64 latent."""
    ksampler = host.nodes.NODE_CLASS_MAPPINGS["KSampler"]()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        return ksampler.sample(model, 1, 2, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]


def mapper_conditioning(host, pack, tiny_llama, mapper_name):
    nodes = pack_module(pack, "nodes.beyond_clip")
    llm = nodes.LLMLoader().load(tiny_llama, "fp32")[0]
    mapper = nodes.MapperLoader().load(mapper_name)[0]
    with torch.inference_mode():
        return nodes.TextEncode().encode(llm, mapper, "a red fox", "", "zeros", -1, "none")


@pytest.mark.parametrize("target,model_arch,says", [
    ("sd1", "sdxl", "produces 768-wide tokens (SD1.x), but the MODEL expects 2048 (SDXL)"),
    ("sdxl", "sd15", "produces 2048-wide tokens (SDXL), but the MODEL expects 768 (SD1.x)"),
])
def test_a_mapper_for_another_family_is_named_by_the_sampler(host, pack, errors, tiny_llama, mapper_files, target,
                                                             model_arch, says):
    """Without the optional MODEL input the encoder cannot know the family; the conditioning asks the sampler. Before,
    KSampler failed with KeyError: 'pooled_output' (SD1.x tokens on SDXL) or a matrix shape error (SDXL on SD1.x)."""
    if not has_conditioning_hooks():
        pytest.skip("this ComfyUI has no conditioning hooks (December 2024 on): the pack cannot see the sampler's "
                    "MODEL without patching ComfyUI, so there the check needs the encoder's MODEL input")
    positive, negative = mapper_conditioning(host, pack, tiny_llama, mapper_files[target])
    model = pack_module(pack, "headless.tiny_models").tiny_checkpoint(model_arch)[0]
    with pytest.raises(errors.InputError, match=rf"{mapper_files[target]}.*{says.replace('(', '.').replace(')', '.')}"):
        sample(host, model, positive, negative)
    # the right family samples as before: the check adds nothing to the sampling
    right = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sd15" if target == "sd1" else "sdxl")[0]
    assert sample(host, right, positive, negative)["samples"].shape == (1, 4, 8, 8)


def test_a_mumu_connector_on_an_sd1_model_is_named_by_the_sampler(host, pack, errors, tiny_idefics2,
                                                                   mumu_connector_file):
    if not has_conditioning_hooks():
        pytest.skip("this ComfyUI has no conditioning hooks: the check needs the encoder's MODEL input there")
    nodes = pack_module(pack, "nodes.mumu")
    vlm = nodes.LoadIdefics2().load(tiny_idefics2, "fp32")[0]
    connector = nodes.LoadConnector().load(mumu_connector_file)[0]
    with torch.inference_mode():
        positive, negative = nodes.Encode().encode(vlm, connector, "a man and his dog", "", "zeros", 32, 0,
                                                   1024, 1024, 1024, 1024)
    model = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sd15")[0]
    with pytest.raises(errors.InputError, match=r"MUMU connector .* the MODEL expects 768 \(SD1\.x\)"):
        sample(host, model, positive, negative)


def test_the_check_survives_the_stock_conditioning_nodes(host, pack, errors, tiny_llama, mapper_files):
    if not has_conditioning_hooks():
        pytest.skip("this ComfyUI has no conditioning hooks")
    positive, negative = mapper_conditioning(host, pack, tiny_llama, mapper_files["sd1"])
    stock = host.nodes.NODE_CLASS_MAPPINGS
    ranged = stock["ConditioningSetTimestepRange"]().set_range(positive, 0.0, 0.5)[0]
    combined = stock["ConditioningCombine"]().combine(ranged, positive)[0]
    model = pack_module(pack, "headless.tiny_models").tiny_checkpoint("sdxl")[0]
    with pytest.raises(errors.InputError, match="MODEL expects 2048"):
        sample(host, model, combined, negative)


# ---- LLM folders: code of their own, pickled objects, one wrongly shaped tensor --------------------------------

def llm_copy(host, tiny_llama, name):
    folder = host.models_dir / "LLM" / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(host.models_dir / "LLM" / tiny_llama, folder)
    return folder


def edit_json(path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def load_llm(pack, folder):
    forget_everything_llm(pack)
    return pack_module(pack, "loaders.llm").load_llm(folder.name, folder, "fp32")


def forget_everything_llm(pack):
    pack_module(pack, "loaders.handles").forget_all()


def test_auto_map_entries_are_ignored_and_the_user_is_told(host, pack, tiny_llama, caplog):
    folder = llm_copy(host, tiny_llama, "llm-auto-map")
    edit_json(folder / "config.json", lambda c: c.update(auto_map={
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "__import__('os').system('echo hi')"}))
    with caplog.at_level(logging.WARNING):
        llm = load_llm(pack, folder)
    assert llm.hidden_size == 64
    said = caplog.text
    assert "auto_map" in said and "never runs code from a model folder" in said and "'llama'" in said
    assert "__import__" in said  # the entry is shown as it is, so the user sees what was not run


def test_a_model_type_that_needs_its_own_code_is_refused_without_relaying_the_advice(host, pack, errors, tiny_llama):
    folder = llm_copy(host, tiny_llama, "llm-remote-code")
    edit_json(folder / "config.json", lambda c: c.update(model_type="xmodel", auto_map={
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    with pytest.raises(errors.LoadError, match=r"llm-remote-code needs Python code of its own .*'xmodel'.*never runs "
                                                r"code from a model folder") as e:
        load_llm(pack, folder)
    never_advises_unsafe_loading(str(e.value))


def test_a_tokenizer_that_needs_its_own_code_is_refused_without_relaying_the_advice(host, pack, errors, tiny_llama):
    folder = llm_copy(host, tiny_llama, "llm-remote-tokenizer")
    edit_json(folder / "tokenizer_config.json", lambda c: c.update(
        tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]}))
    with pytest.raises(errors.LoadError, match=r"tokenizer in .*llm-remote-tokenizer needs Python code of its own "
                                                r".*tokenizer_config\.json: AutoTokenizer") as e:
        load_llm(pack, folder)
    never_advises_unsafe_loading(str(e.value))


def test_pickled_weights_holding_python_objects_are_named_not_called_corrupt(host, pack, errors, tiny_llama):
    folder = llm_copy(host, tiny_llama, "llm-pickled-objects")
    state = load_file(str(folder / "model.safetensors"))
    state["model.embed_tokens.weight"] = {"weight": state["model.embed_tokens.weight"], "owner": Path("x")}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(errors.LoadError, match=r"pytorch_model\.bin holds Python objects besides tensors "
                                                r"\(pathlib\.\w*Path\)") as e:
        load_llm(pack, folder)
    assert "truncated or corrupt" not in str(e.value)
    never_advises_unsafe_loading(str(e.value))


def test_one_wrongly_shaped_tensor_is_named(host, pack, errors, tiny_llama):
    folder = llm_copy(host, tiny_llama, "llm-one-wrong-shape")
    state = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    says = rf"holds '{key}' with shape \[129, 64\], the config makes it \[128, 64\].*copy the folder again"
    with pytest.raises(errors.LoadError, match=says) as e:
        load_llm(pack, folder)
    assert "above report" not in str(e.value)
    # and where from_pretrained itself refused it (its error names nothing: 'look at the above report')
    llm_loader = pack_module(pack, "loaders.llm")
    refused = RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look at "
                           "the above report!")
    message = llm_loader.weights_failure(folder, {"model_type": "llama"}, refused)
    assert key in message and "above report" not in message


# ---- resuming from a checkpoint of another run ----------------------------------------------------------------

@pytest.fixture
def toy_run(pack, tmp_path):
    """A tiny mapper distillation through engine.training.run_training, with its run folder."""
    data_mod, tasks = pack_module(pack, "bridges.training.data"), pack_module(pack, "bridges.training.tasks")
    trainer_mod, mapper_mod = pack_module(pack, "bridges.training.trainer"), pack_module(pack, "bridges.mapper")
    training = pack_module(pack, "engine.training")

    def make(hidden=32, steps=4):
        config = data_mod.TrainConfig(steps=steps, batch_size=4, lr=1e-3, seed=0, val_fraction=0.25, eval_every=2)
        g = torch.Generator().manual_seed(0)
        data = data_mod.DistillData(inputs=torch.randn(12, 77, 16, generator=g), last_token=torch.full((12,), 76),
                                    targets=torch.randn(12, 77, 768, generator=g))
        mapper_config = mapper_mod.MapperConfig(in_dim=16, hidden_dim=hidden)
        mapper = data_mod.seeded_init(0, lambda: mapper_mod.BeyondCLIPMapper(mapper_config))
        trainer = trainer_mod.Trainer(tasks.DistillTask(tasks.MapperStudent(mapper), data, config), config)
        return trainer, {"mapper_config": mapper_config.to_dict()}

    def train(trainer, info, run, resume=True):
        return training.run_training(run, trainer, info, lambda: run / "result", resume=resume)

    return make, train, tmp_path / "run"


def test_every_mismatched_checkpoint_says_delete_it_or_switch_resume_off(pack, errors, toy_run):
    make, train, run = toy_run
    train(*make(), run)
    checkpoint = run / "checkpoint.pt"
    good = torch.load(checkpoint, weights_only=True)

    def refused(write, says):
        write()
        trainer, info = make(steps=8)
        before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        with pytest.raises(errors.LoadError, match=says) as e:
            train(trainer, info, run)
        assert "Delete it to start the run again" in str(e.value) and "switch 'resume' off" in str(e.value)
        never_advises_unsafe_loading(str(e.value))
        after = trainer.student.state_dict()
        assert trainer.step == 0 and all(torch.equal(before[k], after[k]) for k in before), "half-loaded"

    refused(lambda: checkpoint.write_bytes(bytes(range(256)) * 16), "is not a PyTorch weights file")

    def truncated():
        torch.save(good, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    refused(truncated, "truncated")
    kind = {k: v for k, v in good.items() if k != "mapper_config"}
    refused(lambda: torch.save({**kind, "connector_config": {"in_dim": 16}}, checkpoint),
            "holds the state of a MUMU connector training run, not of this Beyond CLIP mapper run")
    refused(lambda: torch.save({k: v for k, v in good.items() if k != "optimizer"}, checkpoint),
            r"lacks the entries \['optimizer'\]")
    other, _ = make(hidden=48)
    refused(lambda: torch.save({**good, "student": other.student.state_dict()}, checkpoint),
            "holds tensors of other shapes")
    first = next(iter(good["optimizer"]["state"]))
    bad_optimizer = {**good["optimizer"], "state": {**good["optimizer"]["state"],
                                                     first: {**good["optimizer"]["state"][first],
                                                             "exp_avg": torch.zeros(2, 2)}}}
    refused(lambda: torch.save({**good, "optimizer": bad_optimizer}, checkpoint), "optimizer state 'exp_avg'")
    refused(lambda: torch.save({**good, "student": Path("x")}, checkpoint), "holds Python objects")


# ---- bridge files whose config claims sizes the tensors do not have -------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def with_config(path, out, change):
    """A copy of a bridge file with its metadata config changed (the tensors as they are)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    config = json.loads(meta["config"])
    change(config)
    meta["config"] = json.dumps(config)
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process size from /proc")
def test_a_config_claiming_huge_sizes_is_refused_before_anything_is_allocated(host, pack, errors, tiny_llama,
                                                                               mapper_files, adapter_file,
                                                                               mumu_connector_file, tmp_path):
    bridges = host.models_dir / "bridges"
    # Sizes that a loader building first and checking after would allocate (0.5 to 1 GB each: noticed, survivable).
    cases = [
        ("loaders.mappers", "load_mapper", mapper_files["sd1"], lambda c: c.update(hidden_dim=10 ** 9),
         "wrong shapes"),
        ("loaders.mappers", "load_mapper", mapper_files["sd1"], lambda c: c.update(depth=200_000), "depth=200000"),
        ("loaders.repadapters", "load_repadapter", adapter_file, lambda c: c.update(hidden_dim=2_000_000),
         "wrong shapes"),
        ("loaders.mumu", "load_connector", mumu_connector_file, lambda c: c.update(width=3072, heads=4),
         "wrong shapes"),
        ("loaders.mumu", "load_connector", mumu_connector_file, lambda c: c.update(depth=5000), "depth=5000"),
        ("loaders.mumu", "load_connector", mumu_connector_file, lambda c: c.update(heads=3), "config is not valid"),
    ]
    for module, function, name, change, says in cases:
        path = with_config(bridges / name, tmp_path / f"huge-{len(os.listdir(tmp_path))}.safetensors", change)
        before = rss_bytes()
        with pytest.raises(errors.LoadError, match=says):
            getattr(pack_module(pack, module), function)(path)
        grown = rss_bytes() - before
        assert grown < 200 * 2 ** 20, f"{function} with {says}: the process grew by {grown / 2 ** 20:.0f} MB"


def test_gill_and_seed_configs_claiming_other_layer_counts_are_refused(pack, errors, tmp_path):
    gill_bridge, gill_files = pack_module(pack, "bridges.gill"), pack_module(pack, "loaders.gill")
    config = gill_bridge.GILLConfig(llm_dim=32, mapper_hidden=16, mapper_ffn=32, encoder_layers=1, decoder_layers=1,
                                    out_tokens=4, vision_dim=16, ret_dim=8)
    model = gill_bridge.GILLModel(config)
    path = tmp_path / "gill.safetensors"
    pack_module(pack, "loaders.bridge_files").save_bridge(path, "gill", {**config.to_dict(), "decoder_layers": 10 ** 6},
                                                          model.state_dict())
    with pytest.raises(errors.LoadError, match=r"decoder_layers=1000000, but the file holds 1 such layer"):
        gill_files.load_gill(path)
    bad = tmp_path / "gill-out.safetensors"
    pack_module(pack, "loaders.bridge_files").save_bridge(bad, "gill", {**config.to_dict(), "out_dim": 2 ** 30},
                                                          model.state_dict())
    with pytest.raises(errors.LoadError, match=r"gill-out\.safetensors does not match the GILL model.*wrong shapes.*"
                                                r"The file is damaged or was edited; convert the release"):
        gill_files.load_gill(bad)


def test_non_finite_weights_are_never_written_or_loaded(host, pack, errors, mapper_files, tmp_path):
    files = pack_module(pack, "loaders.bridge_files")
    with pytest.raises(errors.LoadError, match="holds NaN or infinite values.*Nothing was written"):
        files.save_bridge(tmp_path / "nan.safetensors", "beyond_clip_mapper", {},
                          {"w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "nan.safetensors").exists()
    state = load_file(str(host.models_dir / "bridges" / mapper_files["sd1"]))
    state["tokens.0.weight"][0, 0] = float("inf")
    from safetensors import safe_open
    with safe_open(str(host.models_dir / "bridges" / mapper_files["sd1"]), "pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(errors.LoadError, match=r"holds NaN or infinite values \(in 'tokens\.0\.weight'\)"):
        pack_module(pack, "loaders.mappers").load_mapper(tmp_path / "inf.safetensors")


# ---- the router's examples file -------------------------------------------------------------------------------

@pytest.mark.parametrize("content,says", [
    ("label\ttext\nchat\tQu\xe9 tal\ndraw\ta cat\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 on line 2"),
    (b"label\ttext\nchat\t\ndraw\ta cat\n", "line 2: the text is empty"),
    (b"label\ttext\n\tWhat is art?\ndraw\ta cat\n", "line 2: the label is empty"),
    (b"label\ttext\nchat What is art?\ndraw\ta cat\n", "line 2: no tab"),
    (b"label\ttext\nchat\tWhat\tis art?\ndraw\ta cat\n", "line 2: 2 tabs"),
    (b"label\ttext\nWhat is art?\tchat\ndraw\ta cat\n", "line 2: the label is 'What is art\\?' and the text 'chat': "
                                                          "the columns look swapped"),
    (b"label\ttext\nchat\t!!!\ndraw\t???\n", "none of its 2 texts has a word"),
    (b"label\ttext\nchat\tWhat is art?\nmaybe\ta cat\n", "line 3: the label 'maybe' is not one of chat, draw"),
    (b"text label\nchat\tWhat is art?\n", "must be the header 'label<TAB>text'"),
    (b"label\ttext\n", "has a header but no examples"),
    (b"", "is empty"),
    (b"label\ttext\nchat\tWhat is art?\nchat\tHow are you?\n", "need both labels, 'chat' and 'draw'"),
])
def test_the_router_examples_file_is_checked_line_by_line(host, pack, errors, content, says):
    name = "router_examples_bad.tsv"
    (Path(host.folder_paths.get_input_directory()) / name).write_bytes(content)
    node = pack_module(pack, "nodes.train").TrainRouter()
    with pytest.raises(errors.InputError, match=says) as e:
        node.train(name, "never-written", 1.0, True, 0.0, 0)
    assert name in str(e.value)
    assert not (host.models_dir / "bridges" / "never-written.router.json").exists()


def test_columns_in_either_order_and_a_bom_are_read(host, pack, tmp_path):
    routers = pack_module(pack, "loaders.routers")
    path = tmp_path / "swapped_header.tsv"
    path.write_bytes("\ufefftext\tlabel\n# a comment\nWhat is art?\tchat\n\na cat\tdraw\n".encode())
    assert routers.read_labelled_tsv(path) == (["What is art?", "a cat"], ["chat", "draw"])


def test_a_router_file_for_other_labels_is_refused(host, pack, errors, tmp_path):
    routers = pack_module(pack, "loaders.routers")
    router = pack_module(pack, "bridges.router").NaiveBayesRouter().fit(["a", "b"], ["yes", "no"])
    path = tmp_path / "other.router.json"
    routers.save_router(path, router)
    with pytest.raises(errors.LoadError, match=r"routes to \['no', 'yes'\], not to \['chat', 'draw'\]"):
        routers.load_router(path)
    path.write_text("[" * 100000)
    with pytest.raises(errors.LoadError, match="is not a Beyond CLIP router file"):
        routers.load_router(path)


# ---- picture sets where some pictures have no caption ---------------------------------------------------------

def test_pictures_without_a_caption_are_left_out_and_said_so(host, pack, errors):
    from PIL import Image
    inputs = pack_module(pack, "loaders.training_inputs")
    folder = Path(host.folder_paths.get_input_directory()) / "partly_captioned"
    folder.mkdir(exist_ok=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(folder / f"p{i}.png")
    (folder / "p0.txt").write_text("a red square")
    (folder / "p1.txt").write_text("a dark red square")
    (folder / "p2.txt").write_text("  \n")
    pairs, left_out = inputs.read_pair_set("partly_captioned/")
    assert [p.name for p, _ in pairs] == ["p0.png", "p1.png"]
    assert left_out == ["p2.png (its .txt is empty)", "p3.png (no p3.txt)"]
    note = inputs.left_out_note(left_out)
    assert note.startswith("2 picture(s) without a caption were left out: p2.png") and "same-name .txt" in note
    (folder / "p1.txt").unlink()
    with pytest.raises(errors.LoadError, match=r"gives 1 image-caption pair.*left out: p1\.png \(no p1\.txt\)"):
        inputs.read_pair_set("partly_captioned/")
