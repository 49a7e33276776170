"""scripts/gpu_check.sh runs end to end here: without a GPU it says so, and with --cpu-ok checks the CPU path
and names every GPU path it could not run."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from mrl.runtime.backends.gpu import detect_gpu

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SCRIPT = SCRIPTS / "gpu_check.sh"
GPU_PATHS = (
    "onnxruntime CUDA provider",
    "onnxruntime TensorRT provider",
    "torch CUDA fp32/fp16/bf16",
    "cuda-python device memory",
    "TensorRT engines",
    "tensorrt backend",
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_the_cpu_and_prints_the_table_last(tiny_st_dir, tmp_path):
    done = _run("--cpu-ok", "--model", str(tiny_st_dir), "--out", str(tmp_path / "check"), "--bench-timeout", "300")
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "| check | result | detail |", done.stdout + done.stderr
    assert lines[-1].startswith("| verdict | ok |"), done.stdout + done.stderr[-2000:]
    assert done.returncode == 0
    checks = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in lines[2:]}
    assert checks["export"] == "pass"
    torch_rows = [name for name in checks if name.startswith(("torch cpu fp32 ", "torch CUDA fp32 "))]
    assert torch_rows and all(checks[name] == "pass" for name in torch_rows)
    verified = [name for name in checks if name.startswith("mrl-export verify --backend ")]
    assert verified and all(checks[name] == "pass" for name in verified), verified
    if detect_gpu(0)[0] is None:
        assert {"mrl-export verify --backend onnxruntime-cpu", "mrl-export verify --backend torch"} <= set(verified)
    (bench,) = [name for name in checks if name.startswith("mrl-bench engine --baseline")]
    assert checks[bench] == "pass"
    if detect_gpu(0)[0] is None:
        assert "no GPU found: ran on the CPU (--cpu-ok); not run: " in lines[-1]
        for path in GPU_PATHS:  # every GPU path is listed, plainly, as not run
            assert checks[path] == "not run", path
            assert path in lines[-1]
    assert (tmp_path / "check" / "bench-engine.json").is_file()


def test_gpu_check_without_a_gpu_stops_with_exit_2():
    if detect_gpu(0)[0] is not None:
        pytest.skip("a GPU is here")
    done = _run()
    assert done.returncode == 2
    assert done.stdout.strip().splitlines()[-1].startswith("| verdict | no GPU | no GPU found; pass --cpu-ok")


def test_the_fallback_model_is_wide_enough_for_several_profiles(tmp_path):
    from mrl.export.source import load_source

    gpu_check = _gpu_check_module()
    source = load_source(str(gpu_check.tiny_model(tmp_path)))
    assert source.full_dims == 128
    assert gpu_check.demo_dims(source.full_dims) == (32, 64, 128)
    assert gpu_check.demo_dims(384) == (32, 64, 384)  # MiniLM, where it is installed


def test_the_environment_report_gives_up_on_a_hanging_nvidia_smi(monkeypatch, tmp_path):
    import time

    import mrl.runtime.backends.gpu as gpu

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nsleep 120\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(gpu, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    gpu.detect_gpu.cache_clear()
    start = time.monotonic()
    try:
        rows, facts = _gpu_check_module().environment()
    finally:
        gpu.detect_gpu.cache_clear()
    assert time.monotonic() - start < 90  # the fake would hold it for 120 s per call without the timeout
    assert rows[0][:2] == ("GPU", "none found") and facts["gpu"] is None


def test_verify_rows_say_what_failed(tiny_artifact, tmp_path):
    """The rows a GPU run gets from `mrl-export verify`, here where the CPU disagrees or a backend is missing."""
    from acceptance_helpers import copy_artifact, disagree

    gpu_check = _gpu_check_module()
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    disagree(artifact)
    name, result, detail = gpu_check.verify_row(artifact, "onnxruntime-cpu")
    assert (name, result) == ("mrl-export verify --backend onnxruntime-cpu", "FAIL")
    assert "FAIL d32-fp32: mean cosine 0.9" in detail and "CPUExecutionProvider" in detail
    if detect_gpu(0)[0] is None:
        name, result, detail = gpu_check.verify_row(tiny_artifact, "onnxruntime-cuda")
        assert result == "FAIL" and "cannot run here" in detail, detail
    passed = gpu_check.verify_row(tiny_artifact, "onnxruntime-cpu")
    assert passed[1:] == ("pass", "3 profiles hold their export's thresholds against the source model")
