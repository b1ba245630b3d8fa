#!/usr/bin/env bash
# Set up the environment with the test extras (scripts/setup_env.sh --test) and run the test suite inside a real
# ComfyUI: $COMFYUI_PATH, else the ComfyUI this pack is installed in, else the March 2024 registry copy.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec "${VENV:-.venv}/bin/python" -m pytest tests "$@"
