"""What machine computed a set of vectors: the CPU and the flags that pick its kernels, the GPU, library versions.

int8 kernels differ by CPU (without VNNI, ONNX Runtime's u8 x s8 kernel adds pairs of products in 16 bits
with saturation), and GPU backends each compute their own vectors, so a parity number means little
without the machine it came from. Never imports torch or TensorRT: versions come from package metadata.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
"""The CPU flags that decide which int8/bf16 kernels ONNX Runtime and torch run, as /proc/cpuinfo names them."""
_NUMPY_NAMES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16"}
"""Those of KERNEL_FLAGS that numpy's own CPUID probe reports, by numpy's names."""
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_libs")


@dataclass(frozen=True, kw_only=True)
class Machine:
    """A machine as parity rows and acceptance checks record it."""

    cpu: str
    cpu_flags: tuple[str, ...]
    """Which of KERNEL_FLAGS the CPU has, as this process sees them."""
    gpu: str = ""
    """The GPU's name and compute capability ("" where none was found)."""
    onnxruntime: str = ""
    tensorrt: str = ""
    note: str = ""
    """Anything that makes the flags doubtful (e.g. an emulator whose CPUID disagrees with /proc/cpuinfo)."""

    def __str__(self) -> str:
        flags = " ".join(self.cpu_flags) or "none of " + " ".join(KERNEL_FLAGS)
        parts = [f"CPU {self.cpu} ({flags}{'; ' + self.note if self.note else ''})"]
        parts.append(f"GPU {self.gpu}" if self.gpu else "no GPU")
        parts += [f"onnxruntime {self.onnxruntime}"] if self.onnxruntime else []
        parts += [f"TensorRT {self.tensorrt}"] if self.tensorrt else []
        return ", ".join(parts)


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The first processor's model name and flags from /proc/cpuinfo's text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpuid_features() -> dict[str, bool] | None:
    """numpy's CPUID probe of this process's CPU (None where this numpy does not expose it)."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = getattr(__import__(module, fromlist=["__cpu_features__"]), "__cpu_features__", None)
        except ImportError:
            continue
        if isinstance(features, dict):
            return features
    return None


def kernel_flags(cpuinfo_flags: set[str], cpuid: dict[str, bool] | None) -> tuple[tuple[str, ...], str]:
    """The KERNEL_FLAGS present, and a note where CPUID and /proc/cpuinfo disagree.

    CPUID is what ONNX Runtime asks, so it wins; /proc/cpuinfo describes the host kernel's CPU, which an
    emulator (qemu-user) or a masking hypervisor can change under a process. Where they disagree, the flags
    only /proc/cpuinfo knows (avx_vnni, amx_*) cannot be trusted either and are left out.
    """
    if cpuid is None:
        return tuple(f for f in KERNEL_FLAGS if f in cpuinfo_flags), ""
    seen = {flag: bool(cpuid[name]) for flag, name in _NUMPY_NAMES.items() if name in cpuid}  # older numpy: fewer
    differ = sorted(flag for flag, has in seen.items() if has != (flag in cpuinfo_flags))
    if not differ:
        return tuple(f for f in KERNEL_FLAGS if f in cpuinfo_flags), ""
    note = f"CPUID disagrees with /proc/cpuinfo on {', '.join(differ)}: emulated or masked; flags as CPUID says"
    return tuple(f for f in KERNEL_FLAGS if seen.get(f)), note


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def onnxruntime_version() -> str:
    """The onnxruntime this process imports ("" where none is installed)."""
    try:
        import onnxruntime
    except ImportError:
        return ""
    return onnxruntime.__version__


@functools.lru_cache(maxsize=1)  # a process's machine does not change; the GPU probe may cost a subprocess
def this_machine() -> Machine:
    """This machine, as far as can be found without importing torch or TensorRT."""
    from mrl.runtime.backends.gpu import detect_gpu

    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    present, note = kernel_flags(flags, cpuid_features())
    gpu, _ = detect_gpu(0)
    return Machine(
        cpu=model or "unknown CPU",
        cpu_flags=present,
        gpu=str(gpu) if gpu else "",
        onnxruntime=onnxruntime_version(),
        tensorrt=_version(*_TENSORRT_DISTRIBUTIONS),
        note=note,
    )
