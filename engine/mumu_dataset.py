"""Builds MUMU's bootstrapped dataset: Grounding DINO finds each caption's phrases in its picture, the rules of
bridges/mumu_dataset.py make the prompt, and loaders/mumu_dataset.py writes the dataset folder.

- Resumable and incremental: a picture whose file, caption and build settings are unchanged keeps its manifest
  line and crops (also a line you edited); only new or changed pictures are read and searched.
- Interrupt-safe: the progress callback may raise (ComfyUI's interrupt). Pictures already handed to the writer
  are finished; each crop is written atomically before its manifest line, and a line is appended whole.
- Sharding: process `rank` of `world` takes pictures rank, rank + world, ... of the sorted list and writes its own
  part; whichever process finishes last merges the parts into exactly what one process builds (every random
  choice is keyed by the picture, never by the order or the process).
- Speed: reading, hashing, decoding and preprocessing run in worker threads ahead of the detector; drawing and
  writing the crops run in a writer thread behind it; the detector runs one picture at a time, so its result
  never depends on which pictures share a batch.
"""
import hashlib
import json
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bridges import mumu_dataset as rules
from ..loaders import mumu_dataset as files
from ..loaders.errors import InputError, LoadError
from ..loaders.images import open_rgb

log = logging.getLogger(__name__)
MIN_DETECTOR_SIDE = 32  # px of the detector's input: below this the backbone has no feature map to search


def build_key(settings: rules.Settings, detector) -> str:
    """What a manifest line was built with: a line with another key is built again."""
    about = {"settings": settings.to_dict(), "rules_version": rules.RULES_VERSION,
             "detector": detector.build_identity, "dtype": str(detector.dtype)}
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:16]


