#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh: what the demo needs, no test extras) and run the shipped
# Beyond CLIP SD1.5 workflow end to end in a real ComfyUI, writing a PNG into out/. Without model files it
# uses small built-in random models, and says so. Extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" -m headless run workflows/beyond_clip_sd15.json --output out "$@"
