"""How fast Build MUMU Dataset turns captioned pictures into prompts, against the detector alone.

The builder reads, hashes, decodes and preprocesses pictures in worker threads ahead of the detector, and draws and
writes the crops in a writer thread behind it, so the detector's forwards should set its pace. This prints, on the
same pictures (JPEG files with captions naming people and objects):
- the builder (a clean build: every picture searched, crops and trainer files written), pictures per second;
- a bare loop of the detector's forward, one picture at a time, on inputs preprocessed beforehand (nothing else
  timed): once with the caption queries only, once with exactly the forwards the builder ran (captions + the
  'head' queries inside person boxes, read back from the built manifest);
- the ratio builder / bare loop with the same forwards (target >= 0.9: the builder's own work is not the
  bottleneck), and the peak memory of each (process RSS; on a GPU also the device's peak allocation).

The detector is Grounding DINO with grounding-dino-tiny's configuration (Swin-T + BERT-base, 900 queries) and random
weights, built here (nothing can be downloaded): the work per forward is the real model's; the detections are
random, so the thresholds are set where random scores ground boxes to words and crops get written.

    python benchmarks/mumu_dataset_speed.py [--pictures 24] [--size full|tiny] [--shortest-edge 800]
                                            [--device auto|cpu|cuda] [--workers 4] [--picture-size 1024x768]

ComfyUI comes from $COMFYUI_PATH (or the copy the tests use). Prints a table; nothing is asserted.
"""
import argparse
import importlib
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PACK_DIR, PeakRSS, table  # noqa: E402  (the benchmarks' shared helpers)

CAPTIONS = ["a man and his dog on a red sofa", "a woman holding a cup near a window",
            "two children playing with a ball", "a girl riding a horse near a house", "a black cat on a wooden table",
            "a boy with a hat and a bike", "a chef in a kitchen with a bowl", "a couple walking a dog in a park"]


def boot(scratch: Path):
    spec = importlib.util.spec_from_file_location("beyond_clip_bench_host", PACK_DIR / "headless" / "host.py")
    host_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_module)
    host = host_module.Host(output_dir=scratch / "output", temp_dir=scratch / "temp", input_dir=scratch / "input")
    host.add_models_dir(scratch / "models", ("grounding-dino",))
    pack = host.load_pack(scratch / "custom_nodes")
    return host, pack


def module(pack, name):
    return importlib.import_module(f"{pack.__name__}.{name}")