def picture_id(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


class Detector:
    """Runs a loaded Grounding DINO handle: text queries tokenized once, pictures preprocessed on the CPU (any
    thread), one forward per picture on the handle's device (or `device`, for the command line)."""

    def __init__(self, handle, head_query: str = "head", device=None):
        self.handle, self.device, self.head_query = handle, device, head_query
        self.model = None
        self.forwards = 0
        self._tokenizing = threading.Lock()  # a fast tokenizer refuses calls from two threads at once
        self._head = self.text(rules.query_text(head_query))

    def load(self):
        if self.device is not None:
            self.model = self.handle.inner.to(self.device)
        else:
            self.model = self.handle.module()
        self.run_device = next(self.model.parameters()).device
        return self

    def text(self, query: str):
        with self._tokenizing:
            enc = self.handle.tokenizer(query, return_offsets_mapping=True, truncation=True,
                                        max_length=self.handle.max_text_len, return_token_type_ids=True,
                                        return_tensors="pt")
        offsets = [tuple(int(v) for v in pair) for pair in enc.pop("offset_mapping")[0].tolist()]
        return dict(enc), offsets

    def pixels(self, image):
        return dict(self.handle.processor.image_processor(images=image, return_tensors="pt"))

    def forward(self, pixels: dict, text: dict):
        """(probs (queries, tokens), boxes (queries, 4) cxcywh relative) on the CPU, float32."""
        inputs = {k: v.to(self.run_device) for k, v in {**pixels, **text}.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.handle.dtype)
        with torch.inference_mode():
            out = self.model(**inputs)
        self.forwards += 1
        tokens = text["input_ids"].shape[1]
        return out.logits[0, :, :tokens].float().sigmoid().cpu(), out.pred_boxes[0].float().cpu()

    def find_heads(self, picture, person_box, box_threshold, text_threshold):
        """Detections of the head query inside a person box, in picture coordinates."""
        x0, y0, x1, y1 = person_box
        crop = picture.crop((x0, y0, x1, y1))
        text, offsets = self._head
        probs, boxes = self.forward(self.pixels(crop), text)
        heads = rules.ground(probs, boxes, offsets, self.head_query, x1 - x0, y1 - y0, box_threshold, text_threshold)
        for d in heads:
            d.box = (d.box[0] + x0, d.box[1] + y0, d.box[2] + x0, d.box[3] + y0)
        return heads


@dataclass
class BuildResult:
    rank: int
    world: int
    pictures: int  # in this process's shard
    built: int  # searched and written by this process
    reused: int  # kept from an earlier build
    skipped: list  # [(picture key, why)] unreadable pictures
    forwards: int  # detector forwards run (captions + head queries)
    merged: dict = None  # the summary, when this process merged the parts
    dataset: object = None  # loaders.mumu_dataset.MUMUDataset when merged
    problems: list = field(default_factory=list)  # the source's problems (pictures without captions, ...)

    def describe(self) -> str:
        text = (f"rank {self.rank}/{self.world}: {self.pictures} pictures ({self.built} built, {self.reused} kept, "
                f"{len(self.skipped)} unreadable)")
        if self.merged is not None:
            s = self.merged
            text += (f"; dataset {self.dataset.name}: {s['pictures']} prompts ({s['prompts_with_images']} with images"
                     f"), images {s['images_by_rule']}, {s['stage1_lines']} stage-1 and {s['stage2_lines']} stage-2 "
                     f"lines")
        elif self.world > 1:
            text += "; the last process to finish merges the parts"
        if self.skipped:
            more = " ..." if len(self.skipped) > 5 else ""
            text += "; unreadable: " + ", ".join(k for k, _ in self.skipped[:5]) + more
        if self.problems:
            first = self.problems[0]
            text += f"; {len(self.problems)} source problem(s), e.g. {first['item']}: {first['problem']}"
        return text


class _Writer:
    """Draws and writes each picture's images in a pool of threads (PNG encoding and torch release the GIL), and
    appends each picture's manifest line once its files are written, in order. close() finishes what was handed
    to it (also when the build was interrupted) and then reports the first failure."""

    def __init__(self, part, workers: int):
        self.part = part
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mumu-dataset-writer")
        self.pending = deque()  # (future or None, line), in order
        self.limit = 2 * max(1, workers) + 2  # pictures held in memory while their crops are written

    def put(self, line: dict, render=None):
        self.pending.append((self.pool.submit(render) if render is not None else None, line))
        self._flush(block=len(self.pending) > self.limit)

    def _flush(self, block=False):
        while self.pending and (block or self.pending[0][0] is None or self.pending[0][0].done()):
            future, line = self.pending[0]
            if future is not None:
                future.result()  # a failed write stops the build (the line is not appended)
            self.pending.popleft()
            self.part.append(line)
            block = False

    def close(self):
        error = None
        for future, line in self.pending:
            try:
                if future is not None:
                    future.result()
                if error is None:
                    self.part.append(line)
            except Exception as e:  # every queued picture is finished first; the first failure is raised
                error = error or e
        self.pending.clear()
        self.pool.shutdown(wait=True)
        self.part.close()
        if error is not None:
            raise error


def _render(folder, picture, plan, key, settings, entry_images):
    """Draws every planned image of one picture and writes it (crop, augmentation, canny, scaled, padded)."""
    def run():
        pixels = torch.from_numpy(np.array(picture))
        max_side = settings.crop_max_side
        for image, record in zip(plan.images, entry_images, strict=True):
            if image.box is None:  # the control image: the whole picture
                whole = rules.fit_side(pixels.float() / 255.0, max_side)
                out = rules.canny(whole)
            else:
                x0, y0, x1, y1 = image.box
                out = pixels[y0:y1, x0:x1].float() / 255.0
                if image.augment:
                    out = rules.augment(out, image.augment, rules.generator(settings.seed, key, "noise", image.at))
                out = rules.fit_side(out, max_side)
            files.write_png(folder / record["file"], rules.to_uint8(rules.pad_square(out)))
    return run


def _image_record(pid, image):
    record = {"name": image.name, "file": f"{files.CROPS}/{pid}_{image.name}.png", "rule": image.rule}
    for name in ("phrase", "span", "at", "score", "box", "person_box", "head_score", "augment"):
        value = getattr(image, name)
        if value is not None and value != "":
            record[name] = list(value) if isinstance(value, tuple) else value
    return record


def _dropped_record(d, box, rule):
    return {"phrase": d.phrase, "span": list(d.span), "score": round(d.score, 4), "box": list(box), "rule": rule}


def _finished_so_far(folder):
    """(manifest entries by picture, file stamps by picture) of the built dataset, with the pictures an interrupted
    build (or another process) finished since."""
    known, stamps = files.read_manifest(folder), files.read_stamps(folder)
    for line in files.work_entries(folder):
        if "skipped" not in line:
            known[line["picture"]] = {k: v for k, v in line.items() if k != "_stamp"}
        if isinstance(line.get("_stamp"), list) and len(line["_stamp"]) == 3:
            stamps[line["picture"]] = tuple(line["_stamp"])
    return known, stamps


class _Build:
    """One process's share of a build: pictures are read and checked in worker threads (prepare), searched by the
    detector in this thread (search), and handed to the writer's threads in order."""

    def __init__(self, detector_handle, folder, key, settings: rules.Settings, device):
        self.handle, self.folder, self.key, self.settings = detector_handle, folder, key, settings
        self.known, self.stamps = _finished_so_far(folder)
        self.detector = Detector(detector_handle, settings.rules.head_query, device)
        self.caption_texts = {}
        self.writer = None

    def prepare(self, p):
        """(kind, payload) for one picture, in a worker thread."""
        entry = self.known.get(p.key)
        usable = (entry is not None and entry.get("build") == self.key and entry.get("caption") == p.caption
                  and files.crop_files_present(self.folder, entry))
        stamp = self.stamps.get(p.key)
        if usable and stamp is not None and tuple(stamp[:2]) == (p.size, p.mtime_ns) and stamp[2] == entry["sha256"]:
            return "reuse", (entry, list(stamp))
        try:
            sha = files.file_sha256(p.path)
        except OSError as e:
            return "skip", (f"could not be read ({type(e).__name__}: {e})", None)
        stamp = [p.size, p.mtime_ns, sha]
        if usable and entry["sha256"] == sha:
            return "reuse", (entry, stamp)
        try:
            picture = open_rgb(p.path)
        except LoadError as e:
            return "skip", (str(e), stamp)
        w, h = picture.size
        iw, ih = rules.detector_input_size(w, h, self.handle.shortest_edge, self.handle.longest_edge)
        if min(iw, ih) < MIN_DETECTOR_SIDE:
            return "search", (picture, stamp, sha, f"too thin to search: the detector would see it at {iw}x{ih} px")
        if not rules.has_words(p.caption):
            return "search", (picture, stamp, sha, "the caption has no words to search for")
        if p.caption not in self.caption_texts:
            self.caption_texts[p.caption] = self.detector.text(rules.query_text(p.caption))
        return "search", (picture, stamp, sha, self.detector.pixels(picture))

    def entry_for(self, p, picture, sha, plan, note=""):
        pid = picture_id(p.key)
        images = [_image_record(pid, image) for image in plan.images]
        entry = {"picture": p.key, "sha256": sha, "caption": p.caption, "size": list(picture.size),
                 "prompt": plan.prompt, "images": images, "stage2": plan.stage2,
                 "dropped": [_dropped_record(*d) for d in plan.dropped]}
        if note:
            entry["note"] = note
        entry["build"] = self.key
        return entry

    def search(self, p, picture, stamp, sha, pixels):
        """Detects, plans and hands the picture to the writer (this thread: the detector runs here)."""
        settings = self.settings
        w, h = picture.size
        if isinstance(pixels, str):  # not searched; the reason
            plan = rules.plan_picture([], w, h, p.caption, p.key, settings, None, control_available=False)
            note = pixels
        else:
            text, offsets = self.caption_texts[p.caption]
            probs, boxes = self.detector.forward(pixels, text)
            found = rules.ground(probs, boxes, offsets, p.caption, w, h, settings.box_threshold,
                                 settings.text_threshold)

            def find_head(box):
                return self.detector.find_heads(picture, box, settings.box_threshold, settings.text_threshold)

            plan = rules.plan_picture(found, w, h, p.caption, p.key, settings, find_head)
            note = "" if found else "no phrase of the caption was found in the picture above the thresholds"
        entry = self.entry_for(p, picture, sha, plan, note)
        self.writer.put({**entry, "_stamp": stamp},
                        _render(self.folder, picture, plan, p.key, settings, entry["images"]))

    def run(self, part, mine, result: BuildResult, workers: int, progress):
        """Every picture of `mine`, in order; readers run ahead of the detector by a few pictures."""
        self.detector.load()
        self.writer = _Writer(part, workers)
        readers = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mumu-dataset-reader")
        pending, upcoming = deque(), iter(mine)

        def refill():
            while len(pending) < 2 * max(1, workers) + 2:
                p = next(upcoming, None)
                if p is None:
                    return
                pending.append((p, readers.submit(self.prepare, p)))

        try:
            refill()
            done = 0
            while pending:
                p, future = pending.popleft()
                refill()
                kind, payload = future.result()
                if kind == "reuse":
                    entry, stamp = payload
                    self.writer.put({**entry, "_stamp": stamp})
                    result.reused += 1
                elif kind == "skip":
                    why, stamp = payload
                    self.writer.put({"picture": p.key, "skipped": why, "_stamp": stamp})
                    result.skipped.append((p.key, why))
                else:
                    self.search(p, *payload)
                    result.built += 1
                done += 1
                if progress is not None:
                    progress(done, len(mine))
        except BaseException:
            # interrupted (or failed): the pictures handed to the writer are finished, the rest left for next time
            for _, future in pending:
                future.cancel()
            readers.shutdown(wait=True)
            try:
                self.writer.close()
            except Exception as e:  # the interruption is what the caller must see
                log.warning("MUMU dataset: a picture could not be written while stopping (%s: %s)",
                            type(e).__name__, e)
            raise
        readers.shutdown(wait=True)
        self.writer.close()
        result.forwards = self.detector.forwards


def build_dataset(detector_handle, source_name: str, dataset_name: str, settings: rules.Settings, *, rank: int = 0,
                  world: int = 1, progress=None, workers: int = 2, device=None) -> BuildResult:
    """Builds (or brings up to date) input/<dataset_name>/ from the captioned pictures of `source_name`.
    progress(done, total) after each picture of this process's shard; it may raise to stop."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is not within world size {world}")
    source = files.read_source(source_name)
    if not source.pictures:
        listed = "; ".join(f"{p['item']}: {p['problem']}" for p in source.problems[:5])
        raise InputError(f"'{source_name}' holds no captioned pictures" + (f" ({listed})" if listed else "")
                         + ". Put pictures with same-name .txt captions in the folder, or 'picture<TAB>caption' lines "
                           "in the .tsv.")
    folder = files.prepare_dataset_dir(dataset_name, files.resolve_source(source_name))
    key = build_key(settings, detector_handle)
    fp = files.fingerprint(key, source)
    part = files.PartWriter(folder, rank, world)
    mine = source.pictures[rank::world]
    result = BuildResult(rank=rank, world=world, pictures=len(mine), built=0, reused=0, skipped=[], forwards=0,
                         problems=source.problems)
    _Build(detector_handle, folder, key, settings, device).run(part, mine, result, workers, progress)
    part.finish(fp)
    info = {"settings": settings.to_dict(), "build": key,
            "detector": {"name": detector_handle.name, "identity": detector_handle.build_identity,
                         "dtype": str(detector_handle.dtype).replace("torch.", "")},
            "control_images": "canny (depth and sketch need models the pack does not ship)"}
    summary = files.try_merge(folder, world, fp, source, info)
    if summary is not None:
        result.merged = summary
        result.dataset = files.describe_dataset(folder)
    return result


# ------------------------------------------------------------------------------------------------- preview

def preview(dataset, count: int = 4, start: int = 0, tile: int = 192):
    """(IMAGE (1, H, W, 3) float, [prompt texts]): for `count` prompts from `start`, a row with the picture (its
    kept boxes drawn) and each conditioning image as the trainer reads it (the file: padded square), labelled,
    with the prompt written below. What the stage-1 trainer will see."""
    from PIL import Image, ImageDraw, ImageFont
    manifest = files.read_manifest(dataset.folder)
    entries = [manifest[k] for k in sorted(manifest)]
    chosen = entries[start:start + count]
    if not chosen:
        raise InputError(f"{dataset.describe()} has {len(entries)} prompt(s); start {start} is past them")
    try:
        font = ImageFont.load_default(size=max(10, tile // 14))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    line_height = max(12, tile // 12)
    columns = 1 + max(len(e["images"]) for e in chosen)
    pad = 8
    width = columns * (tile + pad) + pad
    rows = []
    for e in chosen:
        tiles = []
        picture = open_rgb(files.input_dir() / e["picture"])
        draw = ImageDraw.Draw(picture)
        scale = max(picture.size) / tile
        for image in e["images"]:
            if image.get("box"):
                draw.rectangle(image["box"], outline=(255, 60, 60), width=max(1, int(round(2 * scale))))
                if image.get("person_box"):
                    draw.rectangle(image["person_box"], outline=(255, 200, 0), width=max(1, int(round(scale))))
        picture.thumbnail((tile, tile))
        tiles.append((picture, "picture"))
        for image in e["images"]:
            crop = open_rgb(dataset.folder / image["file"]).resize((tile, tile), Image.BICUBIC)
            tiles.append((crop, f"<{image['name']}> {image['rule']}"))
        text = e["prompt"]
        words, lines, current = text.split(), [], ""
        per_line = max(8, width // max(6, tile // 24))
        for word in words:
            if len(current) + len(word) + 1 > per_line and current:
                lines.append(current)
                current = word
            else:
                current = f"{current} {word}".strip()
        lines.append(current)
        height = tile + line_height + len(lines) * line_height + 2 * pad
        row = Image.new("RGB", (width, height), (24, 24, 24))
        canvas = ImageDraw.Draw(row)
        for i, (im, label) in enumerate(tiles):
            x = pad + i * (tile + pad)
            row.paste(im, (x + (tile - im.width) // 2, pad + (tile - im.height) // 2))
            canvas.text((x, pad + tile + 2), label, fill=(200, 200, 200), font=font)
        for j, line in enumerate(lines):
            canvas.text((pad, pad + tile + line_height + j * line_height + 2), line, fill=(255, 255, 255), font=font)
        rows.append(row)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (0, 0, 0))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None], [e["prompt"] for e in chosen]


