"""The tensorrt backend: typed errors where TensorRT or CUDA is missing; on a GPU, engines that match ONNX Runtime."""

from __future__ import annotations

import ctypes
import shutil
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import mrl.runtime.backends.tensorrt as tensorrt_backend
from mrl.runtime import Embedder
from mrl.runtime.backends.cudamem import DeviceStream, StagedBuffer
from mrl.runtime.errors import BackendUnavailableError
from mrl.runtime.manifest import OUTPUT_NAME, ShapeRange, Span, load_manifest


def test_embedder_with_tensorrt_missing_raises_the_typed_error(tiny_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    missing = r"TensorRT is not installed here .*pip install 'mrl-toolkit\[tensorrt\]'"
    with pytest.raises(BackendUnavailableError, match=missing):  # its acceptance test runs the backend at load
        Embedder.load(tiny_artifact, "tensorrt")
    embedder = Embedder.load(tiny_artifact, "tensorrt", acceptance=False)
    with pytest.raises(BackendUnavailableError, match=missing):
        embedder.embed(["hello"])


@pytest.fixture
def small_engines(tiny_artifact, tmp_path):
    """Engines for the tiny artifact with small shape ranges, so batches chunk and short inputs pad up."""
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'mrl-toolkit[tensorrt]')")
    from mrl.runtime.backends.gpu import detect_gpu

    gpu, how = detect_gpu(0)
    if gpu is None or how != "cuda-python":
        pytest.skip(f"needs a CUDA GPU and cuda-python ({how})")
    from mrl.export.engine import EngineBuildOptions, build_engines

    artifact = shutil.copytree(tiny_artifact, tmp_path / "tiny")
    options = EngineBuildOptions(batch=Span(1, 2, 4), seqs=(Span(16, 16, 24), Span(25, 48, 48)))
    build_engines(artifact, load_manifest(artifact), options)
    return artifact


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engines_chunk_pad_and_match_onnxruntime(small_engines):
    texts = [f"text number {i}" for i in range(9)] + ["a much longer text that needs the long shape range " * 2]
    trt = Embedder.load(small_engines, "tensorrt")
    cpu = Embedder.load(small_engines, "onnxruntime-cpu")
    for dims in (8, 16, 32):
        cosine = np.sum(
            trt.embed(texts, dims, batch_size=10, truncate=True) * cpu.embed(texts, dims, truncate=True), axis=1
        )
        assert cosine.min() >= 0.9999
    trt.warmup()
    assert trt.providers[0].startswith("TensorRT ")
    trt.close()
    cpu.close()


# --- the device plumbing around an engine, on a fake CUDA runtime -----------------------------------


class FakeCudart:
    """cuda.bindings.runtime as the backend uses it: host memory stands in for the device, and the
    current device is per host thread, as in CUDA. Every call records (call, current device)."""

    cudaError_t = SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")

    def __init__(self):
        self.local, self.calls, self.memory = threading.local(), [], []

    def _note(self, call):
        self.calls.append((call, getattr(self.local, "device", 0)))
        return (0,)

    def cudaSetDevice(self, device):
        self.local.device = device
        return (0,)

    def cudaMalloc(self, nbytes):
        self.memory.append(ctypes.create_string_buffer(nbytes))
        self._note("cudaMalloc")
        return 0, ctypes.addressof(self.memory[-1])

    cudaMallocHost = cudaMalloc

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(int(dst), int(src), nbytes)
        return self._note(f"cudaMemcpyAsync {kind}")

    def cudaStreamCreate(self):
        self._note("cudaStreamCreate")
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return self._note("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):
        return self._note("cudaStreamDestroy")

    def cudaFree(self, ptr):
        return self._note("cudaFree")

    cudaFreeHost = cudaFree


class FakeContext:
    """An execution context whose 'engine' writes each row's token-id sum into every output component."""

    def __init__(self, cudart, dims):
        self.cudart, self.dims, self.shapes, self.addresses = cudart, dims, {}, {}

    def set_optimization_profile_async(self, index, stream):
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)

    def execute_async_v3(self, stream):
        rows, seq = self.shapes["input_ids"]
        ids = np.ctypeslib.as_array((ctypes.c_int64 * (rows * seq)).from_address(self.addresses["input_ids"]))
        out = np.ctypeslib.as_array((ctypes.c_float * (rows * self.dims)).from_address(self.addresses[OUTPUT_NAME]))
        out[:] = np.repeat(ids.reshape(rows, seq).sum(axis=1), self.dims).astype(np.float32)
        self.cudart._note("execute_async_v3")
        return True


def _fake_backend(cudart, device_id, dims=4):
    """A TensorRtBackend on the fake runtime and context, as `TensorRtBackend.load` makes it from an engine."""
    io = tensorrt_backend.EngineIO(
        inputs=("input_ids", "attention_mask"),
        dtypes={
            "input_ids": np.dtype(np.int64),
            "attention_mask": np.dtype(np.int64),
            OUTPUT_NAME: np.dtype(np.float32),
        },
        dims=dims,
        ranges=(ShapeRange(batch=Span(1, 2, 4), seq=Span(8, 8, 16)),),
        pad_id=0,
    )
    context = FakeContext(cudart, dims)
    backend = tensorrt_backend.TensorRtBackend(context, io, DeviceStream(cudart, device_id), cudart, providers=["fake"])
    return backend, context


def test_every_device_call_of_a_batch_runs_on_the_engines_device_in_any_thread():
    cudart = FakeCudart()
    backend, context = _fake_backend(cudart, device_id=3)
    feed = {"input_ids": np.array([[1, 2, 3], [4, 5, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    results, start = [], len(cudart.calls)
    worker = threading.Thread(target=lambda: results.append(backend.run(feed)))  # as mrl-serve's executor does
    worker.start()
    worker.join()
    calls = cudart.calls[start:]
    assert [c for c, _ in calls].count("execute_async_v3") == 1
    assert {device for _, device in calls} == {3}, calls  # never device 0, the worker thread's default
    # The batch went up, padded to the range's min of 8 tokens, and the rows came back in order.
    assert context.shapes["input_ids"] == (2, 8)
    np.testing.assert_array_equal(results[0], [[6.0] * 4, [9.0] * 4])
    closer = threading.Thread(target=backend.close)
    closer.start()
    closer.join()
    assert {device for call, device in cudart.calls if call.startswith(("cudaFree", "cudaStream"))} == {3}


@pytest.mark.gpu
def test_device_memory_round_trip_on_a_real_gpu_from_another_thread():
    """The same buffers, stream and copies on cuda-python and a real GPU (no TensorRT needed)."""
    from mrl.runtime.backends.gpu import cuda_runtime, detect_gpu

    gpu, how = detect_gpu(0)
    if gpu is None or how != "cuda-python":
        pytest.skip(f"needs a CUDA GPU and cuda-bindings ({how})")
    cudart = cuda_runtime()
    stream = DeviceStream(cudart, 0)
    ids = np.arange(64 * 128, dtype=np.int64).reshape(64, 128)
    buffer = StagedBuffer(cudart, ids.nbytes)
    back = []
    worker = threading.Thread(
        target=lambda: (
            stream.activate(),
            stream.upload(buffer, ids),
            back.append(stream.download(buffer, ids.dtype, ids.shape)),
        )
    )
    worker.start()
    worker.join()
    buffer.free()
    stream.close()
    np.testing.assert_array_equal(back[0], ids)
