"""torch backend: the artifact's source model in PyTorch, on CUDA or CPU, in fp32, fp16 or bf16.

The baseline `mrl-bench` compares against, and a way to serve from a GPU that has no TensorRT.
It loads `manifest.source.path` with sentence-transformers (imported here, lazily, never by
`mrl.runtime` itself) and runs on the runtime tokenizer's ids, so it sees exactly the tokens the
graph backends see; the Matryoshka head (slice, then L2 normalise) runs on the device and only
`[batch, dims]` comes back.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mrl.runtime.errors import ArtifactError, BackendUnavailableError, InvalidInputError
from mrl.runtime.manifest import Manifest, Profile

log = logging.getLogger(__name__)

TORCH_EXTRA = "pip install 'mrl-toolkit[export]'"
DTYPES = ("fp32", "fp16", "bf16")
# One loaded model per (path, device, dtype), shared by the profiles of an Embedder and counted,
# so three profiles of one artifact hold one copy of the weights.
_SHARED: dict[tuple[str, str, str], list[Any]] = {}
_SHARED_LOCK = threading.Lock()


def resolve_device(device: str, cuda_available: bool) -> str:
    """The torch device for `device` ("auto": cuda where torch sees a GPU, else cpu)."""
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise BackendUnavailableError(f"the torch backend was asked for {device}, but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidInputError(f"unknown torch device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str | None, profile_precision: str, device: str) -> str:
    """The dtype to run in: as asked, else fp16 for fp16 profiles on a GPU, else fp32."""
    if dtype is None:
        # int8 profiles have no torch counterpart; fp16 on a CPU is slow and partly unsupported.
        return "fp16" if profile_precision == "fp16" and device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown torch dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def _load(path: Path, kind: str, pooling: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise BackendUnavailableError(f"the torch backend needs {e.name}: {TORCH_EXTRA}") from None
    try:
        if kind == "transformers":
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

            transformer = Transformer(str(path), model_kwargs={"local_files_only": True})
            pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
            return SentenceTransformer(modules=[transformer, pool], device=device)
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as e:  # sentence-transformers raises many untyped errors for unloadable models
        raise ArtifactError(f"the torch backend cannot load the source model {path}: {e}") from None


class TorchBackend:
    """The source model for one profile: slice to the profile's dims, normalise, return."""

    name = "torch"

    def __init__(self, manifest: Manifest, profile: Profile, *, device: str, dtype: str, model_path: Path) -> None:
        import torch

        self._torch = torch
        self.dims = profile.dims
        self._key = (str(model_path), device, dtype)
        with _SHARED_LOCK:
            if self._key not in _SHARED:
                model = _load(model_path, manifest.source.get("kind", ""), manifest.pooling, device)
                torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
                _SHARED[self._key] = [model.to(dtype=torch_dtype).eval(), 0]
            _SHARED[self._key][1] += 1
            self.model = _SHARED[self._key][0]
            """The source model: one copy shared by the backends of every profile (same path, device, dtype)."""
        self._device = device
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self.providers = [f"torch {torch.__version__} {device} {dtype}"]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch; returns float32 `[batch, dims]`."""
        torch = self._torch
        with torch.inference_mode():
            features = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self._device) for k, v in feed.items()}
            pooled = self.model(features)["sentence_embedding"][:, : self.dims].float()
            unit = torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)
            return unit.cpu().numpy()

    def warmup(self) -> None:
        """One tiny batch so kernels and allocators are ready."""
        feed = {"input_ids": np.ones((1, 4), dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64)}
        self.run(feed)

    def close(self) -> None:
        """Drop this profile's hold on the shared model; the last one frees it."""
        with _SHARED_LOCK:
            entry = _SHARED.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _SHARED[self._key]
        self.model = None


def create(
    directory: Path,
    manifest: Manifest,
    profile: Profile,
    *,
    device: str = "auto",
    dtype: str | None = None,
    model_path: str | Path | None = None,
    intra_op_threads: int = 0,
) -> TorchBackend:
    """Registry factory: the source model (`model_path`, default manifest.source.path) for one profile.

    `intra_op_threads` > 0 sets torch's CPU thread count (process-wide, as torch has only one).
    """
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(f"the torch backend needs torch: {TORCH_EXTRA}") from None
    if manifest.source.get("kind") == "onnx":
        raise BackendUnavailableError(
            f"{directory} was exported from an ONNX encoder: there is no PyTorch model for the torch backend"
        )
    if profile.layers is not None:
        # Cutting the model's layers is export's work (mrl.export.layers); this backend would run them all.
        raise BackendUnavailableError(
            f"profile {profile.name} keeps {profile.layers} of the model's layers, and the torch backend runs "
            "the source model at full depth only: serve it with an onnxruntime or tensorrt backend"
        )
    path = Path(model_path or manifest.source.get("path", ""))
    if not path.is_dir():
        raise ArtifactError(
            f"the torch backend loads the source model from {path} (manifest source.path), which is not a "
            "directory here: pass model_path= to point at a copy"
        )
    where = resolve_device(device, torch.cuda.is_available())
    if intra_op_threads > 0:
        torch.set_num_threads(intra_op_threads)
    precision = resolve_dtype(dtype, profile.precision, where)
    if profile.precision == "int8":
        log.info("profile %s is int8; the torch backend runs it in %s", profile.name, precision)
    return TorchBackend(manifest, profile, device=where, dtype=precision, model_path=path)
