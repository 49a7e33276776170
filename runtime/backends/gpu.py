"""Which GPU is here: its name and compute capability, the identity engines are keyed by.

Device queries go through NVIDIA's `cuda-python` bindings (`cuda-bindings`, in the `tensorrt`
extra), never torch: a serving image with TensorRT needs a few MB of CUDA bindings, not a multi-GB
torch build. Where cuda-python is absent or cannot reach a driver, `nvidia-smi` still answers "is
there a GPU at all" for reports and backend selection. Every failure of either becomes "no GPU, and
why", never an exception: `auto` must still pick the CPU on a host without a driver.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mrl.runtime.errors import BackendUnavailableError

# How to get each GPU piece; docs/gpu.md explains the two distributions.
ORT_GPU_INSTALL = "pip uninstall -y mrl-toolkit onnxruntime && pip install mrl-toolkit-gpu"
NVIDIA_SMI_TIMEOUT_S = 20.0  # a wedged driver can hang nvidia-smi for minutes


def own_distribution() -> str:
    """Which distribution this code came in: mrl-toolkit-gpu where that is installed, else mrl-toolkit."""
    try:
        importlib.metadata.version("mrl-toolkit-gpu")
    except importlib.metadata.PackageNotFoundError:
        return "mrl-toolkit"
    return "mrl-toolkit-gpu"


def install_hint(extra: str) -> str:
    """The pip command that adds `extra` to this install, without pulling the other onnxruntime wheel."""
    return f"pip install '{own_distribution()}[{extra}]'"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as engines see it."""

    name: str
    compute_capability: str  # "9.0"

    @property
    def slug(self) -> str:
        """A file-name-safe label: `nvidia-h100-80gb-hbm3-sm90`."""
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return f"{name}-sm{self.compute_capability.replace('.', '')}"

    def __str__(self) -> str:
        return f"{self.name} (sm_{self.compute_capability.replace('.', '')})"


def cuda_runtime() -> ModuleType:
    """The CUDA runtime bindings of cuda-python, or BackendUnavailableError naming the extra."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6 layout

        return runtime
    except ImportError:
        pass
    except Exception as e:  # installed but broken (a missing libcuda can surface as OSError or RuntimeError)
        raise BackendUnavailableError(f"the CUDA runtime bindings do not load: {type(e).__name__}: {e}") from None
    try:
        from cuda import cudart  # older cuda-python layout, removed in 13

        return cudart
    except ImportError:
        raise BackendUnavailableError(
            f"the CUDA runtime bindings (cuda-python) are not installed: {install_hint('tensorrt')}"
        ) from None
    except Exception as e:
        raise BackendUnavailableError(f"the CUDA runtime bindings do not load: {type(e).__name__}: {e}") from None


def cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python `(error, *values)` result, raising on any error but success."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA call {what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_gpu(device_id: int = 0) -> GpuInfo:
    """The identity of CUDA device `device_id`, via cuda-python; BackendUnavailableError if none."""
    cudart = cuda_runtime()
    hint = "check the driver, CUDA_VISIBLE_DEVICES"
    try:
        count = cuda_check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if not count or device_id >= count:
            raise BackendUnavailableError(f"CUDA device {device_id} does not exist here ({count or 0} visible)")
        props = cuda_check(cudart, cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    except BackendUnavailableError as e:
        raise BackendUnavailableError(f"no usable CUDA GPU here ({e}): {hint}") from None
    except Exception as e:  # the bindings raise their own errors where the driver library is missing or too old
        raise BackendUnavailableError(f"no usable CUDA GPU here ({type(e).__name__}: {e}): {hint}") from None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name.strip("\x00 ").strip(), compute_capability=f"{props.major}.{props.minor}")


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` output."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, cap = line.rpartition(",")
        if not name or not re.fullmatch(r"\s*\d+\.\d+\s*", cap):
            continue  # older drivers lack compute_cap and print an error in its place
        gpus.append(GpuInfo(name=name.strip(), compute_capability=cap.strip()))
    return gpus


def run_nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's stdout for `args`; None where it is missing, fails or hangs past NVIDIA_SMI_TIMEOUT_S."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_smi_gpus() -> list[GpuInfo]:
    """What nvidia-smi lists; empty where it is missing or fails (no driver, no GPU)."""
    return parse_nvidia_smi(run_nvidia_smi("--query-gpu=name,compute_cap", "--format=csv,noheader") or "")


@functools.lru_cache(maxsize=8)  # the GPUs of a process do not change; probing costs a subprocess
def detect_gpu(device_id: int = 0) -> tuple[GpuInfo | None, str]:
    """The GPU here, by cuda-python if installed, else nvidia-smi; with how it was found, or why not."""
    try:
        return current_gpu(device_id), "cuda-python"
    except BackendUnavailableError as e:
        reason = str(e)
    gpus = nvidia_smi_gpus()
    if len(gpus) > device_id:
        return gpus[device_id], f"nvidia-smi ({reason})"
    return (
        None,
        f"{reason}; {'no nvidia-smi either' if shutil.which('nvidia-smi') is None else 'nvidia-smi lists none'}",
    )
