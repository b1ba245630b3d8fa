"""One contract for every kind of file the pack writes and reads (as diffusers checks every model class): a file
saved by the pack loads back into a model that computes the same; a file of another kind is refused by name; a
truncated file gives a LoadError naming it; the loader's dropdown lists the file (and only files of its kind)."""
from dataclasses import dataclass

import pytest
import torch
from conftest import pack_module
from test_seed import official  # noqa: F401 - fixture: the small official SEED files


@dataclass
class Kind:
    name: str  # the bridge kind written in the file (or "router")
    file: str  # the file name in models/bridges
    save: object  # (pack, path) -> None
    load: object  # (pack, path) -> handle or object
    same: object  # (pack, saved, loaded) -> bool: computes the same


def _mapper(pack):
    return pack_module(pack, "headless.tiny_llm").random_mapper(64, "sdxl", seed=11)


def _repadapters(pack):
    ra = pack_module(pack, "bridges.repadapter")
    adapters = ra.AdapterSet()
    torch.manual_seed(12)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        adapter = ra.RepAdapter(64, 8, 2, 0.5, dropout=0.0)
        with torch.no_grad():
            adapter.conv_B.weight.normal_(0, 0.3)
        adapters.add(path, adapter)
    return adapters.eval()


def _gill(pack):
    gill = pack_module(pack, "bridges.gill")
    config = gill.GILLConfig(llm_dim=16, mapper_hidden=8, mapper_heads=2, encoder_layers=1, decoder_layers=1,
                             mapper_ffn=16, ret_dim=8, vision_dim=16, visual_tokens=4, decision_in=16)
    torch.manual_seed(13)
    model = gill.GILLModel(config).eval()
    with torch.no_grad():
        model.gen_text_hidden_fcs[0].query_embs.normal_()
    return model


def _connector(pack):
    mumu = pack_module(pack, "bridges.mumu")
    torch.manual_seed(14)
    return mumu.MUMUConnector(mumu.ConnectorConfig(in_dim=24, width=32, depth=2, heads=4)).eval()


def _router(pack):
    return pack_module(pack, "loaders.routers").builtin_router()


SAVED = {}


def _keep(name, value):
    SAVED[name] = value
    return value


KINDS = [
    Kind("beyond_clip_mapper", "contract-mapper.safetensors",
         lambda p, path: pack_module(p, "loaders.mappers").save_mapper(path, _keep("mapper", _mapper(p))),
         lambda p, path: pack_module(p, "loaders.mappers").load_mapper(path),
         lambda p, saved, h: _close(saved(torch.randn(1, 5, 64, generator=_g()), 4), h.module()(
             torch.randn(1, 5, 64, generator=_g()), 4))),
    Kind("repadapter", "contract-repadapter.safetensors",
         lambda p, path: pack_module(p, "loaders.repadapters").save_repadapter(
             path, _keep("repadapter", _repadapters(p)), 8, 2, 0.5),
         lambda p, path: pack_module(p, "loaders.repadapters").load_repadapter(path),
         lambda p, saved, h: all(_close(saved[k](x := torch.randn(3, 64, generator=_g())), h.module()[k](x))
                                 for k in saved)),
    Kind("gill", "contract-gill.safetensors",
         lambda p, path: pack_module(p, "loaders.bridge_files").save_bridge(
             path, "gill", _keep("gill", _gill(p)).config.to_dict(), SAVED["gill"].state_dict()),
         lambda p, path: pack_module(p, "loaders.gill").load_gill(path),
         lambda p, saved, h: _close(saved.generation_embedding(s := torch.randn(1, 8, 16, generator=_g())),
                                    h.module().generation_embedding(s))),
    Kind("mumu_connector", "contract-connector.safetensors",
         lambda p, path: pack_module(p, "loaders.mumu").save_connector(path, _keep("connector", _connector(p))),
         lambda p, path: pack_module(p, "loaders.mumu").load_connector(path),
         lambda p, saved, h: _close(saved(x := torch.randn(1, 7, 24, generator=_g())), h.module()(x))),
    Kind("router", "contract.router.json",
         lambda p, path: pack_module(p, "loaders.routers").save_router(path, _keep("router", _router(p))),
         lambda p, path: pack_module(p, "loaders.routers").load_router(path),
         lambda p, saved, loaded: all(saved.predict(t) == loaded.predict(t) for t in
                                      ("draw a fox", "what time is it in Paris", "a castle at dusk"))),
]


