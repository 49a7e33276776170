#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need. Idempotent: reruns only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MRL_VENV:-.venv}
stamp="$VENV/.mrl-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "setting up $VENV (about 2 minutes on a fresh machine)" >&2
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned: anything that admits a newer torch, installed before it, pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# setuptools says "Editable installation" for every package-dir layout like ours: information only.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[export,bench,dev]"
touch "$stamp"
