"""Mistakes a user can make reach the pack's own message, and nothing runs silently wrong (pure torch): bad pixels,
SEED codes out of any range, stray angle brackets in MUMU prompts, an empty router vocabulary, a resumed checkpoint of
another run, and GILL's retrieval head computed as the reference computes it."""
import importlib
import io
import pkgutil

import pytest
import torch
from conftest import BRIDGES_PACKAGE


@pytest.fixture(scope="module")
def b(bridges):
    class Namespace:
        errors = bridges("errors")
        pixels = bridges("pixels")
        seed = bridges("seed")
        mumu = bridges("mumu")
        gill = bridges("gill")
        router = bridges("router")
        data = bridges("training.data")
        tasks = bridges("training.tasks")
        trainer = bridges("training.trainer")
        mapper = bridges("mapper")
    return Namespace


# ------------------------------------------------------------------------------------------------- pixels

def bad_pictures():
    nan = torch.rand(2, 16, 16, 3)
    nan[1, 3, 4, 0] = float("nan")
    inf = torch.rand(1, 16, 16, 3)
    inf[0, 0, 0, 2] = float("inf")
    return [
        ("nan", nan, "picture 2 of 2 holds NaN or infinite"),
        ("inf", inf, "holds NaN or infinite"),
        ("5 channels", torch.rand(1, 16, 16, 5), "has 5 channels"),
        ("0 height", torch.rand(1, 0, 16, 3), "is 0x16 pixels"),
        ("0 width", torch.rand(1, 16, 0, 3), "is 16x0 pixels"),
        ("empty batch", torch.rand(0, 16, 16, 3), "empty batch"),
        ("1-d", torch.rand(16), r"has shape \(16,\)"),
    ]


@pytest.mark.parametrize("name,images,says", bad_pictures(), ids=[c[0] for c in bad_pictures()])
def test_every_family_refuses_pictures_no_model_can_read(b, name, images, says):
    """GILL (5 channels lost two silently; 0 height failed inside torch), SEED (0 height read as black), MUMU (NaN
    gave a NaN picture): the one check names the picture and what is wrong."""
    with pytest.raises(b.errors.InputError, match=says):
        b.gill.squash_224(images)
    with pytest.raises(b.errors.InputError, match=says):
        b.seed.preprocess(images, 224)
    if images.ndim == 4 and images.shape[0] >= 1:
        with pytest.raises(b.mumu.PromptError, match=says.replace("picture 2 of 2", "the picture")):
            b.mumu.prepare_image(images[-1], 16, (0.5,) * 3, (0.5,) * 3, "reference image 'man'")


def test_grey_and_alpha_pictures_become_rgb_for_gill_as_pil_would(b):
    grey = torch.rand(1, 30, 20, 1)
    assert torch.equal(b.gill.squash_224(grey), b.gill.squash_224(grey.expand(1, 30, 20, 3)))
    grey_alpha = torch.cat([grey, torch.zeros_like(grey)], dim=-1)  # alpha dropped, as PIL's convert("RGB")
    assert torch.equal(b.gill.squash_224(grey_alpha), b.gill.squash_224(grey.expand(1, 30, 20, 3)))
    rgba = torch.rand(1, 30, 20, 4)
    assert torch.equal(b.gill.squash_224(rgba), b.gill.squash_224(rgba[..., :3]))


def test_finite_values_outside_the_unit_range_are_clamped_not_refused(b):
    bright = torch.full((1, 8, 8, 3), 1.5)
    assert torch.equal(b.seed.preprocess(bright, 16), b.seed.preprocess(torch.ones(1, 8, 8, 3), 16))


# ---------------------------------------------------------------------------------------------- SEED codes

def codes_line(values):
    return " ".join(str(v) for v in values)


@pytest.mark.parametrize("code,says", [
    (2 ** 63, "has 19 digits, far outside any SEED codebook"),
    (2 ** 64 + 5, "has 20 digits"),
    (10 ** 9, "has 10 digits"),
    ("9" * 5000, "has 5000 digits"),  # Python's int() itself refuses past 4300 digits
])
def test_codes_beyond_any_codebook_are_refused_before_torch_sees_them(b, code, says):
    with pytest.raises(b.errors.InputError, match=says):
        b.seed.parse_codes(codes_line([code] + [1] * 31))


def test_digits_of_any_script_count_by_value_other_numerals_are_refused(b):
    fullwidth = "\uff11\uff12"  # '１２' from an East-Asian keyboard
    arabic_indic = "\u0661\u0662"  # '١٢'
    row = b.seed.parse_codes(" ".join([fullwidth, arabic_indic] + ["3"] * 30))
    assert row[0, :3].tolist() == [12, 12, 3] and row.dtype == torch.int64
    # full-width commas and the ideographic comma separate codes as ',' does
    assert b.seed.parse_codes("\uff0c".join(["7"] * 16) + "\u3001" + "\u3001".join(["8"] * 16))[0, -1] == 8
    for item in ("\u00b2", "\u2167", "\u00bd", "1.5", "-3", "+3", "1e3", "0x1f", "\u0000"):  # ² Ⅷ ½ ...
        with pytest.raises(b.errors.InputError, match="is not a code"):
            b.seed.parse_codes(" ".join([item] + ["1"] * 31))


def test_code_checks_are_the_packs_errors(b):
    config = b.seed.SeedConfig(codebook_size=8192, num_queries=32)
    with pytest.raises(b.errors.InputError, match="8192 .* out of range"):
        b.seed.check_codes(torch.full((1, 32), 8192), config)
    with pytest.raises(b.errors.InputError, match="cannot pair"):
        b.seed.mix_codes(torch.zeros(2, 32, dtype=torch.long), torch.zeros(3, 32, dtype=torch.long), 4)


