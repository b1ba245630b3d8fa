#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the test suite inside a real ComfyUI ($COMFYUI_PATH, else the
# registry copy). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests "$@"
