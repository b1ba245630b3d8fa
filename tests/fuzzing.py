"""A small seeded fuzzer for the parsers of user text and files: every case is made from its own seed (so a failure
is reproduced by its number), cases run until the parser's case count or time budget is reached, and the only
exceptions allowed out are the pack's own (PackError subclasses: LoadError, InputError and theirs).

Usage: `check(fuzz(name, parser, make_case, allowed=(PackError,)))` fails on any other exception and prints the
figures (cases, accepted, refused) otherwise.
"""
import json
import random
import struct
import time
import traceback
from dataclasses import dataclass, field

SEED = 20240519  # fixed: CI runs the same cases every time
BUDGET_S = 1.0  # per parser: the whole fuzz suite stays within seconds
MIN_CASES = 150  # run at least this many whatever the budget (slow parsers)
MAX_CASES = 3000

# Characters users and other tools put into text: separators, brackets, other scripts' digits and spaces, control
# characters, a lone surrogate (what JSON's "\ud800" decodes to), the byte-order mark.
PALETTE = (list("abcxyz019 ,;.:-_#") + ["\t", "\n", "\r", "\r\n", "<", ">", "<>", "[", "]", "(", ")", "<image>",
           "<man>", "\u3000", "\uff11", "\u0661", "\u00b2", "\u2167", "\u00bd", "\u00e9", "\u4e2d", "\U0001f600",
           "\x00", "\x1c", "\u2028", "\ufeff", "\ud800", "'", '"', "\\", "9" * 30, str(2 ** 63), "-1", "nan", "1e309"])


@dataclass
class Stats:
    name: str
    cases: int = 0
    accepted: int = 0
    refused: int = 0  # by a pack error
    failures: list = field(default_factory=list)  # (case number, input, traceback)
    seconds: float = 0.0


RESULTS = []


def fuzz(name, parser, make_case, allowed, *, budget_s=BUDGET_S, min_cases=MIN_CASES, max_cases=MAX_CASES) -> Stats:
    """Run parser(make_case(rng)) for cases 0, 1, 2, ... (rng seeded by SEED, name and the case number)."""
    stats = Stats(name)
    start = time.perf_counter()
    for number in range(max_cases):
        if number >= min_cases and time.perf_counter() - start > budget_s:
            break
        rng = random.Random(f"{SEED}:{name}:{number}")
        case = make_case(rng)
        stats.cases += 1
        try:
            parser(case)
            stats.accepted += 1
        except allowed:
            stats.refused += 1
        except Exception:  # anything else escaped the parser: that is what the fuzzer looks for
            stats.failures.append((number, _shown(case), traceback.format_exc(limit=-3)))
    stats.seconds = time.perf_counter() - start
    RESULTS.append(stats)
    return stats


def check(stats: Stats):
    """Fail with the first failures (case number, input, the last frames of the traceback)."""
    if stats.failures:
        lines = [f"{stats.name}: {len(stats.failures)} of {stats.cases} cases raised something other than the pack's "
                 f"own errors"]
        for number, case, tb in stats.failures[:3]:
            lines.append(f"--- case {number}: {case}\n{tb}")
        raise AssertionError("\n".join(lines))
    print(f"fuzz {stats.name}: {stats.cases} cases ({stats.accepted} accepted, {stats.refused} refused by the pack's "
          f"errors) in {stats.seconds:.2f} s")


def _shown(case):
    text = repr(case)
    return text if len(text) <= 300 else text[:300] + "..."


# ---- text ----------------------------------------------------------------------------------------------------

def mutate_text(rng: random.Random, text: str, rounds: int = None) -> str:
    """A few random edits of `text`: insertions from PALETTE, deletions, duplicated or moved spans, a cut."""
    for _ in range(rounds if rounds is not None else rng.randint(1, 6)):
        op = rng.random()
        i = rng.randint(0, len(text))
        if op < 0.45:
            text = text[:i] + rng.choice(PALETTE) + text[i:]
        elif op < 0.65 and text:
            j = rng.randint(i, min(len(text), i + rng.randint(1, 12)))
            text = text[:i] + text[j:]
        elif op < 0.8 and text:
            j = rng.randint(i, min(len(text), i + rng.randint(1, 30)))
            text = text[:i] + text[i:j] * rng.randint(2, 4) + text[i:]
        elif op < 0.9:
            text = text[:i]
        else:
            text = "".join(rng.choice(PALETTE) for _ in range(rng.randint(0, 40)))
    return text


