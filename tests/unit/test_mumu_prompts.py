"""MUMU's prompt syntax, picture preparation and token budget (pure torch)."""
import pytest
import torch


@pytest.fixture(scope="module")
def mumu(bridges):
    return bridges("mumu")


def picture(h, w, c=3, seed=0):
    return torch.rand(h, w, c, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- prompt syntax

def test_placeholders_bind_by_position_and_by_name(mumu):
    assert mumu.bind_placeholders("a <image> man and his <image> dog", ["", ""]) == \
        ["a ", 0, " man and his ", 1, " dog"]
    assert mumu.bind_placeholders("a <man> man and his <dog> dog", ["dog", "man"]) == \
        ["a ", 1, " man and his ", 0, " dog"]
    # Mixed, and a named image used twice: named ones by name, unnamed ones in order.
    assert mumu.bind_placeholders("<image> <man> x <man> in <image>", ["", "man", ""]) == \
        [0, " ", 1, " x ", 1, " in ", 2]
    assert mumu.bind_placeholders("just words", []) == ["just words"]


@pytest.mark.parametrize("text,names,says", [
    ("a <man> man", [], ["<man>", "no image named 'man'", "images: none"]),
    ("a <cat> cat", ["dog"], ["<cat>", "image #1 (named 'dog')"]),
    ("a <image> man and his <image> dog", [""], ["<image> #2", "only 1 unnamed image"]),
    ("a <image> man", [], ["<image> #1", "no unnamed image"]),
    ("a man", [""], ["image #1 (unnamed) has no placeholder", "<image>"]),
    ("a <man> man", ["man", "dog"], ["image #2 (named 'dog') has no placeholder", "<dog>"]),
    ("<a> <a>", ["a", "a"], ["two images are named 'a'"]),
    ("<image>", ["image"], ["cannot be used"]),
])
def test_placeholder_errors_name_the_placeholder_and_the_image(mumu, text, names, says):
    with pytest.raises(mumu.PromptError) as e:
        mumu.bind_placeholders(text, names)
    for part in says:
        assert part in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------- images

def test_images_are_padded_square_with_black_and_any_channel_layout_works(mumu):
    mean = std = (0.5, 0.5, 0.5)
    wide = mumu.prepare_image(torch.ones(20, 40, 3), 16, mean, std)  # white, 2:1
    assert wide.shape == (3, 16, 16)
    assert torch.all(wide[:, :4] == -1) and torch.all(wide[:, 12:] == -1), "black bars top and bottom"
    assert torch.allclose(wide[:, 5:11], torch.ones(1), atol=1e-3), "the picture itself stays white"

    gray = picture(30, 30, 1)
    assert torch.equal(mumu.prepare_image(gray, 16, mean, std),
                       mumu.prepare_image(gray.expand(30, 30, 3), 16, mean, std))
    rgba = picture(30, 30, 4)
    rgba[..., 3] = 0.0  # fully transparent -> the black background
    assert torch.all(mumu.prepare_image(rgba, 16, mean, std) == -1)
    rgba[..., 3] = 1.0
    assert torch.equal(mumu.prepare_image(rgba, 16, mean, std), mumu.prepare_image(rgba[..., :3], 16, mean, std))
    # A very large photo is resized first: no 6000 x 6000 square is ever allocated.
    big = torch.rand(1, 1, 3).expand(4000, 6000, 3)
    assert mumu.prepare_image(big, 64, mean, std).shape == (3, 64, 64)
    with pytest.raises(mumu.PromptError, match="5 channels"):
        mumu.prepare_image(picture(8, 8, 5), 16, mean, std)


# ------------------------------------------------------------------------------------------------ budget

def test_token_budget_average_pools_each_image_grid_and_keeps_text(mumu):
    grid = 4
    seq = mumu.Sequence(input_ids=torch.zeros(1, 3 + 2 * 16, dtype=torch.long),
                        spans=[mumu.Span(start=1, image=0, grid=grid), mumu.Span(start=18, image=1, grid=grid)],
                        text_tokens=3)
    tokens = torch.randn(1, 35, 6)
    out, new = mumu.fit_token_budget(tokens, seq, budget=11)  # 3 text + 2 x 2x2
    assert new == 2 and out.shape == (1, 11, 6)
    assert torch.equal(out[:, 0], tokens[:, 0]) and torch.equal(out[:, 5], tokens[:, 17])
    assert torch.equal(out[:, 10], tokens[:, 34])
    block = tokens[0, 1:17].reshape(4, 4, 6)  # row-major patches of image 0
    assert torch.allclose(out[0, 1], block[:2, :2].mean(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(out[0, 4], block[2:, 2:].mean(dim=(0, 1)), atol=1e-6)
    assert mumu.fit_token_budget(tokens, seq, budget=0)[0] is tokens
    assert mumu.fit_token_budget(tokens, seq, budget=35)[1] is None
    with pytest.raises(mumu.PromptError, match="3 text tokens \\+ 2 image"):
        mumu.fit_token_budget(tokens, seq, budget=4)
