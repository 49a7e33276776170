"""TensorRT backend: a prebuilt engine of one profile, run asynchronously on a CUDA stream.

Engines come from `mrl-export build-engine` and are listed in the manifest. An engine is loaded only
when its cache key matches this GPU, this TensorRT and the current graph (a stale or foreign engine
is refused with the command that builds a fresh one), and only when its bytes match their sha256.

Device memory: NVIDIA's `cuda-python` runtime bindings (`cuda.bindings.runtime`, see `cudamem`), not
torch. They are a few MB and are all TensorRT needs beside itself (malloc, pinned host memory, async
copies, streams), while torch would put a multi-GB CUDA build into every serving image. torch stays
the baseline backend, never a dependency of this one. Every call that touches the device first makes
the engine's device current for the calling thread (the CUDA current device is per host thread).

Each batch runs in the shape range that fits it (rows beyond its max batch run as further chunks;
sequences shorter than its min get masked tokens appended on the right, see `engines.pad_feed`).
Only `[rows, dims]` floats come back from the device: the truncation is baked into the graph, so
the copy is as small as the requested embedding.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mrl.runtime.backends.cudamem import DeviceStream, StagedBuffer
from mrl.runtime.backends.gpu import cuda_check, cuda_runtime, current_gpu, install_hint
from mrl.runtime.engines import Chunk, explain_missing, find_engine, numpy_dtype, pad_feed, plan_chunks
from mrl.runtime.errors import ArtifactError, BackendUnavailableError, IntegrityError
from mrl.runtime.manifest import OUTPUT_NAME, Engine, Manifest, Profile, ShapeRange, TokenizerSettings, sha256_file

log = logging.getLogger(__name__)


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or BackendUnavailableError with the pip extra to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        raise BackendUnavailableError(f"TensorRT is not installed here ({e}): {install_hint('tensorrt')}") from None
    major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:  # the name-based I/O API and strong typing arrived in 10
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} is older than 10: {install_hint('tensorrt')}")
    return tensorrt


@dataclass(frozen=True, kw_only=True)
class EngineIO:
    """An engine's tensors as the backend feeds and reads them."""

    inputs: tuple[str, ...]
    dtypes: dict[str, np.dtype]
    """Per tensor (inputs and the output): the type the installed TensorRT gives it (token ids INT64 from 10 on)."""
    dims: int
    """Width of the output rows."""
    ranges: tuple[ShapeRange, ...]
    pad_id: int


