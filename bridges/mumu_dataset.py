"""MUMU's bootstrapped dataset (paper: OBJECT EXTRACTION, Training Details, STAGE 1/2): the rules that turn one
captioned picture and what an open-vocabulary detector found in it into a multimodal prompt.

- The caption is the detector's text query; each detected box is grounded to the words whose tokens it scores
  above the text threshold. Its crop is placed before those words ("a <man> man and his <dog> dog").
- Crops whose area is under 150x150 px or over 75 % of the picture are dropped ("less than" and "larger than" in
  the paper: a crop of exactly 150x150 px, or of exactly 75 %, is kept).
- A phrase made only of function words ('a', 'his', 'near a') gets no crop.
- At most 3 crops per prompt: one per phrase (the best-scoring box of words that already have a crop is
  dropped), then the 3 highest detector scores (ties: earlier in the caption first). The dropped ones are
  recorded with the rule that dropped them.
- Person crops (the phrase names a person) are replaced by the person's head 70 % of the time: a seeded draw per
  crop; the head is the best box of the query "head" inside the person box. When no head is found, or the head
  crop is under 150x150 px, the person crop stays (and the record says why).
- 20 % of the conditioning crops are augmented (random crop, horizontal flip, Gaussian noise, grayscale: each op
  with probability 1/2, at least one). They are baked into the crop file, so the trainer reads them as they are.
- 30 % of prompts also get a control image of the whole picture, placed before the whole caption (so the words
  CLIP reads for stage 1 are unchanged). The paper drew canny, depth or sketch; depth and sketch need models the
  pack does not ship, so all control images here are canny edges (computed below, pure torch).
- Everything is padded to a square with black.
- Stage 2 (the paper: one face or person crop per prompt): the person / head crop with the best score, else
  the best-scoring object crop; pictures without a crop have no stage-2 line.

Every random choice is a function of (seed, picture key, what is drawn, where): a rebuild is identical, and the
result does not depend on the order the pictures are processed in or on how they are split between processes.

Pure torch; no files, no ComfyUI.
"""
import hashlib
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .config_record import ConfigRecord
from .errors import InputError
from .mumu import PLACEHOLDER, POSITIONAL

RULES_VERSION = 1  # part of every build key: a change of the rules below rebuilds existing datasets

# Words that make a phrase a person (its crop may become the head). Lower case, singular and plural.
PERSON_WORDS = frozenset("""
person people persons man men woman women boy boys girl girls child children kid kids baby babies toddler
toddlers teen teens teenager teenagers lady ladies gentleman gentlemen guy guys adult adults human humans player
players athlete athletes worker workers student students father mother dad mom mum son daughter brother sister
grandfather grandmother grandma grandpa husband wife bride groom couple family friend friends rider riders skier
skiers surfer surfers skateboarder skateboarders snowboarder snowboarders chef chefs doctor doctors nurse nurses
soldier soldiers officer officers police policeman policewoman businessman businesswoman farmer farmers tourist
tourists dancer dancers singer singers musician musicians actor actress model models pedestrian pedestrians
passenger passengers customer customers crowd spectators fans
""".split())  # noqa: SIM905  (a word list reads better as text)
# Words that depict nothing by themselves: the crop goes after them when they open a phrase ("his <dog> dog",
# "near a <house> house"), and a phrase made only of them gets no crop.
FUNCTION_WORDS = frozenset("""
a an the this that these those his her its their our my your some any one two three four five several many few
each every another other both all no and or but of on in at to into onto from with without by for near under
over above below behind beside between next through across along against around is are was were be being been
""".split())  # noqa: SIM905  (a word list reads better as text)


