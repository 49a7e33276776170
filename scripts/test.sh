#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv if needed, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Triton and tritonclient in their own environment (.venv-triton): the Triton tests run against a real server.
bash scripts/setup_triton.sh
export MRL_REQUIRE_TRITON=1  # set up just now: a Triton test that cannot find it fails instead of skipping
. "${MRL_VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
