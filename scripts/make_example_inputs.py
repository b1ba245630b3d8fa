"""Rebuild data/examples/ (the example inputs the shipped workflows name) from freely licensed sources.

Sources (not needed at run time; data/examples/README.md lists each picture's origin and license):
  - scikit-image's bundled sample photos (skimage/data/: public domain or CC0), --skimage DIR
  - matplotlib's bundled sample data (grace_hopper.jpg: public domain), --matplotlib DIR
  - Open Clip Art Library drawings (public domain; Debian's openclipart-svg package), --openclipart DIR,
    rendered to PNG by headless Chromium (Debian's chromium)

    python scripts/make_example_inputs.py --skimage .../skimage/data --matplotlib .../mpl-data/sample_data \\
        --openclipart /usr/share/openclipart/svg

Pictures are small (a few tens of KB): they show what goes where, the built-in models are random anyway.
"""
import argparse
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent.parent / "data" / "examples"
CLIPART = {  # name -> path under openclipart's svg/ folder
    "dog": "animals/mammals/dogs/beagle_copper_ganson.svg",
    "style": "unsorted/landscape_near_the_river_01.svg",
    "story_1": "recreation/holiday/beach_trip_ganson.svg",
    "story_2": "recreation/holiday/footprints_in_sand_ganson.svg",
    "story_3": "recreation/sand_castle_nathan_hawke_01.svg",
    "story_4": "food/picnic_01.svg",
}


