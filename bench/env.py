"""The environment a benchmark ran in: CPU, GPU, driver, CUDA, library versions, the artifact's hash."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import mrl
from mrl.runtime.backends.gpu import run_nvidia_smi
from mrl.runtime.manifest import MANIFEST_NAME, sha256_file

# Distributions whose versions change the numbers; read from metadata so nothing heavy is imported.
PACKAGES = (
    "mrl-toolkit",
    "mrl-toolkit-gpu",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "tensorrt-cu13",
    "cuda-bindings",
    "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13",
    "torch",
    "sentence-transformers",
    "transformers",
    "tokenizers",
    "numpy",
    "grpcio",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is absent."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and the instruction-set flags that matter for inference, from /proc/cpuinfo text."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def cpu_info() -> dict[str, Any]:
    """CPU model, cores this process may use, inference-relevant flags and memory."""
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        info = {"model": platform.processor() or None, "flags": []}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info.update(logical_cores=os.cpu_count(), usable_cores=usable, memory_gib=_memory_gib())
    return info


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_nvidia_smi(csv: str, header: str = "") -> list[dict[str, str | None]]:
    """GPUs from `nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader`."""
    cuda = None
    if "CUDA Version:" in header:
        cuda = header.split("CUDA Version:")[1].split()[0].strip("|")
    gpus = []
    for line in csv.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            gpus.append(
                {
                    "name": parts[0],
                    "driver": parts[1],
                    "memory": parts[2] if len(parts) > 2 else None,
                    "cuda_driver_api": cuda,
                }
            )
    return gpus


def gpu_info() -> list[dict[str, str | None]]:
    """GPUs nvidia-smi reports (empty where there is none, no driver, or nvidia-smi hangs)."""
    csv = run_nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    if csv is None:
        return []
    return parse_nvidia_smi(csv, run_nvidia_smi() or "")


def torch_cuda_info() -> dict[str, Any] | None:
    """CUDA as torch sees it, only where torch was already imported (this never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    available = bool(torch.cuda.is_available())
    return {
        "cuda_runtime": torch.version.cuda,
        "cuda_available": available,
        "device": torch.cuda.get_device_name(0) if available else None,
        "threads": torch.get_num_threads(),
    }


def artifact_info(directory: Path | None) -> dict[str, Any] | None:
    """The artifact's path, model name and the sha256 of its manifest (which pins every graph's hash)."""
    if directory is None:
        return None
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return {"path": str(directory), "manifest_sha256": None}
    import json

    data = json.loads(path.read_text())
    return {
        "path": str(Path(directory).absolute()),
        "name": data.get("name"),
        "manifest_sha256": sha256_file(path),
        "toolkit_version": data.get("toolkit_version"),
    }


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build lists (a list, not a promise: check sessions)."""
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return []


def collect(artifact: Path | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge or reproduce the numbers."""
    return {
        "toolkit_version": mrl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "torch_cuda": torch_cuda_info(),
        "onnxruntime_providers": onnxruntime_providers(),
        "packages": package_versions(),
        "artifact": artifact_info(artifact),
        # Other jobs on the machine skew every number: a reader should see how busy it was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
