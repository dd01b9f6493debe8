#!/usr/bin/env bash
# Set up nin on this machine: Fashion-MNIST, PyTorch, the package (and its test tools).
#
#   bash scripts/install.sh          # nin, torch, Fashion-MNIST
#   bash scripts/install.sh --test   # the same, plus pytest
#
# torch: an installed torch is kept. Otherwise torch==2.13.0 is installed; set
# TORCH_INDEX to take it from another index, e.g. PyTorch's CPU-only builds:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
# Fashion-MNIST: on Debian/Ubuntu as root, the package dataset-fashion-mnist;
# elsewhere nin downloads the files on first use (or pass --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
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
