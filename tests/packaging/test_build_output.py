"""Building the distribution says nothing alarming, and ships the Triton model files `mrl-export triton` copies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_builds_without_setuptools_warnings_and_ships_triton_models(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "is absent from the `packages` configuration" not in output
    assert "Package would be ignored" not in output
    (wheel,) = tmp_path.glob("mrl_toolkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tokenize_model.py", "encode_model.py"):
        assert f"mrl/export/triton_models/{name}" in names
    assert "mrl/export/data/validation.txt" in names
