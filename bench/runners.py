"""What `mrl-bench engine` times: a runtime backend through the Embedder, or the PyTorch baseline.

Every runner takes the same list of texts and returns unit vectors of the asked dims, so the
timings include tokenisation on both sides: texts in, vectors out, as a caller sees it.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mrl.runtime import Embedder, EmbedOptions
from mrl.runtime.errors import BackendUnavailableError

BASELINE = "pytorch"


class Runner(Protocol):
    """One thing to time: embeds a batch and says how long it took by its device's clock."""

    label: str
    backend: str
    precision: str
    device: str  # "cuda" or "cpu": where the work runs, which peak it is held against
    providers: list[str]
    layers: int | None  # the layers it runs, where it keeps fewer than the model has; None: all

    def timed(self, texts: Sequence[str], dims: int) -> tuple[float, np.ndarray]:
        """Embed one batch; returns (seconds, `[len(texts), dims]` unit vectors)."""
        ...

    def reset_device_peak(self) -> None:
        """Start a fresh window for `device_peak_mib` (a no-op where it is not measured)."""
        ...

    def device_peak_mib(self) -> float | None:
        """This runner's own peak device memory since the last reset, in MiB (None: not measured)."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


@dataclass(frozen=True, kw_only=True)
class Variant:
    """A named set of backend options, so several configurations of one backend run side by side."""

    name: str
    options: dict[str, Any]


# Backend options a variant may set, and how to read each from text ("a+b" is a list; empty: none):
# onnxruntime's graph and session fusions, the torch backend's dtype.
VARIANT_OPTIONS = {
    "graph": str,
    "disabled_optimizers": lambda v: tuple(x for x in v.split("+") if x),
    "dtype": str,
}


def parse_variant(text: str) -> Variant:
    """`NAME:key=value,key=value` (e.g. `old:graph=portable,disabled_optimizers=`) as a Variant."""
    name, _, spec = text.partition(":")
    if not name.strip():
        raise ValueError(f"a variant needs a name before ':', got {text!r}")
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in VARIANT_OPTIONS:
            raise ValueError(f"variant option {item!r}: use key=value with key one of {', '.join(VARIANT_OPTIONS)}")
        options[key] = VARIANT_OPTIONS[key](value)
    return Variant(name=name.strip(), options=options)


def device_label(devices: set[str]) -> str:
    """One device for a runner whose profiles report `devices`: "cuda" if any runs on a GPU."""
    return "cuda" if "cuda" in devices else "cpu"


class EmbedderRunner:
    """A runtime backend (onnxruntime, tensorrt, ...) of one precision and depth through `Embedder`."""

    def __init__(
        self,
        artifact: Path,
        backend: str,
        precision: str,
        threads: int,
        layers: int | None = None,
        variant: Variant | None = None,
        tag: str = "",
    ) -> None:
        # Every backend takes a thread count (GPU ones ignore it), whatever "auto" resolves to.
        options: dict[str, Any] = {"intra_op_threads": threads, **(variant.options if variant else {})}
        # `tag` tells apart runners of other artifacts timed in the same run (e.g. an earlier export).
        self.variant = " ".join(filter(None, [tag, variant.name if variant else ""]))
        self.embedder = Embedder.load(artifact, backend, precision=precision, **options)
        # Its own depth only (other depths are other runners), and the one graph every dims runs on there.
        graph = self.embedder.plan(EmbedOptions(layers=layers)).graph
        self.embedder.run(graph, self.embedder.tokenizer.encode(["warm-up"]))
        self.backend = self.embedder.backend_name
        self.precision = precision
        self.layers = layers
        self.providers = self.embedder.providers
        # The backends say where they run; provider strings do not (torch's say "torch ... cuda").
        self.device = device_label({self.embedder.backend_for(graph).device})
        depth = "" if layers is None else f" l{layers}"
        self.label = f"{self.backend} {precision}{depth}" + (f" [{self.variant}]" if self.variant else "")

    def timed(self, texts: Sequence[str], dims: int) -> tuple[float, np.ndarray]:
        """Embed as one batch; the result is host memory, so the clock stops after the device is done."""
        start = time.perf_counter()
        out = self.embedder.embed(texts, dims, layers=self.layers, batch_size=len(texts), truncate=True)
        return time.perf_counter() - start, out

    def reset_device_peak(self) -> None:
        """Not measured: ONNX Runtime and TensorRT allocate outside torch's accounting."""

    def device_peak_mib(self) -> float | None:
        """Not measured for runtime backends (see `reset_device_peak`)."""
        return None

    def close(self) -> None:
        """Release the backend sessions."""
        self.embedder.close()


