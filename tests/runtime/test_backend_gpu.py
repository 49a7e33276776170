"""GPU probing never raises: broken CUDA bindings and a hanging nvidia-smi become "no GPU, and why"."""

from __future__ import annotations

import importlib.abc
import sys
import time
from types import SimpleNamespace

import pytest

import mrl.runtime.backends.gpu as gpu
from mrl.runtime.backends import probe_machine
from mrl.runtime.errors import BackendUnavailableError


@pytest.fixture(autouse=True)
def fresh_probe():
    gpu.detect_gpu.cache_clear()
    yield
    gpu.detect_gpu.cache_clear()


class _Error:
    def __init__(self, name):
        self.name = name

    def __eq__(self, other):
        return isinstance(other, _Error) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


def _bindings(**calls):
    """cuda.bindings.runtime as far as current_gpu uses it, with `calls` replacing its functions."""
    return SimpleNamespace(cudaError_t=SimpleNamespace(cudaSuccess=_Error("cudaSuccess")), **calls)


def test_a_runtime_error_from_the_bindings_means_no_gpu(monkeypatch):
    def no_driver():
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    monkeypatch.setattr(gpu, "cuda_runtime", lambda: _bindings(cudaGetDeviceCount=no_driver))
    monkeypatch.setattr(gpu, "nvidia_smi_gpus", list)
    with pytest.raises(BackendUnavailableError, match=r"no usable CUDA GPU here \(RuntimeError: Failed to dlopen"):
        gpu.current_gpu(0)
    found, reason = gpu.detect_gpu(0)
    assert found is None and "libcuda.so.1" in reason


def test_a_cuda_error_code_means_no_gpu(monkeypatch):
    insufficient = _Error("cudaErrorInsufficientDriver")
    monkeypatch.setattr(gpu, "cuda_runtime", lambda: _bindings(cudaGetDeviceCount=lambda: (insufficient, 0)))
    monkeypatch.setattr(gpu, "nvidia_smi_gpus", list)
    assert "cudaErrorInsufficientDriver" in gpu.detect_gpu(0)[1]


class _BrokenCuda(importlib.abc.MetaPathFinder):
    """Makes `import cuda...` fail as an installed wheel without its driver library can."""

    def find_spec(self, name, path=None, target=None):
        if name == "cuda" or name.startswith("cuda."):
            raise OSError("libcuda.so.1: cannot open shared object file")
        return None


def test_bindings_that_fail_to_import_mean_no_gpu_and_auto_still_probes(monkeypatch):
    for name in [m for m in sys.modules if m == "cuda" or m.startswith("cuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenCuda(), *sys.meta_path])
    monkeypatch.setattr(gpu, "nvidia_smi_gpus", list)
    with pytest.raises(BackendUnavailableError, match=r"do not load: OSError: libcuda\.so\.1"):
        gpu.cuda_runtime()
    probe = probe_machine()  # what backend="auto" runs: it must come back, not raise
    assert probe.gpu is None and "libcuda.so.1" in probe.gpu_note


def test_a_hanging_nvidia_smi_is_given_up_on(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(gpu, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    start = time.monotonic()
    assert gpu.run_nvidia_smi("--query-gpu=name", "--format=csv") is None
    assert gpu.nvidia_smi_gpus() == []
    assert time.monotonic() - start < 10


def test_nvidia_smi_output_is_read_when_it_answers(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert gpu.nvidia_smi_gpus() == [gpu.GpuInfo(name="NVIDIA H200", compute_capability="9.0")]


def test_install_hints_follow_the_installed_distribution(monkeypatch):
    installed = {"mrl-toolkit": "0.1.0"}

    def version(dist):
        if dist not in installed:
            raise gpu.importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(gpu.importlib.metadata, "version", version)
    assert gpu.install_hint("tensorrt") == "pip install 'mrl-toolkit[tensorrt]'"
    installed["mrl-toolkit-gpu"] = "0.1.0"  # asking for mrl-toolkit[...] here would pull the CPU onnxruntime
    assert gpu.install_hint("tensorrt") == "pip install 'mrl-toolkit-gpu[tensorrt]'"