# ------------------------------------------------------------------------------------------- MUMU prompts

@pytest.mark.parametrize("text,says", [
    ("a <man man", "'<' at character 2 .* never closes"),
    ("a <man man> and his dog", "'<' at character 2 .* never closes"),
    ("<>", "empty placeholder '<>' at character 0"),
    ("a <> dog", "empty placeholder"),
    ("a man> and a dog", "'>' at character 5 .* closes no placeholder"),
    ("a <3 heart", "'<' at character 2"),
])
def test_stray_angle_brackets_are_refused_not_read_as_words(b, text, says):
    with pytest.raises(b.mumu.PromptError, match=says):
        b.mumu.bind_placeholders(text, [])


def test_brackets_beside_spaces_stay_text(b):
    assert b.mumu.bind_placeholders("x < y and y > z", []) == ["x < y and y > z"]
    assert b.mumu.bind_placeholders("a <image> -> b", [""]) == ["a ", 0, " -> b"]
    assert b.mumu.bind_placeholders("<<image>>", [""]) == ["<", 0, ">"]


# --------------------------------------------------------------------------------------------------- router

def test_a_router_without_vocabulary_predicts_from_its_prior(b):
    router = b.router.NaiveBayesRouter().fit(["!!!", "???", "..."], ["chat", "draw", "draw"])
    assert router.vocab == set()
    label, p = router.predict("draw a cat")
    assert label == "draw" and abs(p - 2 / 3) < 1e-12


# ------------------------------------------------------------------------------------- resuming checkpoints

def make_trainer(b, hidden=32, seed=0):
    config = b.data.TrainConfig(steps=4, batch_size=4, lr=1e-3, seed=seed, val_fraction=0.25, eval_every=2)
    g = torch.Generator().manual_seed(0)
    data = b.data.DistillData(inputs=torch.randn(12, 77, 16, generator=g), last_token=torch.full((12,), 76),
                              targets=torch.randn(12, 77, 768, generator=g))
    mapper = b.data.seeded_init(seed, lambda: b.mapper.BeyondCLIPMapper(b.mapper.MapperConfig(in_dim=16,
                                                                                               hidden_dim=hidden)))
    return b.trainer.Trainer(b.tasks.DistillTask(b.tasks.MapperStudent(mapper), data, config), config)


def saved_state(trainer):
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_a_checkpoint_of_another_run_is_refused_whole_never_half_loaded(b):
    source = make_trainer(b)
    source.run()
    good = saved_state(source)
    other = saved_state(make_trainer(b, hidden=48))  # another mapper: other shapes throughout

    def without(key):
        return {k: v for k, v in good.items() if k != key}

    def optimizer_of_other_shapes():
        state = saved_state(source)
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(3, 3)
        return state

    variants = [
        (other, "holds tensors of other shapes"),
        (without("optimizer"), r"lacks the entries \['optimizer'\]"),
        (without("student"), r"lacks the entries \['student'\]"),
        ({**good, "student": {k: v for k, v in list(good["student"].items())[1:]}}, "lacks 1 trained tensor"),
        ({**good, "student": {**good["student"], "extra.weight": torch.zeros(1)}}, "holds 1 other tensor"),
        (optimizer_of_other_shapes(), "optimizer state 'exp_avg'"),
        ({**good, "optimizer": {"state": {}, "param_groups": []}}, "parameter groups of sizes"),
        ({**good, "step": "4"}, "not a step count"),
        ({**good, "history": None}, "history is not a list"),
        ([1, 2, 3], "not a trainer state"),
    ]
    for state, says in variants:
        fresh = make_trainer(b)
        before = {k: v.clone() for k, v in fresh.student.state_dict().items()}
        with pytest.raises(ValueError, match=says):
            fresh.load_state_dict(state)
        after = fresh.student.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"half-loaded by: {says}"
        assert fresh.step == 0 and fresh.history == []
    resumed = make_trainer(b)
    resumed.load_state_dict(good)  # the run's own checkpoint still loads
    assert resumed.step == source.step


# ------------------------------------------------------------------------------------------- GILL retrieval

def test_the_retrieval_head_runs_on_all_eight_img_states_and_keeps_the_first(b):
    """The reference: ret_text_hidden_fcs[0](raw_emb, None)[:, 0], then divided by its norm. A matrix product over 8
    rows may round differently from one over the first row alone, so the pack computes it the same way."""
    config = b.gill.GILLConfig(llm_dim=64, mapper_hidden=32, mapper_ffn=64, encoder_layers=1, decoder_layers=1,
                               out_tokens=4, vision_dim=32, ret_dim=16)
    model = b.data.seeded_init(0, lambda: b.gill.GILLModel(config)).eval()
    states = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1)) * 30
    seen = []
    handle = model.ret_text_hidden_fcs[0].model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            ours = model.text_retrieval_embedding(states)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 8, 64])], "the Linear must see all 8 [IMG] states"
    with torch.no_grad():
        reference = model.ret_text_hidden_fcs[0].model(states)[:, 0]
    reference = reference / reference.norm(dim=-1, keepdim=True)
    assert torch.equal(ours, reference)


# ------------------------------------------------------------------------------------------ the error names

def test_every_error_class_of_bridges_shows_a_short_name(b):
    """Every PackError subclass defined anywhere in bridges/ is shown as beyond_clip.<Class> (not the install path)."""
    package = importlib.import_module(BRIDGES_PACKAGE)
    found = []
    for info in pkgutil.walk_packages(package.__path__, BRIDGES_PACKAGE + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, b.errors.PackError):
                found.append(value)
                assert value.__module__ == "beyond_clip", value
    assert {"PackError", "LoadError", "InputError", "PromptError", "GILLInputError"} <= {c.__name__ for c in found}