@dataclass(frozen=True, kw_only=True)
class BaselinePlan:
    """Which PyTorch baseline runs, or why none does."""

    device: str | None
    precisions: tuple[str, ...]
    reason: str


def plan_baseline(request: str, source: dict[str, Any], *, torch_present: bool, cuda: bool) -> BaselinePlan:
    """Decide the baseline: `request` is auto, none, cpu or cuda; GPUs run fp32 and fp16."""
    if request == "none":
        return BaselinePlan(device=None, precisions=(), reason="baseline turned off (--baseline none)")
    if not torch_present:
        return BaselinePlan(
            device=None,
            precisions=(),
            reason="torch or sentence-transformers is not installed: pip install torch sentence-transformers",
        )
    path = source.get("path")
    if source.get("kind") == "onnx" or not path or not Path(path).exists():
        return BaselinePlan(
            device=None,
            precisions=(),
            reason=f"the source model ({path}) is not a sentence-transformers directory here",
        )
    if request == "cuda" and not cuda:
        return BaselinePlan(device=None, precisions=(), reason="--baseline cuda asked for, but torch sees no CUDA GPU")
    device = "cuda" if request == "cuda" or (request == "auto" and cuda) else "cpu"
    precisions = ("fp32", "fp16") if device == "cuda" else ("fp32",)
    return BaselinePlan(device=device, precisions=precisions, reason=f"sentence-transformers on {device}")


def torch_present() -> bool:
    """Whether torch and sentence-transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "sentence_transformers"))


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imports torch: call only when planning a baseline)."""
    import torch

    return bool(torch.cuda.is_available())


@dataclass(kw_only=True)
class DevicePeak:
    """One model's peak GPU memory in a window: the device's peak less what other models held as it opened."""

    own_bytes: int
    """What the model itself holds (its weights), measured when it was loaded."""
    others_bytes: int = 0

    def open_window(self, allocated: int) -> None:
        """Start a window with `allocated` bytes on the device: all but the model's own belong to others."""
        self.others_bytes = max(0, allocated - self.own_bytes)

    def mib(self, device_peak: int) -> float:
        """This model's peak in MiB, from the device's peak bytes since the window opened."""
        return (device_peak - self.others_bytes) / 2**20


class SentenceTransformerRunner:
    """The source model through sentence-transformers: `truncate_dim` and normalisation, inference mode."""

    backend = BASELINE
    layers = None  # the source model, every layer
    variant = ""

    def __init__(self, path: str, device: str, precision: str, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        if device == "cpu":
            torch.set_num_threads(threads)
        before = self._allocated() if device == "cuda" else 0
        self.model = SentenceTransformer(path, device=device)
        if precision == "fp16":
            self.model.half()
        elif precision != "fp32":
            raise BackendUnavailableError(f"the PyTorch baseline runs fp32 or fp16, not {precision}")
        self.model.eval()
        self.device = device
        # What this model holds on the GPU, so its peak can leave out the other models loaded beside it.
        self._peak = DevicePeak(own_bytes=self._allocated() - before if device == "cuda" else 0)
        self.precision = precision
        self.providers = [f"torch {torch.__version__} {device}"]
        self.label = f"{BASELINE} {precision}" + (" cuda" if device == "cuda" else "")
        self.timed(["warm-up"], 8)

    def _allocated(self) -> int:
        return int(self._torch.cuda.memory_allocated())

    def _encode(self, texts: Sequence[str], dims: int) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode(
                list(texts),
                batch_size=len(texts),
                truncate_dim=dims,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)

    def timed(self, texts: Sequence[str], dims: int) -> tuple[float, np.ndarray]:
        """Embed as one batch; on CUDA timed with CUDA events after a synchronise (the device's clock)."""
        torch = self._torch
        if self.device != "cuda":
            start = time.perf_counter()
            out = self._encode(texts, dims)
            return time.perf_counter() - start, out
        torch.cuda.synchronize()  # nothing queued earlier may land inside this measurement
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = self._encode(texts, dims)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000, out

    def reset_device_peak(self) -> None:
        """Start a fresh peak window; what other models hold on the GPU now is left out of this one's peak."""
        if self.device == "cuda":
            self._torch.cuda.reset_peak_memory_stats()
            self._peak.open_window(self._allocated())

    def device_peak_mib(self) -> float | None:
        """Peak GPU memory of this model (weights and activations) since the reset; None on a CPU."""
        if self.device != "cuda":
            return None
        return self._peak.mib(int(self._torch.cuda.max_memory_allocated()))

    def close(self) -> None:
        """Drop the model and cached device memory."""
        self.model = None
        if self.device == "cuda":
            self._torch.cuda.empty_cache()
