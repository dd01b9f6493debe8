#!/usr/bin/env bash
# Set up nin on this machine: Fashion-MNIST, PyTorch, the package (and its test tools).
#
#   bash scripts/install.sh          # nin (with nin serve's web stack), torch, Fashion-MNIST
#   bash scripts/install.sh --test   # the same, plus the test tools: pytest, Playwright and, on
#                                    # Debian as root, Debian's chromium for the browser tests
#
# torch: an installed torch is kept. Otherwise torch==2.13.0 is installed; set
# TORCH_INDEX to take it from another index, e.g. PyTorch's CPU-only builds:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
# Fashion-MNIST: on Debian/Ubuntu as root, the package dataset-fashion-mnist;
# elsewhere nin downloads the files on first use (or pass --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="[serve]"  # nin serve's extra: FastAPI, uvicorn, python-multipart, prometheus_client (small, no torch)
case "${1:-}" in
  "") ;;
  --test) extras="[test]" ;;
  *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
   && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "== Fashion-MNIST (Debian package dataset-fashion-mnist)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || echo "   could not install it; nin will download Fashion-MNIST on first use"
fi

# The browser tests (tests/test_serve_page.py) drive /usr/bin/chromium through Playwright; no browser is
# downloaded (no `playwright install`).
if [ "$extras" = "[test]" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== Chromium (Debian package chromium, for the browser tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "   could not install it; the browser tests will be skipped (in CI: fail)"
  else
    echo "== no /usr/bin/chromium: the browser tests will be skipped (as root on Debian: apt-get install chromium)"
  fi
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== PyTorch"
  if [ -n "${TORCH_INDEX:-}" ]; then
    "$PY" -m pip install -q --root-user-action=ignore torch --index-url "$TORCH_INDEX"
  else
    "$PY" -m pip install -q --root-user-action=ignore torch==2.13.0
  fi
fi

echo "== nin${extras}"
"$PY" -m pip install -q --root-user-action=ignore --disable-pip-version-check -e ".${extras}"
if command -v pyenv >/dev/null; then pyenv rehash; fi
"$PY" -c "import torch, nin; print(f'nin {nin.__version__}, torch {torch.__version__}, cuda: {torch.cuda.is_available()}')"
if [ "$extras" = "[test]" ]; then
  "$PY" -c "import pytest, xdist, playwright.sync_api, httpx" \
    || { echo "install.sh: the test tools (pytest, pytest-xdist, playwright, httpx) did not install" >&2; exit 1; }
fi
