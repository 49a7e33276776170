"""Backends run one profile's graph: `run(feed) -> [batch, dims] float32`. Chosen by name, imported lazily.

`"auto"` picks TensorRT where engines for this GPU exist and TensorRT imports, then ONNX Runtime's
CUDA provider where a GPU is here, then ONNX Runtime on the CPU, and logs what it picked and why.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mrl.runtime.backends.gpu import ORT_GPU_INSTALL, GpuInfo, detect_gpu, install_hint, own_distribution
from mrl.runtime.engines import find_engine
from mrl.runtime.errors import BackendUnavailableError, NotFoundError
from mrl.runtime.manifest import Manifest, Profile

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the Embedder needs of a backend: run a padded batch, warm up, release resources."""

    name: str
    providers: list[str]
    device: str  # "cuda" or "cpu": where the work runs, for reports and benchmark labels

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch; returns float32 `[batch, dims]`."""
        ...

    def warmup(self) -> None:
        """Run once on a small input so the first real call pays no set-up cost."""
        ...

    def close(self) -> None:
        """Release sessions and device memory."""
        ...


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a backend can do, for its callers to ask instead of switching on backend names."""

    threads: bool
    """Takes `intra_op_threads`: how many CPU threads one run may use."""
    spinning: bool
    """Takes `spinning` and `stop_spinning`: whether its idle threads spin waiting for work."""
    lone_sessions: bool
    """A batch that has the machine to itself runs faster on a second session that uses every core
    (measured for ONNX Runtime on the CPU, BENCHMARKS.md; a GPU backend has no cores to gain)."""
    cut_depths: bool
    """Runs the graphs of profiles that keep fewer encoder layers (the torch backend runs the source model,
    which cannot stop early)."""


@dataclass(frozen=True, kw_only=True)
class _Entry:
    module: str
    factory: str
    needs: str
    """What provides what it imports: an extra of this install, or for ONNX Runtime's GPU providers the
    mrl-toolkit-gpu distribution."""
    capabilities: Capabilities


_ORT = "mrl.runtime.backends.onnxruntime"
_ORT_GPU = Capabilities(threads=True, spinning=True, lone_sessions=False, cut_depths=True)
# Every factory accepts `intra_op_threads` (GPU ones ignore it), so callers may pass it whatever "auto" resolves to.
_REGISTRY: dict[str, _Entry] = {
    "onnxruntime": _Entry(module=_ORT, factory="create", needs="", capabilities=_ORT_GPU),
    "onnxruntime-cpu": _Entry(
        module=_ORT,
        factory="create_cpu",
        needs="",
        capabilities=Capabilities(threads=True, spinning=True, lone_sessions=True, cut_depths=True),
    ),
    "onnxruntime-cuda": _Entry(module=_ORT, factory="create_cuda", needs="mrl-toolkit-gpu", capabilities=_ORT_GPU),
    "onnxruntime-tensorrt": _Entry(
        module=_ORT, factory="create_tensorrt", needs="mrl-toolkit-gpu[tensorrt]", capabilities=_ORT_GPU
    ),
    "tensorrt": _Entry(
        module="mrl.runtime.backends.tensorrt",
        factory="create",
        needs="tensorrt",
        capabilities=Capabilities(threads=False, spinning=False, lone_sessions=False, cut_depths=True),
    ),
    "torch": _Entry(
        module="mrl.runtime.backends.torch",
        factory="create",
        needs="export",
        capabilities=Capabilities(threads=True, spinning=False, lone_sessions=False, cut_depths=False),
    ),
}


def backend_names() -> list[str]:
    """Names that `create_backend` accepts, besides "auto"."""
    return list(_REGISTRY)


def capabilities(name: str) -> Capabilities:
    """What backend `name` (not "auto": resolve it first) can do."""
    if name not in _REGISTRY:
        raise NotFoundError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    return _REGISTRY[name].capabilities


