#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv if needed, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${MRL_VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