@dataclass(frozen=True)
class Rules:
    """The paper's numbers; a build records them (a change rebuilds the dataset)."""
    min_area: int = 150 * 150  # px^2: smaller crops are dropped
    max_fraction: float = 0.75  # of the picture's area: larger crops are dropped
    max_crops: int = 3  # per prompt
    head_rate: float = 0.7  # person crops replaced by the head
    augment_rate: float = 0.2  # conditioning crops augmented
    control_rate: float = 0.3  # prompts with a control image of the whole picture
    head_query: str = "head"

    def __post_init__(self):
        for name in ("head_rate", "augment_rate", "control_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        if self.min_area < 0 or not 0.0 < self.max_fraction <= 1.0 or self.max_crops < 0:
            raise InputError(f"invalid dataset rules {asdict(self)}")


@dataclass(frozen=True)
class Settings(ConfigRecord):
    """What a user chooses for a build (node inputs / command-line options)."""
    FIELDS_LABEL = "dataset settings"
    seed: int = 0
    box_threshold: float = 0.35  # Grounding DINO's usual demo values
    text_threshold: float = 0.25
    crop_max_side: int = 1024  # crops and control images larger than this are scaled down (aspect kept)
    control: str = "canny"
    rules: Rules = field(default_factory=Rules)

    def __post_init__(self):
        for name in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.crop_max_side < 16:
            raise InputError(f"crop_max_side must be at least 16 pixels, not {self.crop_max_side}")
        if self.control != "canny":
            raise InputError(f"control image kind {self.control!r} is not available: only 'canny' is (depth and "
                             f"sketch need models the pack does not ship)")


# ------------------------------------------------------------------------------------------------ seeded draws

def _digest(seed: int, key: str, *parts) -> bytes:
    text = "\x1f".join([str(int(seed)), key, *(str(p) for p in parts)])
    return hashlib.sha256(text.encode("utf-8")).digest()


def draw(seed: int, key: str, *parts) -> float:
    """A number in [0, 1) that depends only on its arguments (not on order, process or platform)."""
    return int.from_bytes(_digest(seed, key, *parts)[:8], "big") / 2.0 ** 64


def generator(seed: int, key: str, *parts) -> torch.Generator:
    """A CPU torch generator seeded from its arguments (for noise tensors)."""
    return torch.Generator().manual_seed(int.from_bytes(_digest(seed, key, *parts)[:8], "big") & (2 ** 63 - 1))


# ---------------------------------------------------------------------------------------------------- captions

def clean_caption(text: str) -> str:
    """The caption as searched and written: whitespace collapsed (the trainer files are tab- and line-separated),
    '<' and '>' replaced by '‹' '›' (they would read as image placeholders), no leading '#' (a comment line)."""
    text = " ".join(str(text).split())
    text = text.replace("<", "‹").replace(">", "›")
    return text.lstrip("#").strip()


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def query_text(caption: str) -> str:
    """Grounding DINO's text query for a caption: it ends with '.' (the model's phrase separator)."""
    return caption if caption.endswith(".") else caption + " ."


# ----------------------------------------------------------------------------------------------------- boxes

@dataclass
class Detection:
    """A box grounded to words of the caption. box: (x0, y0, x1, y1) in picture pixels; span: the characters of
    the grounded words; at: where the crop's placeholder goes (the first word that depicts something)."""
    box: tuple
    score: float
    span: tuple
    at: int
    phrase: str


def pixel_box(box, width: int, height: int) -> tuple:
    """Integer pixel box (rounded, inside the picture)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(round(x0), 0), width), min(max(round(x1), 0), width)))
    y0, y1 = sorted((min(max(round(y0), 0), height), min(max(round(y1), 0), height)))
    return (x0, y0, x1, y1)


def box_area(box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def size_rule(box, width: int, height: int, rules: Rules):
    """None when the crop's size is allowed, else the rule that drops it."""
    area = box_area(box)
    if area < rules.min_area:
        return "under_min_area"
    if area > rules.max_fraction * width * height:
        return "over_max_fraction"
    return None


def _word_bounds(text: str, start: int, end: int):
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return start, end


def content_words(phrase: str) -> list:
    """The phrase's words that depict something (lower case), in order."""
    return [w for w in re.findall(r"\w+", phrase.lower()) if w not in FUNCTION_WORDS]


def _insertion_point(text: str, start: int, end: int) -> int:
    """Where the first word of text[start:end] that is not a function word starts ('his black dog' -> 'black')."""
    for match in re.finditer(r"\w+", text[start:end]):
        if match.group(0).lower() not in FUNCTION_WORDS:
            return start + match.start()
    return start


def ground(probs: torch.Tensor, boxes: torch.Tensor, offsets, caption: str, width: int, height: int,
           box_threshold: float, text_threshold: float) -> list:
    """Detections from Grounding DINO's outputs for one picture.

    probs: (queries, tokens) sigmoid of the logits for the query's tokens; boxes: (queries, 4) (cx, cy, w, h)
    relative to the picture; offsets: per token (start, end) characters in the caption ((0, 0) for special
    tokens). Only word tokens inside the caption count (not [CLS]/[SEP], punctuation or the appended '.'). A box
    is kept when its best word token scores above box_threshold; its words are the run of neighbouring tokens
    above text_threshold around that token, widened to whole words."""
    probs = probs.float()
    n_tokens = probs.shape[1]
    word = torch.zeros(n_tokens, dtype=torch.bool)
    for i, (s, e) in enumerate(list(offsets)[:n_tokens]):
        s, e = int(s), int(e)
        word[i] = e > s and e <= len(caption) and has_words(caption[s:e])
    if not word.any():
        return []
    masked = probs.masked_fill(~word, -1.0)
    scores, best = masked.max(dim=1)
    found = []
    for q in torch.nonzero(scores > box_threshold).flatten().tolist():
        b = int(best[q])
        if float(probs[q, b]) <= text_threshold:
            continue
        first = last = b
        while first - 1 >= 0 and word[first - 1] and probs[q, first - 1] > text_threshold:
            first -= 1
        while last + 1 < n_tokens and word[last + 1] and probs[q, last + 1] > text_threshold:
            last += 1
        start, end = _word_bounds(caption, int(offsets[first][0]), int(offsets[last][1]))
        cx, cy, w, h = (float(v) for v in boxes[q])
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        found.append(Detection(box=box, score=float(scores[q]), span=(start, end),
                               at=_insertion_point(caption, start, end), phrase=caption[start:end]))
    return found


def detector_input_size(width: int, height: int, shortest_edge: int, longest_edge: int):
    """(w, h) the Grounding DINO image processor resizes a picture to (shortest edge, capped by the longest)."""
    short, long = min(width, height), max(width, height)
    scale = min(shortest_edge / short, longest_edge / long)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


# ---------------------------------------------------------------------------------------- choosing the crops

def _overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def choose_crops(detections, width: int, height: int, rules: Rules):
    """(kept detections with their pixel boxes, in caption order; dropped [(detection, pixel box, rule)]).

    Size first; then, best score first (ties: earlier words, then the box), a box whose words overlap words that
    already have a crop is dropped; the first `max_crops` remain."""
    dropped, candidates = [], []
    for d in detections:
        box = pixel_box(d.box, width, height)
        rule = size_rule(box, width, height, rules) or (None if content_words(d.phrase) else "no_content_word")
        if rule:
            dropped.append((d, box, rule))
        else:
            candidates.append((d, box))
    candidates.sort(key=lambda c: (-c[0].score, c[0].span[0], c[0].span[1], c[1]))
    kept = []
    for d, box in candidates:
        if any(_overlaps(d.span, k.span) for k, _ in kept):
            dropped.append((d, box, "words_already_have_a_crop"))
        elif len(kept) >= rules.max_crops:
            dropped.append((d, box, f"over_{rules.max_crops}_per_prompt"))
        else:
            kept.append((d, box))
    kept.sort(key=lambda c: c[0].at)
    dropped.sort(key=lambda c: (c[0].span[0], -c[0].score, c[1]))
    return kept, dropped


def is_person(phrase: str) -> bool:
    return any(w in PERSON_WORDS for w in re.findall(r"[a-z]+", phrase.lower()))


def pick_head(heads, person_box, rules: Rules):
    """(head pixel box or None, rule) from detections of the head query inside the person box (picture
    coordinates): the best-scoring one, clipped to the person box; it must not be under the minimum area."""
    if not heads:
        return None, "person_head_not_found"
    best = max(heads, key=lambda d: (d.score, -d.box[0], -d.box[1]))
    x0, y0, x1, y1 = person_box
    box = pixel_box(best.box, x1, y1)
    box = (max(box[0], x0), max(box[1], y0), min(box[2], x1), min(box[3], y1))
    if box_area(box) < rules.min_area:
        return None, "person_head_too_small"
    return box, "head"


# ------------------------------------------------------------------------------------------------ placeholders

def placeholder_name(phrase: str, taken) -> str:
    """A placeholder name for a phrase: its last content word, ASCII letters/digits ('his black dog' -> 'dog'),
    unique among `taken` (dog, dog_2, ...). Never 'image' (the positional placeholder)."""
    ascii_text = unicodedata.normalize("NFKD", " ".join(content_words(phrase))).encode("ascii", "ignore").decode()
    words = re.findall(r"[A-Za-z0-9]+", ascii_text.lower())
    base = words[-1] if words else "crop"
    if base == POSITIONAL:
        base = "image_crop"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def assemble_prompt(caption: str, placements, control_name: str = None) -> str:
    """The caption with '<name> ' inserted at each (character position, name), and '<control> ' before it all."""
    text = caption
    for at, name in sorted(placements, key=lambda p: p[0], reverse=True):
        text = f"{text[:at]}<{name}> {text[at:]}"
    if control_name:
        text = f"<{control_name}> {text}"
    return text


def only_placeholder(prompt: str, keep: str) -> str:
    """The prompt with every placeholder but <keep> removed (stage 2: a single crop per prompt)."""
    text = PLACEHOLDER.sub(lambda m: m.group(0) if m.group(1) == keep else " ", prompt)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class PlannedImage:
    name: str
    rule: str  # object | person | head | person_head_not_found | person_head_too_small | control_canny
    box: tuple = None  # the crop, in picture pixels (None for a control image: the whole picture)
    score: float = None
    phrase: str = ""
    span: tuple = None
    at: int = None
    person_box: tuple = None  # the person crop a head came from (or was looked for in)
    head_score: float = None
    augment: dict = None  # see augmentation_plan


@dataclass
class PicturePlan:
    prompt: str
    images: list  # PlannedImage, in prompt order
    dropped: list  # [(Detection, pixel box, rule)]
    stage2: str = None  # the name of the stage-2 crop
    heads_looked_for: int = 0


def augmentation_plan(seed: int, key: str, where):
    """None (80 %) or which augmentations a crop gets: {'crop': [left, top, right, bottom] fractions kept,
    'flip': bool, 'noise': sigma, 'gray': bool}, each op with probability 1/2 and at least one."""
    def u(*parts):
        return draw(seed, key, "augment", where, *parts)

    ops = {op: u(op) < 0.5 for op in ("crop", "flip", "noise", "gray")}
    if not any(ops.values()):
        ops[("crop", "flip", "noise", "gray")[min(3, int(u("which") * 4))]] = True
    plan = {"crop": None, "flip": ops["flip"], "noise": 0.0, "gray": ops["gray"]}
    if ops["crop"]:
        keep_w, keep_h = 0.8 + 0.2 * u("crop_w"), 0.8 + 0.2 * u("crop_h")
        left, top = (1 - keep_w) * u("crop_x"), (1 - keep_h) * u("crop_y")
        plan["crop"] = [round(left, 6), round(top, 6), round(left + keep_w, 6), round(top + keep_h, 6)]
    if ops["noise"]:
        plan["noise"] = round(0.02 + 0.06 * u("sigma"), 6)
    return plan


def plan_picture(detections, width: int, height: int, caption: str, key: str, settings: Settings, find_head,
                 control_available: bool = True) -> PicturePlan:
    """Everything decided for one picture. find_head(person pixel box) -> [Detection] of the head query in
    picture coordinates (called only for person crops drawn for the head swap)."""
    rules, seed = settings.rules, settings.seed
    kept, dropped = choose_crops(detections, width, height, rules)
    control = control_available and draw(seed, key, "control") < rules.control_rate
    taken = {settings.control} if control else set()
    images, looked = [], 0
    for d, box in kept:
        name = placeholder_name(d.phrase, taken)
        taken.add(name)
        image = PlannedImage(name=name, rule="object", box=box, score=round(d.score, 4), phrase=d.phrase,
                             span=tuple(d.span), at=d.at)
        if is_person(d.phrase):
            image.rule = "person"
            if draw(seed, key, "head", d.at) < rules.head_rate:
                looked += 1
                heads = find_head(box)
                head, rule = pick_head(heads, box, rules)
                image.rule, image.person_box = rule, box
                if heads:
                    image.head_score = round(max(h.score for h in heads), 4)
                if head is not None:
                    image.box = head
        if draw(seed, key, "augment", d.at) < rules.augment_rate:
            image.augment = augmentation_plan(seed, key, d.at)
        images.append(image)
    prompt = assemble_prompt(caption, [(i.at, i.name) for i in images], settings.control if control else None)
    stage2 = None
    people = [i for i in images if i.rule != "object"]
    pool = people or images
    if pool:
        stage2 = max(pool, key=lambda i: (i.score, -i.at)).name
    if control:
        images.insert(0, PlannedImage(name=settings.control, rule=f"control_{settings.control}"))
    return PicturePlan(prompt=prompt, images=images, dropped=dropped, stage2=stage2, heads_looked_for=looked)


# ------------------------------------------------------------------------------------------------ pixels

def augment(crop: torch.Tensor, plan: dict, gen: torch.Generator) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> the augmented crop (random crop, flip, noise, grayscale as planned)."""
    if plan.get("crop"):
        h, w = crop.shape[:2]
        left, top, right, bottom = plan["crop"]
        x0, x1 = int(math.floor(left * w)), max(int(math.floor(left * w)) + 1, int(math.ceil(right * w)))
        y0, y1 = int(math.floor(top * h)), max(int(math.floor(top * h)) + 1, int(math.ceil(bottom * h)))
        crop = crop[y0:min(y1, h), x0:min(x1, w)]
    if plan.get("flip"):
        crop = crop.flip(1)
    if plan.get("noise"):
        crop = (crop + plan["noise"] * torch.randn(crop.shape, generator=gen)).clamp(0, 1)
    if plan.get("gray"):
        gray = (crop * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
        crop = gray.expand(*gray.shape[:2], 3)
    return crop.contiguous()


def fit_side(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """(H, W, 3) float, scaled down (antialiased, aspect kept) so that its longer side is at most max_side."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 1)


def pad_square(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) -> (S, S, C), S = max(H, W), the image centred on black (as bridges.mumu.prepare_image pads)."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = torch.zeros(side, side, image.shape[2], dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = image
    return square


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8)