def pip_extra(name: str) -> str:
    """The pip requirement that provides backend `name` (`mrl-toolkit[tensorrt]`, `mrl-toolkit-gpu`, ...)."""
    needs = _REGISTRY[name].needs
    if needs.startswith("mrl-toolkit"):
        return needs
    return f"{own_distribution()}[{needs}]" if needs else own_distribution()


@dataclass(frozen=True, kw_only=True)
class Probe:
    """What this machine offers, as "auto" sees it; `*_note` says how it was found or why it is missing."""

    gpu: GpuInfo | None
    gpu_note: str
    tensorrt_version: str | None
    tensorrt_note: str
    ort_providers: tuple[str, ...]


def probe_machine(device_id: int = 0) -> Probe:
    """Look at this machine: GPU (cuda-python, else nvidia-smi), importable TensorRT, onnxruntime providers."""
    import onnxruntime

    gpu, gpu_note = detect_gpu(device_id)
    version, trt_note = None, f"TensorRT is not installed ({install_hint('tensorrt')})"
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            version, trt_note = tensorrt.__version__, "tensorrt imports"
        except Exception as e:  # a wheel without its libraries (OSError), or one built for another CUDA
            trt_note = f"tensorrt is installed but does not import ({type(e).__name__}: {e})"
    return Probe(
        gpu=gpu,
        gpu_note=gpu_note,
        tensorrt_version=version,
        tensorrt_note=trt_note,
        ort_providers=tuple(onnxruntime.get_available_providers()),
    )


def choose_backend(probe: Probe, manifest: Manifest, precision: str | None) -> tuple[str, str]:
    """The backend "auto" means for this machine and precision, and the reason, in one line."""
    precision = precision or (manifest.precisions[0] if manifest.profiles else None)
    profiles = [p for p in manifest.profiles if p.precision == precision]
    if probe.tensorrt_version is None:
        trt_reason = probe.tensorrt_note
    elif probe.gpu is None:
        trt_reason = f"TensorRT {probe.tensorrt_version} imports but no GPU is here ({probe.gpu_note})"
    elif probe.gpu_note != "cuda-python":
        trt_reason = f"TensorRT needs cuda-python for device memory ({probe.gpu_note})"
    else:
        missing = [p.name for p in profiles if find_engine(manifest, p, probe.gpu, probe.tensorrt_version) is None]
        if profiles and not missing:
            return "tensorrt", f"TensorRT {probe.tensorrt_version} engines for every {precision} profile on {probe.gpu}"
        trt_reason = (
            f"no engine for {', '.join(missing) or 'any profile'} on {probe.gpu} with TensorRT "
            f"{probe.tensorrt_version} (mrl-export build-engine builds them)"
        )
    if probe.gpu is not None and "CUDAExecutionProvider" in probe.ort_providers:
        return "onnxruntime-cuda", f"{trt_reason}; onnxruntime has the CUDA provider and {probe.gpu} is here"
    if probe.gpu is None:
        cuda_reason = f"no GPU ({probe.gpu_note})"
    else:
        cuda_reason = f"onnxruntime here has no CUDA provider (for it: {ORT_GPU_INSTALL})"
    return "onnxruntime-cpu", f"{trt_reason}; {cuda_reason}"


def resolve_backend(name: str, directory: Path, manifest: Manifest, precision: str | None = None) -> str:
    """The concrete backend for `name`; "auto" picks the best one present here and logs why."""
    if name != "auto":
        return name
    chosen, reason = choose_backend(probe_machine(), manifest, precision)
    log.info("backend auto -> %s for %s: %s", chosen, directory, reason)
    return chosen


def create_backend(name: str, directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> Backend:
    """Create the backend called `name` for one profile of the artifact in `directory`."""
    if name not in _REGISTRY:
        raise NotFoundError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend {name!r} needs a package that is not installed ({e.name}): pip install '{pip_extra(name)}'"
        ) from None
    return getattr(module, entry.factory)(directory, manifest, profile, **options)
