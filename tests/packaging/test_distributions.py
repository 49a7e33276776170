"""mrl-toolkit and mrl-toolkit-gpu: each pulls exactly one ONNX Runtime wheel, whatever extras are asked for.

The wheels are built from this checkout by scripts/build_dist.py and their dependencies resolved
for real by pip (`--dry-run --report`, against the package index), not read back from pyproject.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
RUNTIMES = {"mrl-toolkit": "onnxruntime", "mrl-toolkit-gpu": "onnxruntime-gpu"}
# Network failures are a reason to skip (no index here); anything else pip says is a failure.
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dists")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_dist.py"), "cpu", "gpu", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    found = {_metadata(w)["Name"]: w for w in out.glob("*.whl")}
    assert set(found) == set(RUNTIMES), found
    return found


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def _extras(wheel: Path) -> list[str]:
    return _metadata(wheel).get_all("Provides-Extra") or []


def _resolve(*requirements: str, no_deps: bool = False) -> list[dict]:
    """What pip would install for `requirements` into an empty environment: its report's `install` list."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", "-"]
    done = subprocess.run(
        [*command, *(["--no-deps"] if no_deps else []), *requirements], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0 and any(marker in done.stderr for marker in OFFLINE):
        pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["install"]


def _names(install: list[dict]) -> set[str]:
    return {i["metadata"]["name"].lower().replace("_", "-") for i in install}


def test_gpu_distribution_differs_only_in_its_name_and_onnxruntime(wheels):
    cpu, gpu = (_metadata(wheels[name]) for name in ("mrl-toolkit", "mrl-toolkit-gpu"))
    cpu_reqs = [Requirement(r) for r in cpu.get_all("Requires-Dist")]
    gpu_reqs = [Requirement(r) for r in gpu.get_all("Requires-Dist")]
    assert [str(r) for r in cpu_reqs if r.name != "onnxruntime"] == [
        str(r) for r in gpu_reqs if r.name != "onnxruntime-gpu"
    ]
    (runtime,) = [r for r in gpu_reqs if r.name.startswith("onnxruntime")]
    assert runtime.name == "onnxruntime-gpu" and runtime.extras == {"cuda", "cudnn"}
    assert not any(r.name == "onnxruntime-gpu" for r in cpu_reqs)
    assert "gpu" not in _extras(wheels["mrl-toolkit"])  # the old extra that installed both wheels is gone


@pytest.mark.slow
@pytest.mark.parametrize("dist", sorted(RUNTIMES))
def test_no_install_of_a_distribution_pulls_both_onnxruntime_wheels(wheels, dist):
    wheel = wheels[dist]
    extras = _extras(wheel)
    assert {"export", "bench", "dev", "tensorrt"} <= set(extras)
    # TensorRT's own wheels come from NVIDIA's index, which pip reaches only through tensorrt-cu13's
    # build step; that extra is resolved one level deep below, every other one for real, together.
    # Together: whatever any subset pulls in, the union of them does too.
    others = ",".join(e for e in extras if e != "tensorrt")
    names = _names(_resolve(f"{wheel}[{others}]"))
    assert RUNTIMES[dist] in names
    assert {"onnxruntime", "onnxruntime-gpu"} - {RUNTIMES[dist]} & names == set()
    tensorrt = [r for r in _metadata(wheel).get_all("Requires-Dist") if 'extra == "tensorrt"' in r]
    direct = _resolve(*(str(Requirement(r)).split(";")[0] for r in tensorrt), no_deps=True)
    assert _names(direct) == {"tensorrt-cu13", "cuda-bindings"}
    below = [Requirement(r).name for i in direct for r in i["metadata"].get("requires_dist", [])]
    assert below and not any(name.startswith("onnxruntime") for name in below), below
