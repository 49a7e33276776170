"""scripts/gpu_check.sh runs end to end here: without a GPU it says so, and with --cpu-ok checks the CPU path."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mrl.runtime.backends.gpu import detect_gpu

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_gpu_check_runs_on_the_cpu_and_prints_the_table_last(tiny_st_dir, tmp_path):
    done = _run("--cpu-ok", "--model", str(tiny_st_dir), "--out", str(tmp_path / "check"), "--bench-timeout", "300")
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "| check | result | detail |", done.stdout + done.stderr
    assert lines[-1].startswith("| verdict | ok |"), done.stdout + done.stderr[-2000:]
    assert done.returncode == 0
    checks = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in lines[2:]}
    assert checks["export"] == "ok" and checks["bench"] == "ok"
    assert any(name.startswith("parity torch") and result == "pass" for name, result in checks.items())
    if detect_gpu(0)[0] is None:
        assert "no GPU found: ran on the CPU (--cpu-ok)" in lines[-1]
        assert checks["engines"] == "skipped"
    assert (tmp_path / "check" / "bench-engine.json").is_file()


def test_gpu_check_without_a_gpu_stops_with_exit_2():
    if detect_gpu(0)[0] is not None:
        import pytest

        pytest.skip("a GPU is here")
    done = _run()
    assert done.returncode == 2
    assert done.stdout.strip().splitlines()[-1].startswith("| verdict | no GPU | no GPU found; pass --cpu-ok")