def make_pictures(folder: Path, n: int, size):
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        picture = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(6):
            x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
            box = [x0, y0, x0 + rng.randrange(80, size[0] // 2), y0 + rng.randrange(80, size[1] // 2)]
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        picture.save(folder / f"photo_{i:04d}.jpg", quality=90)
        (folder / f"photo_{i:04d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def cuda_peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_cuda_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=24)
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--shortest-edge", type=int, default=800, help="the detector's input (grounding-dino: 800)")
    parser.add_argument("--picture-size", default="1024x768")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--box-threshold", type=float, default=0.3)
    parser.add_argument("--text-threshold", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back rounds (medians are printed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: 1 on a CPU, where a busy machine "
                                                                 "makes multi-threaded ops wait on each other, else "
                                                                 "torch's default)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    size = tuple(int(v) for v in args.picture_size.split("x"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    scratch = Path(tempfile.mkdtemp(prefix="beyond-clip-dataset-bench-"))
    try:
        _, pack = boot(scratch)
        tiny = module(pack, "headless.tiny_grounding_dino")
        folder = tiny.write_grounding_dino_folder(scratch / "models" / "grounding-dino" / "bench-gd", size=args.size)
        config = json.loads((folder / "processor_config.json").read_text())
        image_config = config.get("image_processor", config)
        longest = round(args.shortest_edge * 1333 / 800)
        image_config["size"] = {"shortest_edge": args.shortest_edge, "longest_edge": longest}
        if "image_processor" in config:
            config["image_processor"] = image_config
        (folder / "processor_config.json").write_text(json.dumps(config))
        handle = module(pack, "loaders.grounding_dino").load_grounding_dino("bench-gd")
        engine, rules = module(pack, "engine.mumu_dataset"), module(pack, "bridges.mumu_dataset")
        make_pictures(scratch / "input" / "photos", args.pictures, size)
        settings = rules.Settings(box_threshold=args.box_threshold, text_threshold=args.text_threshold)
        n = args.pictures

        # warm-up: the model on its device, kernels chosen
        detector = engine.Detector(handle, device=device).load()
        warm_text, _ = detector.text(rules.query_text(CAPTIONS[0]))
        warm_pixels = detector.pixels(Image.new("RGB", size))
        detector.forward(warm_pixels, warm_text)
        seen = tuple(warm_pixels["pixel_values"].shape[-2:])

        files = module(pack, "loaders.mumu_dataset")
        dataset_dir = scratch / "input" / "bench_dataset"

        def build():
            shutil.rmtree(dataset_dir, ignore_errors=True)
            reset_cuda_peak(device)
            with PeakRSS() as mem:
                start = time.perf_counter()
                result = engine.build_dataset(handle, "photos/", "bench_dataset", settings, workers=args.workers,
                                              device=device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - start, mem, cuda_peak(device), result

        def bare(jobs):
            reset_cuda_peak(device)
            with PeakRSS() as mem:
                start = time.perf_counter()
                for pixels, text in jobs:
                    detector.forward(pixels, text)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return time.perf_counter() - start, mem, cuda_peak(device), None

        first = build()
        result = first[3]
        entries = files.read_manifest(dataset_dir)
        crops = sum(1 for e in entries.values() for i in e["images"] if i.get("box"))
        # the same forwards, bare: inputs prepared first (untimed), then only the forward loop is timed
        captions, heads = [], []
        for key in sorted(entries):
            e = entries[key]
            picture = Image.open(scratch / "input" / key).convert("RGB")
            captions.append((detector.pixels(picture), detector.text(rules.query_text(e["caption"]))[0]))
            for image in e["images"]:
                if image.get("person_box"):
                    x0, y0, x1, y1 = image["person_box"]
                    heads.append((detector.pixels(picture.crop((x0, y0, x1, y1))), detector._head[0]))
        assert len(captions) + len(heads) == result.forwards, (len(captions), len(heads), result.forwards)
        # back-to-back rounds (a shared machine's load drifts): builder, bare with the same forwards, captions only
        runs = {"build": [first], "all": [], "captions": []}
        for r in range(args.repeats):
            if r:
                runs["build"].append(build())
            runs["all"].append(bare(captions + heads))
            runs["captions"].append(bare(captions))
        pair_ratios = [a[0] / b[0] for a, b in zip(runs["all"], runs["build"], strict=True)]

        def row(name, key, forwards):
            seconds = statistics.median(r[0] for r in runs[key])
            build_s = statistics.median(r[0] for r in runs["build"])
            peak = max(r[1].peak for r in runs[key])
            gpu = max((r[2] for r in runs[key] if r[2] is not None), default=None)
            return [name, forwards, f"{seconds:.2f}", f"{n / seconds:.2f}", f"{seconds / build_s:.2f}",
                    f"{peak / 2 ** 30:.2f}", "-" if gpu is None else f"{gpu / 2 ** 30:.2f}"]

        print(f"\nGrounding DINO ({args.size}, random weights) on {device}, input {seen[1]}x{seen[0]} px; "
              f"{n} pictures {size[0]}x{size[1]} JPEG; builder workers {args.workers}; torch threads "
              f"{torch.get_num_threads()}; median of {args.repeats} back-to-back rounds")
        print(f"built: {len(entries)} prompts, {crops} crops, {result.forwards} forwards ({len(heads)} head queries)\n")
        table(["run", "forwards", "seconds", "pictures/s", "builder pictures/s / this", "peak RSS GiB", "peak GPU GiB"],
              [row("builder (clean build)", "build", result.forwards),
               row("bare forward, the builder's forwards", "all", len(captions) + len(heads)),
               row("bare forward, captions only", "captions", len(captions))])
        print(f"\nbuilder / bare loop with the same forwards, per round: {[round(r, 2) for r in pair_ratios]}; median "
              f"{statistics.median(pair_ratios):.2f}x (target >= 0.9)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
