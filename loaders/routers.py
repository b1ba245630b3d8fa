"""Router files: naive Bayes chat/draw classifiers stored as JSON (never a pickle) in models/bridges."""
import json
import os
from pathlib import Path

from ..bridges.router import NaiveBayesRouter, tokenize
from .errors import InputError, LoadError

BUILTIN = "builtin (trained on the pack's instructions)"
BUILTIN_DATA = Path(__file__).resolve().parent.parent / "data" / "router_instructions.tsv"
EXTENSION = ".router.json"


ROUTER_LABELS = ("chat", "draw")


def read_labelled_tsv(path, labels=ROUTER_LABELS):
    """(texts, labels) from a tab-separated file whose first line is the header 'label<TAB>text' (the two columns
    in either order); blank lines and lines starting with '#' are skipped. `labels`: the labels a row may have
    (None: any). Every mistake is an InputError naming the file and line: text that is not UTF-8, a row without
    its text or label, a tab too many, a label outside `labels` (or the columns swapped), no words at all."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line} is not UTF-8). Save "
                         f"it as UTF-8 (most editors offer it under 'Save as' / 'Encoding').") from None
    rows = [(i, line) for i, line in enumerate(content.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path} is empty: write the header 'label<TAB>text', then one labelled example per line.")
    header_line, header = rows[0][0], [h.strip().lower() for h in rows[0][1].split("\t")]
    if sorted(header) != ["label", "text"]:
        raise InputError(f"{path}, line {header_line}: the first line must be the header 'label<TAB>text' (two "
                         f"names separated by a tab); found {rows[0][1][:60]!r}.")
    label_col = header.index("label")
    texts, found = [], []
    allowed = set(labels) if labels else None
    for number, line in rows[1:]:
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 2:
            what = "no tab" if len(fields) == 1 else f"{len(fields) - 1} tabs"
            raise InputError(f"{path}, line {number}: {what}; every example is 'label<TAB>text' on one line (a tab "
                             f"inside the text is not allowed). Found {line[:60]!r}.")
        label, text = fields[label_col], fields[1 - label_col]
        if not label or not text:
            raise InputError(f"{path}, line {number}: the {'label' if not label else 'text'} is empty; every "
                             f"example needs both. Found {line[:60]!r}.")
        if allowed is not None and label not in allowed:
            if text in allowed:
                raise InputError(f"{path}, line {number}: the label is {label[:40]!r} and the text {text!r}: the "
                                 f"columns look swapped. The header says the {header[0]} comes first.")
            raise InputError(f"{path}, line {number}: the label {label[:40]!r} is not one of "
                             f"{', '.join(sorted(allowed))}.")
        texts.append(text)
        found.append(label)
    if not texts:
        raise InputError(f"{path} has a header but no examples: add one 'label<TAB>text' line per example.")
    if not any(tokenize(t, bigrams=False) for t in texts):
        raise InputError(f"{path}: none of its {len(texts)} texts has a word (letters or digits) to learn from; "
                         f"write the instructions in the text column.")
    return texts, found


def save_router(path, router: NaiveBayesRouter):
    """Written atomically; an existing file that is not a router file is never replaced."""
    path = Path(path)
    if path.exists():
        try:
            load_router(path)
        except LoadError:
            raise LoadError(f"{path} exists and is not a router file written by this pack; choose another output "
                            f"name (the pack never replaces other files).") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(router.to_dict()))
    os.replace(tmp, path)


def load_router(path) -> NaiveBayesRouter:
    path = Path(path)
    try:
        router = NaiveBayesRouter.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise LoadError(f"{path}: no such router file; put it in models/bridges/.") from None
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, absurd nesting, not a router's data
        raise LoadError(f"{path} is not a Beyond CLIP router file ({str(e)[:200]}). Train one with the router "
                        f"training node or use the built-in router.") from None
    if sorted(router.labels) != sorted(ROUTER_LABELS):
        raise LoadError(f"{path} routes to {router.labels}, not to {list(ROUTER_LABELS)}: it was not trained for the "
                        f"chat/draw router. Train one with the router training node or use the built-in router.")
    return router


def builtin_router() -> NaiveBayesRouter:
    return NaiveBayesRouter().fit(*read_labelled_tsv(BUILTIN_DATA, ROUTER_LABELS))
