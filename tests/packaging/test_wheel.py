"""The distribution: a wheel built from this checkout holds the `mrl` package and imports from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("mrl_toolkit-*.whl")
    return path


def test_wheel_maps_the_root_folders_into_mrl(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "mrl/__init__.py",
        "mrl/runtime/embedder.py",
        "mrl/runtime/backends/onnxruntime.py",
        "mrl/export/cli.py",
        "mrl/export/data/validation.txt",
        "mrl/serving/__init__.py",
        "mrl/proto/__init__.py",
        "mrl/proto/mrl/v1/embedder.proto",
        "mrl/proto/mrl/v1/embedder_pb2.py",
        "mrl/proto/mrl/v1/embedder_pb2_grpc.py",
        "mrl/bench/__init__.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("tests/", "runtime/", "export/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("mrl-export = mrl.export.cli:main", "mrl-serve", "mrl-bench"):
        assert script in text


def test_package_imports_from_the_wheel(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import mrl, mrl.runtime, mrl.serving.client, mrl.export.parity as p; "
        "print(mrl.runtime.__file__); print(len(p.validation_texts()))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    where, count = done.stdout.split()
    assert where.startswith(str(tmp_path / "site")) and int(count) > 10
