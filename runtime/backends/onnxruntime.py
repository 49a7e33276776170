"""ONNX Runtime backend: CPU by default, CUDA or TensorRT providers where onnxruntime-gpu has them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mrl.runtime.errors import ArtifactError, BackendUnavailableError
from mrl.runtime.manifest import OUTPUT_NAME, Manifest, Profile

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def default_providers() -> list[str]:
    """The providers to ask for: every GPU one this onnxruntime build lists, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """One InferenceSession over one profile graph."""

    name = "onnxruntime"

    def __init__(
        self,
        graph: Path,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        requested = list(providers) if providers else default_providers()
        unknown = [p for p in requested if _provider_name(p) not in ort.get_available_providers()]
        if unknown:
            raise BackendUnavailableError(
                f"onnxruntime here has no {', '.join(map(_provider_name, unknown))}; it has "
                f"{', '.join(ort.get_available_providers())} (for GPUs: pip install 'mrl-toolkit[gpu]')"
            )
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=requested)
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ArtifactError(f"onnxruntime cannot load {graph}: {e}") from None
        self.providers = self._session.get_providers()
        wanted = [_provider_name(p) for p in requested]
        if wanted and self.providers[0] != wanted[0]:
            log.warning(
                "onnxruntime asked for %s but runs on %s (no usable GPU or driver?)",
                wanted[0],
                self.providers[0],
            )
        self._inputs = [i.name for i in self._session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch."""
        (out,) = self._session.run([OUTPUT_NAME], {k: feed[k] for k in self._inputs})
        return np.asarray(out, dtype=np.float32)

    def warmup(self) -> None:
        """One tiny batch so allocators and kernels are ready."""
        feed = {k: np.ones((1, 4), dtype=np.int64) for k in self._inputs}
        if "token_type_ids" in feed:
            feed["token_type_ids"][:] = 0
        self.run(feed)

    def close(self) -> None:
        """Drop the session."""
        self._session = None


def _provider_name(p: str | tuple[str, dict[str, Any]]) -> str:
    return p if isinstance(p, str) else p[0]


def create(directory: Path, manifest: Manifest, profile: Profile, **options: Any) -> OnnxRuntimeBackend:
    """Registry factory: a session over the profile's graph."""
    return OnnxRuntimeBackend(directory / profile.file, **options)