def _filter_1d(image: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate a 2-D image with 1-D taps along `dim`, edges replicated (shifted sums: much faster than a
    one-channel conv2d on a CPU)."""
    radius = (len(taps) - 1) // 2
    padded = F.pad(image[None, None], (radius, radius, 0, 0) if dim == 1 else (0, 0, radius, radius),
                   mode="replicate")[0, 0]
    size = image.shape[dim]
    out = torch.zeros_like(image)
    for i, tap in enumerate(taps.tolist()):
        if tap:
            out.add_(padded.narrow(dim, i, size), alpha=tap)
    return out


def _hysteresis(weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """The weak pixels 8-connected to a strong one (scipy's labelling: one pass, however long the chains)."""
    from scipy import ndimage
    labels, count = ndimage.label(weak.numpy(), structure=[[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    labels = torch.from_numpy(labels)
    keep = torch.zeros(count + 1, dtype=torch.bool)
    keep[labels[strong].unique()] = True
    keep[0] = False
    return keep[labels]


def canny(image: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of an (H, W, 3) float image in [0, 1]: (H, W, 3) float, white edges on black.

    Gaussian blur, normalised Sobel gradients (a black-to-white step gives 0.5), non-maximum suppression along
    the gradient direction, and hysteresis (weak edges kept where they connect to strong ones)."""
    gray = (image.float() * torch.tensor([0.299, 0.587, 0.114])).sum(-1)
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    gauss = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    gauss = gauss / gauss.sum()
    gray = _filter_1d(_filter_1d(gray, gauss, 1), gauss, 0)
    smooth, diff = torch.tensor([1.0, 2.0, 1.0]) / 4.0, torch.tensor([-1.0, 0.0, 1.0]) / 2.0
    gx = _filter_1d(_filter_1d(gray, diff, 1), smooth, 0)
    gy = _filter_1d(_filter_1d(gray, smooth, 1), diff, 0)
    magnitude = torch.sqrt(gx * gx + gy * gy)
    # direction bins: 0 = horizontal gradient (compare left/right), 1 = 45deg, 2 = vertical, 3 = 135deg
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    bins = (((angle + 22.5) // 45.0) % 4).long()
    m = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape

    def shifted(dy, dx):
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    neighbours = [(shifted(0, -1), shifted(0, 1)), (shifted(-1, -1), shifted(1, 1)),
                  (shifted(-1, 0), shifted(1, 0)), (shifted(-1, 1), shifted(1, -1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for direction, (a, b) in enumerate(neighbours):
        keep |= (bins == direction) & (magnitude >= a) & (magnitude >= b)
    thin = magnitude * keep
    edges = _hysteresis(thin >= low, thin >= high)
    return edges.float()[..., None].expand(h, w, 3).contiguous()