def _g():
    return torch.Generator().manual_seed(99)


def _close(a, b):
    if isinstance(a, tuple):
        return all(_close(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def bridges_dir(host):
    return host.models_dir / "bridges"


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_saved_file_loads_back_and_computes_the_same(host, pack, bridges_dir, kind):
    path = bridges_dir / kind.file
    kind.save(pack, path)
    loaded = kind.load(pack, path)
    with torch.no_grad():
        assert kind.same(pack, SAVED[_saved_key(kind)], loaded)
    folders = pack_module(pack, "loaders.folders")
    if kind.name == "router":
        assert kind.file in folders.list_bridge_files(".router.json")
    else:
        assert kind.file in folders.list_bridge_files(kind=kind.name)
        others = [k for k in KINDS if k.name not in (kind.name, "router")]
        assert not any(o.file in folders.list_bridge_files(kind=kind.name) for o in others), "only its own kind"


def _saved_key(kind):
    return {"beyond_clip_mapper": "mapper", "repadapter": "repadapter", "gill": "gill", "mumu_connector": "connector",
            "router": "router"}[kind.name]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_file_of_another_kind_is_refused_by_name(host, pack, bridges_dir, kind):
    LoadError = pack_module(pack, "loaders.errors").LoadError
    other = next(k for k in KINDS if k.name not in (kind.name, "router"))
    path = bridges_dir / other.file
    if not path.exists():
        other.save(pack, path)
    wrong = bridges_dir / ("wrong-" + kind.file)
    wrong.write_bytes(path.read_bytes())
    with pytest.raises(LoadError) as error:
        kind.load(pack, wrong)
    text = str(error.value)
    assert str(wrong) in text
    if kind.name != "router":
        label = pack_module(pack, "loaders.bridge_files").label
        assert f"holds a {label(other.name)}, not a {label(kind.name)}" in text
    else:
        assert "not a Beyond CLIP router file" in text


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_truncated_file_names_itself(host, pack, bridges_dir, kind, tmp_path):
    LoadError = pack_module(pack, "loaders.errors").LoadError
    path = bridges_dir / kind.file
    if not path.exists():
        kind.save(pack, path)
    cut = bridges_dir / ("cut-" + kind.file)
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError) as error:
        kind.load(pack, cut)
    assert str(cut) in str(error.value)


def test_seed_converted_file_follows_the_same_contract(host, pack, official):  # noqa: F811 - the fixture
    seed_files = pack_module(pack, "loaders.seed")
    LoadError = pack_module(pack, "loaders.errors").LoadError
    bridges_dir = host.models_dir / "bridges"
    converted = seed_files.prepare(official, bridges_dir)
    loaded = seed_files.load_seed(converted, torch.float32)
    pixels = torch.rand(2, 3, loaded.config.image_size, loaded.config.image_size, generator=_g())
    again = seed_files.load_seed(converted, torch.float32)  # the live handle: the same model
    with torch.no_grad():
        assert torch.equal(loaded.module().encode(pixels), again.module().encode(pixels))
    assert converted.name in pack_module(pack, "loaders.folders").list_bridge_files(kind=seed_files.KIND)
    cut = bridges_dir / "cut-seed.safetensors"
    cut.write_bytes(converted.read_bytes()[:4096])
    with pytest.raises(LoadError, match="cut-seed.safetensors"):
        seed_files.load_seed(cut, torch.float32)
    wrong = bridges_dir / "contract-mapper.safetensors"
    if not wrong.exists():
        KINDS[0].save(pack, wrong)
    with pytest.raises(LoadError, match="holds a Beyond CLIP mapper, not a SEED v1 tokenizer"):
        seed_files.load_seed(wrong, torch.float32)
