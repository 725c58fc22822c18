#!/usr/bin/env bash
# Install everything fedmerge needs into .venv (idempotent; fast when done).
#   - Debian's dataset-fashion-mnist (when running as root with apt-get)
#   - PyTorch 2.14.1 / torchvision 0.29.1, then fedmerge with its dev extras
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing dataset-fashion-mnist (Debian)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "bootstrap: Fashion-MNIST not found; install Debian's dataset-fashion-mnist" \
         "or set FEDMERGE_FASHION_MNIST to a directory with its IDX files" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi

stamp=.venv/.fedmerge-installed
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python packages into .venv (first time: several minutes)"
  # torch first, pinned, so that nothing pulls another build of it.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
