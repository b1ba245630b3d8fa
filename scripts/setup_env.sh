#!/usr/bin/env bash
# Create the virtual environment for the demo, or with --test for the test suite, on a fresh machine. Safe to
# run again (then it only checks).
#   - torch and torchvision, installed together as a matching pair (ComfyUI imports torchvision at start);
#     override with TORCH_PACKAGES="torch==X torchvision==Y";
#   - the pack's requirements.txt and the requirements.txt of the ComfyUI it boots, less the torch family:
#     $COMFYUI_PATH, else the ComfyUI this pack is installed in, else the March 2024 copy that
#     scripts/get_comfyui.py fetches once (the runner itself never downloads);
#   - with --test: tests/requirements.txt (pytest, selenium, peft, bitsandbytes, accelerate) and Debian's
#     Chromium for the frontend test.
# VENV names the environment (default .venv). pip's own PIP_CONSTRAINT pins other releases (CI's oldest set).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PACKAGES=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# --no-compile: pip would byte-compile every file of torch (a third of the install's time); Python compiles the
# modules it imports, once, when it first imports them.
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_PACKAGES
COMFYUI=$("$VENV/bin/python" scripts/get_comfyui.py)
# The host's own requirements (its frontend included), less the torch family installed above.
grep -vE '^\s*(#|$)|^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#]|$)' "$COMFYUI/requirements.txt" \
  > "$VENV/comfyui-requirements.txt"
REQUIREMENTS=(-r requirements.txt -r "$VENV/comfyui-requirements.txt")
if [ "$TEST" = 1 ]; then
  REQUIREMENTS+=(-r tests/requirements.txt)
fi
"${PIP[@]}" "${REQUIREMENTS[@]}"
if [ "$TEST" = 1 ]; then
  # The frontend test drives Debian's Chromium.
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "note: install chromium and chromium-driver (Debian packages) for the frontend test" >&2
    fi
  fi
fi
"$VENV/bin/python" -c "import torch, torchvision, transformers
print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
echo "ComfyUI: $COMFYUI"