def render_svg(svg: Path, size=(640, 640)) -> Image.Image:
    """The drawing on white, cropped to its content, by headless Chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(f"<html><body style='margin:0;background:#fff'><img src='file://{svg}' "
                        f"style='width:{size[0]}px;height:{size[1]}px;object-fit:contain'></body></html>")
        shot = Path(tmp) / "shot.png"
        subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={size[0]},{size[1]}", f"--screenshot={shot}", f"file://{page}"],
                       check=True, capture_output=True, timeout=120)
        img = Image.open(shot).convert("RGB")
    box = ImageOps.invert(img).getbbox()
    return img.crop(box) if box else img


def fit(img: Image.Image, longest: int) -> Image.Image:
    img = img.copy()
    img.thumbnail((longest, longest), Image.LANCZOS)
    return img


def pad_to(img: Image.Image, size, colour=(255, 255, 255)) -> Image.Image:
    canvas = Image.new("RGB", size, colour)
    img = fit(img, min(size) - 8)
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return canvas


def kuwahara(img: Image.Image, radius=4) -> Image.Image:
    """Kuwahara filter: each pixel takes the mean colour of its least varied (r+1)^2 quadrant: it looks painted."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w, _ = a.shape
    r = radius
    padded = np.pad(a, ((r, r), (r, r), (0, 0)), mode="edge")

    def integral(x):
        s = np.zeros((x.shape[0] + 1, x.shape[1] + 1) + x.shape[2:])
        s[1:, 1:] = x.cumsum(0).cumsum(1)
        return s

    grey = padded.mean(axis=2)
    sums, squares, colours = integral(grey), integral(grey ** 2), integral(padded)

    def window(s, y0, x0):  # sums over rows y0..y0+r and columns x0..x0+r (padded coordinates)
        return s[y0 + r + 1, x0 + r + 1] - s[y0, x0 + r + 1] - s[y0 + r + 1, x0] + s[y0, x0]

    ys, xs = np.arange(h)[:, None] + r, np.arange(w)[None, :] + r
    n = (r + 1) ** 2
    best, out = np.full((h, w), np.inf), np.zeros_like(a)
    for y0 in (ys - r, ys):
        for x0 in (xs - r, xs):
            mean = window(sums, y0, x0) / n
            var = window(squares, y0, x0) / n - mean ** 2
            better = var < best
            best = np.where(better, var, best)
            out = np.where(better[..., None], window(colours, y0, x0) / n, out)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def save_png(img: Image.Image, path: Path, colours=256):
    """A small PNG: photos are reduced to a 256-colour palette (dithered), drawings keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.mode == "RGB" and colours:
        img = img.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    img.save(path, optimize=True)


def save_jpeg(img: Image.Image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, quality=85, optimize=True)


SUBJECTS = ["a red fox", "an old lighthouse", "a cat", "a small dog", "a castle", "a sailing boat", "a bowl of fruit",
            "a mountain lake", "a city street", "a steam train", "a hot air balloon", "a wooden cabin",
            "a field of sunflowers", "a white horse", "an owl", "a bicycle", "a cup of coffee", "a rocket",
            "a snowy forest", "a desert canyon", "a waterfall", "a market stall", "a old man with a beard",
            "a woman reading a book", "two children playing football", "a robot", "a dragon", "a teapot"]
PLACES = ["at sunset", "in the snow", "on a hill", "by the sea", "at night under the stars", "in the rain",
          "in a misty morning", "on a wooden table", "in a busy city", "in a quiet garden"]
STYLES = ["a photo of", "an oil painting of", "a watercolor of", "a pencil sketch of", "a 3d render of",
          "a children's book illustration of", "a close-up photo of", "a vintage postcard of"]


def captions(n, seed):
    rng = random.Random(seed)
    seen = []
    while len(seen) < n:
        line = f"{rng.choice(STYLES)} {rng.choice(SUBJECTS)} {rng.choice(PLACES)}"
        if line not in seen:
            seen.append(line)
    return seen


MUMU_PICTURES = {  # MUMU's dataset builder: captioned photos (same-name .txt), large enough for 150-px crops
    "camera": ("camera", "a man with a camera on a tripod in a park"),
    "astronaut": ("astronaut", "a woman in an orange space suit in front of a flag"),
    "cat": ("chelsea", "a cat lying on a wooden floor"),
    "coffee": ("coffee", "a cup of coffee on a saucer on a wooden table"),
}


def make_captioned_photos(sk: dict):
    for name, (source, caption) in MUMU_PICTURES.items():
        img = sk[source]
        save_jpeg(fit(img.convert("RGB"), 384), OUT / "captioned_photos" / f"{name}.jpg")
        (OUT / "captioned_photos" / f"{name}.txt").write_text(caption + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skimage", type=Path, required=True, help="scikit-image's skimage/data folder")
    parser.add_argument("--matplotlib", type=Path, required=True, help="matplotlib's mpl-data/sample_data folder")
    parser.add_argument("--openclipart", type=Path, required=True, help="openclipart's svg folder")
    args = parser.parse_args()
    readme = (OUT / "README.md").read_text() if (OUT / "README.md").is_file() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if readme is not None:
        (OUT / "README.md").write_text(readme)

    sk = {name: Image.open(args.skimage / f"{name}.{ext}") for name, ext in (
        ("camera", "png"), ("astronaut", "png"), ("chelsea", "png"), ("coffee", "png"), ("rocket", "jpg"))}
    hopper = Image.open(args.matplotlib / "grace_hopper.jpg")
    drawn = {name: render_svg(args.openclipart / rel) for name, rel in CLIPART.items()}

    # MUMU's reference pictures and SEED's photos
    man = fit(sk["camera"].convert("L"), 224)
    save_png(man, OUT / "man.png")
    save_png(fit(sk["astronaut"].convert("RGB"), 224), OUT / "person.png")
    save_png(fit(sk["chelsea"].convert("RGB"), 240), OUT / "cat.png")
    save_png(fit(sk["coffee"].convert("RGB"), 240), OUT / "coffee.png")
    save_png(pad_to(drawn["dog"], (224, 224)), OUT / "dog.png", colours=64)
    save_png(fit(drawn["style"], 240), OUT / "style.png", colours=64)
    painting = kuwahara(fit(sk["coffee"].convert("RGB"), 240), radius=5)
    save_png(painting, OUT / "painting.png", colours=128)
    # GILL's story: four drawings in the order of the captions
    for i in range(1, 5):
        save_png(pad_to(drawn[f"story_{i}"], (256, 192)), OUT / f"story_{i}.png", colours=64)
    # GILL's picture folder for retrieval
    photos = {"astronaut": sk["astronaut"], "coffee": sk["coffee"], "rocket": sk["rocket"], "cat": sk["chelsea"],
              "grace_hopper": hopper}
    for name, img in photos.items():
        save_jpeg(fit(img.convert("RGB"), 160), OUT / "gill_photos" / f"{name}.jpg")
    save_jpeg(fit(drawn["dog"], 160), OUT / "gill_photos" / "beagle.jpg")

    # MUMU stage 2: pictures with crops cut from them, placed before their words
    crops = {"man": (man, (0, 30, 300, 512)), "person": (sk["astronaut"], (150, 20, 330, 240)),
             "cat": (sk["chelsea"], (90, 0, 390, 300)), "dog": (drawn["dog"], None)}
    for name, (img, box) in crops.items():
        source = img.convert("RGB")
        if box is None:  # the beagle's head: the left third of the drawing
            box = (0, 0, source.width * 2 // 5, source.height * 2 // 3)
        else:
            scale = source.width / 512 if name in ("man", "person") else source.width / 451
            box = tuple(int(v * scale) for v in box)
        save_png(fit(source.crop(box), 128), OUT / "mumu_pairs" / f"{name}_crop.png", colours=128)
    pairs = [("man.png", "a <image> man with a camera on a tripod in a park", "mumu_pairs/man_crop.png"),
             ("person.png", "a <image> woman in an orange space suit in front of a flag", "mumu_pairs/person_crop.png"),
             ("cat.png", "a <image> cat lying on a wooden floor", "mumu_pairs/cat_crop.png"),
             ("dog.png", "a drawing of a <image> beagle standing", "mumu_pairs/dog_crop.png"),
             ("coffee.png", "a cup of coffee on a saucer on a wooden table", ""),
             ("painting.png", "an oil painting of a cup of coffee", "")]
    (OUT / "mumu_pairs.tsv").write_text("# picture<TAB>caption (an <image> before each word a crop shows)<TAB>crops\n"
                                        + "".join("\t".join(p).rstrip("\t") + "\n" for p in pairs))
    # MUMU stage 1: captions, some with a crop placed at their <image>
    lines = captions(20, seed=1)
    lines += ["a <image> man standing in a snowy forest\tmumu_pairs/man_crop.png",
              "a <image> man on a sailing boat at sunset\tmumu_pairs/man_crop.png",
              "a <image> woman reading a book in a quiet garden\tmumu_pairs/person_crop.png",
              "a <image> cat sleeping on a sofa\tmumu_pairs/cat_crop.png",
              "a <image> dog running on the beach\tmumu_pairs/dog_crop.png",
              "a <image> man and his <image> dog in a city street\tmumu_pairs/man_crop.png\tmumu_pairs/dog_crop.png"]
    (OUT / "mumu_captions.tsv").write_text("# caption, or caption<TAB>crop... (one crop per <image>)\n"
                                           + "\n".join(lines) + "\n")
    make_captioned_photos(sk)
    # Beyond CLIP stage 1: captions, one per line
    (OUT / "captions.txt").write_text("\n".join(captions(120, seed=0)) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(OUT)}\t{p.stat().st_size}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