class TensorRtBackend:
    """One deserialised engine, one execution context, one CUDA stream."""

    name = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        context: Any,
        io: EngineIO,
        stream: DeviceStream,
        cudart: ModuleType,
        *,
        providers: list[str],
        keep: tuple[Any, ...] = (),
    ) -> None:
        self._context = context
        self._keep = keep
        """What the context needs alive (TensorRT's logger, runtime and engine), released on close."""
        self._io = stream
        self.ranges = io.ranges
        self.dims = io.dims
        self._inputs = list(io.inputs)
        self._dtypes = io.dtypes
        self._pad_id = io.pad_id
        most_tokens = max(r.batch.max * r.seq.max for r in self.ranges)
        most_rows = max(r.batch.max for r in self.ranges)
        self._buffers = {n: StagedBuffer(cudart, most_tokens * self._dtypes[n].itemsize) for n in self._inputs}
        self._buffers[OUTPUT_NAME] = StagedBuffer(cudart, most_rows * self.dims * self._dtypes[OUTPUT_NAME].itemsize)
        self._active: int | None = None
        self._lock = threading.Lock()  # one context and one set of buffers: one batch at a time
        self.providers = providers

    @classmethod
    def load(cls, path: Path, engine: Engine, tokenizer: TokenizerSettings, device_id: int = 0) -> TensorRtBackend:
        """Deserialise a built engine onto `device_id`, checking its bytes and its tensors against the manifest."""
        trt = import_tensorrt()
        cudart = cuda_runtime()
        cuda_check(cudart, cudart.cudaSetDevice(device_id), "cudaSetDevice")  # the engine loads onto it
        if sha256_file(path) != engine.sha256:
            raise IntegrityError(
                f"{path} does not match its sha256 in the manifest: rebuild with mrl-export build-engine"
            )
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        built = runtime.deserialize_cuda_engine(path.read_bytes())
        if built is None:
            raise ArtifactError(f"TensorRT {trt.__version__} cannot load {path}: rebuild with mrl-export build-engine")
        if built.num_optimization_profiles != len(engine.shape_ranges):
            raise ArtifactError(
                f"{path} has {built.num_optimization_profiles} shape ranges, the manifest lists "
                f"{len(engine.shape_ranges)}"
            )
        names = [built.get_tensor_name(i) for i in range(built.num_io_tensors)]
        inputs = tuple(n for n in names if built.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        if OUTPUT_NAME not in names or set(inputs) != set(tokenizer.inputs):
            feeds = list(tokenizer.inputs)
            raise ArtifactError(f"{path} has tensors {names}; the artifact feeds {feeds} and reads {OUTPUT_NAME}")
        io = EngineIO(
            inputs=inputs,
            dtypes={n: np.dtype(numpy_dtype(built.get_tensor_dtype(n))) for n in names},
            dims=int(tuple(built.get_tensor_shape(OUTPUT_NAME))[-1]),
            ranges=engine.shape_ranges,
            pad_id=tokenizer.pad_token_id,
        )
        context = built.create_execution_context()
        providers = [f"TensorRT {trt.__version__} on CUDA device {device_id}"]
        return cls(
            context, io, DeviceStream(cudart, device_id), cudart, providers=providers, keep=(logger, runtime, built)
        )

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Embed one padded batch; returns float32 `[batch, dims]`."""
        arrays = {n: np.asarray(feed[n]) for n in self._inputs}
        rows, seq = arrays[self._inputs[0]].shape
        out = np.empty((rows, self.dims), dtype=np.float32)
        with self._lock:
            self._io.activate()  # this may be another thread than the one that built the engine
            for chunk in plan_chunks(rows, seq, self.ranges):
                out[chunk.start : chunk.stop] = self._run_chunk(arrays, chunk)
        return out

    def _run_chunk(self, arrays: dict[str, np.ndarray], chunk: Chunk) -> np.ndarray:
        context, stream = self._context, int(self._io.stream)
        if chunk.range_index != self._active:
            if not context.set_optimization_profile_async(chunk.range_index, stream):
                raise RuntimeError(f"TensorRT refused shape range {chunk.range_index}")
            self._active = chunk.range_index
        part = {n: a[chunk.start : chunk.stop] for n, a in arrays.items()}
        for name, array in pad_feed(part, chunk.seq, self._pad_id).items():
            data = np.ascontiguousarray(array, dtype=self._dtypes[name])
            self._io.upload(self._buffers[name], data)
            if not context.set_input_shape(name, data.shape):
                raise RuntimeError(f"TensorRT refused shape {data.shape} for {name} in shape range {chunk.range_index}")
            context.set_tensor_address(name, self._buffers[name].device)
        out = self._buffers[OUTPUT_NAME]
        context.set_tensor_address(OUTPUT_NAME, out.device)
        if not context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        values = self._io.download(out, self._dtypes[OUTPUT_NAME], (chunk.stop - chunk.start, self.dims))
        return values.astype(np.float32)

    def warmup(self) -> None:
        """Run every shape range once at its smallest shape."""
        with self._lock:
            self._io.activate()
            for index, r in enumerate(self.ranges):
                feed = {n: np.ones((r.batch.min, r.seq.min), dtype=np.int64) for n in self._inputs}
                if "token_type_ids" in feed:
                    feed["token_type_ids"][:] = 0
                self._run_chunk(feed, Chunk(start=0, stop=r.batch.min, range_index=index, seq=r.seq.min))

    def close(self) -> None:
        """Free device and pinned memory, the stream, the context and the engine."""
        io = getattr(self, "_io", None)
        if io is not None and io.stream is not None:
            io.activate()  # free on the engine's device, whichever thread closes
        for staged in getattr(self, "_buffers", {}).values():
            staged.free()
        self._buffers = {}
        if io is not None:
            io.close()
        self._context, self._keep = None, ()


def create(
    directory: Path, manifest: Manifest, profile: Profile, *, device_id: int = 0, intra_op_threads: int = 0
) -> TensorRtBackend:
    """Registry factory: the engine built for this profile on this GPU, or an error saying how to build one.

    `intra_op_threads` is accepted so "auto" can stand in for onnxruntime; it has no effect on a GPU.
    """
    trt = import_tensorrt()
    gpu = current_gpu(device_id)
    engine = find_engine(manifest, profile, gpu, trt.__version__)
    if engine is None:
        raise BackendUnavailableError(explain_missing(manifest, profile, gpu, trt.__version__))
    log.info("profile %s: engine %s (%s)", profile.name, engine.file, ", ".join(str(r) for r in engine.shape_ranges))
    return TensorRtBackend.load(Path(directory) / engine.file, engine, manifest.tokenizer, device_id)
