"""What the benchmark scripts share: a booted in-process ComfyUI with the pack loaded, a timing helper, a
memory sampler and a table printer. Run the scripts from the pack folder: python benchmarks/<name>.py"""
import atexit
import importlib
import importlib.util
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def boot(scratch=None):
    """(host, pack, scratch dir) with models/{LLM,bridges} registered under the scratch dir."""
    spec = importlib.util.spec_from_file_location("beyond_clip_bench_host", PACK_DIR / "headless" / "host.py")
    host_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_module)
    if scratch is None:  # made here: removed when the script ends, whichever way (models of a GiB or more)
        scratch = Path(tempfile.mkdtemp(prefix="beyond-clip-bench-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    scratch = Path(scratch)
    host = host_module.Host(output_dir=scratch / "output", temp_dir=scratch / "temp")
    host.add_models_dir(scratch / "models", ("LLM", "bridges", "checkpoints"))
    host.models_dir = scratch / "models"
    pack = host.load_pack(scratch / "custom_nodes")
    tiny = module(pack, "headless.tiny_models")
    host.register_nodes(tiny.NODE_CLASS_MAPPINGS)
    return host, pack, scratch


def module(pack, name):
    return importlib.import_module(f"{pack.__name__}.{name}")


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_times(a, b, repeats, warmup=2):
    """Times of a and b run back to back, `repeats` pairs: on a shared machine the load drifts within seconds, and
    the median of per-pair ratios cancels what hits both sides of a pair alike."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times_a, times_b


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every millisecond while the block runs."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.start


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
