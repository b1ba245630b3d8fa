"""The fast tier: pure-torch tests of bridges/, which imports nothing of ComfyUI, so these never boot a host.
`pytest tests/unit` runs them alone in seconds. bridges/ is loaded by path as its own package (the repo root is
never put on sys.path: ComfyUI has a top-level module named `nodes`)."""
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
PACKAGE = "beyond_clip_bridges"


def bridge_module(name: str):
    """bridges.<name> (e.g. 'router', 'training.trainer'), imported from this checkout without ComfyUI."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, PACK_DIR / "bridges" / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR / "bridges")])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="session")
def bridges():
    return bridge_module
