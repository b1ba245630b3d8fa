#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need, on a fresh machine. Safe to run again.
#   torch + torchvision: installed together as a matching pair (ComfyUI imports torchvision at start);
#   override with TORCH_PACKAGES="torch==X torchvision==Y".
#   ComfyUI: $COMFYUI_PATH's own requirements when set; otherwise the test extras cover the registry copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_PACKAGES
"${PIP[@]}" -r requirements.txt ".[test]"
if [ -n "${COMFYUI_PATH:-}" ]; then
  # The host's own requirements (its frontend included), less the torch family installed above.
  grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\b' "$COMFYUI_PATH/requirements.txt" > .venv/comfyui-requirements.txt
  "${PIP[@]}" -r .venv/comfyui-requirements.txt
fi
# The frontend test drives Debian's Chromium.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: install chromium and chromium-driver (Debian packages) for the frontend test" >&2
  fi
fi
.venv/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