def to_bytes(rng: random.Random, text: str) -> bytes:
    """Text as a file might hold it: UTF-8 mostly, sometimes another encoding or a stray byte."""
    choice = rng.random()
    if choice < 0.7:
        return text.encode("utf-8", "surrogatepass")
    if choice < 0.85:
        return text.encode("latin-1", "replace")
    if choice < 0.95:
        return text.encode("utf-16", "surrogatepass")
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    if data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


# ---- JSON ----------------------------------------------------------------------------------------------------

def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(11 if depth < 3 else 8)
    return [
        lambda: rng.choice([0, 1, -1, 2, 7, 2 ** 31, 2 ** 63, 10 ** 12, -(10 ** 9)]),
        lambda: rng.choice([0.5, -2.5, 1e300, float("nan"), float("inf"), -float("inf")]),
        lambda: rng.choice(["", "x", "sd1", "sdxl", "gelu", "\u4e2d", "<image>", "a" * 200]),
        lambda: rng.choice([True, False]),
        lambda: None,
        lambda: rng.choice([[], {}]),
        lambda: [1, 2],
        lambda: "9" * rng.randint(1, 40),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        lambda: {rng.choice(["a", "b", "", "1"]): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))},
        lambda: _nested(rng.randint(10, 5000)),
    ][kind]()


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def mutate_json(rng: random.Random, value, rounds: int = None):
    """A copy of a JSON value with a few entries replaced, removed or added (anywhere in the tree)."""
    value = json.loads(json.dumps(value))
    for _ in range(rounds if rounds is not None else rng.randint(1, 3)):
        value = _mutate_at(rng, value)
    return value


def _mutate_at(rng, value):
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        op = rng.random()
        if op < 0.6:
            value[key] = _mutate_at(rng, value[key])
        elif op < 0.8:
            del value[key]
        else:
            value[rng.choice(["extra", key + "_", ""])] = random_value(rng)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        if rng.random() < 0.7:
            value[i] = _mutate_at(rng, value[i])
        else:
            del value[i]
        return value
    return random_value(rng)


def json_text(rng: random.Random, value) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (ValueError, RecursionError):
        text = "[" * 3000
    return mutate_text(rng, text) if rng.random() < 0.2 else text


# ---- bytes of files --------------------------------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.4 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op < 0.6:
            data = data[:rng.randint(0, len(data))]
        elif op < 0.8:
            i = rng.randint(0, len(data))
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            i = rng.randint(0, len(data))
            j = rng.randint(i, len(data))
            data[i:j] = b""
    return bytes(data)


def safetensors_parts(data: bytes):
    """(header dict, tensor bytes) of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def safetensors_bytes(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(text)) + text + payload


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    """A mutated safetensors file: its metadata config, its tensors' dtypes, shapes or offsets, or its bytes."""
    header, payload = safetensors_parts(data)
    op = rng.random()
    meta = header.get("__metadata__", {})
    if op < 0.4 and "config" in meta:
        config = mutate_json(rng, json.loads(meta["config"]))
        meta["config"] = json_text(rng, config)
    elif op < 0.5 and meta:
        key = rng.choice(sorted(meta))
        meta[key] = rng.choice(["", "1", "2", "beyond_clip.bridge", "gill", "mumu_connector", "repadapter", "{"])
    elif op < 0.75:
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        info = header[name]
        field_name = rng.choice(["dtype", "shape", "data_offsets"])
        if field_name == "dtype":
            info["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9"])
        elif field_name == "shape":
            info["shape"] = rng.choice([[], [0], [1], [2 ** 40], [-1], info["shape"][::-1], info["shape"] + [1]])
        else:
            start, end = info["data_offsets"]
            info["data_offsets"] = rng.choice([[end, start], [start, end + 4], [0, 2 ** 62], [start, start]])
    else:
        return mutate_bytes(rng, data)
    return safetensors_bytes(header, payload)

