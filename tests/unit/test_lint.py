"""The code stays as ruff (configured in pyproject.toml) reads it: one style, no unused imports or names, no
closures over loop variables that change under them."""
import subprocess
import sys

import pytest
from conftest import PACK_DIR


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is in tests/requirements.txt (scripts/setup_env.sh --test)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=PACK_DIR,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
