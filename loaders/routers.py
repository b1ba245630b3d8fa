"""Router files: naive Bayes chat/draw classifiers stored as JSON (never a pickle) in models/bridges."""
import csv
import json
import os
from pathlib import Path

from ..bridges.router import NaiveBayesRouter
from .errors import LoadError

BUILTIN = "builtin (trained on the pack's instructions)"
BUILTIN_DATA = Path(__file__).resolve().parent.parent / "data" / "router_instructions.tsv"
EXTENSION = ".router.json"


def read_labelled_tsv(path):
    """(texts, labels) from a `label<TAB>text` file with that header line."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except OSError as e:
        raise LoadError(f"{path} could not be read ({e}).") from None
    if not rows or set(rows[0]) != {"label", "text"}:
        raise LoadError(f"{path} must be a tab-separated file with the header 'label<TAB>text'.")
    return [r["text"] for r in rows], [r["label"] for r in rows]


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
        return NaiveBayesRouter.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise LoadError(f"{path}: no such router file; put it in models/bridges/.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not a Beyond CLIP router file ({e}). Train one with the router "
                        f"training node or use the built-in router.") from None


def builtin_router() -> NaiveBayesRouter:
    return NaiveBayesRouter().fit(*read_labelled_tsv(BUILTIN_DATA))
