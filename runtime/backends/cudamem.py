"""Device memory for the TensorRT backend through cuda-python: staged buffers, one stream, async copies.

Nothing here needs TensorRT, so `scripts/gpu_check.sh` runs these very calls on a GPU that has none.
The CUDA current device belongs to the calling host thread, not to the process: `activate()` must
run in whichever thread is about to use the stream or the buffers (mrl-serve runs batches in
executor threads, so the thread that built the backend is rarely the one that runs it).
"""

from __future__ import annotations

import ctypes
from types import ModuleType

import numpy as np

from mrl.runtime.backends.gpu import cuda_check


class StagedBuffer:
    """A device buffer with a pinned host buffer of the same size, so copies can be asynchronous."""

    def __init__(self, cudart: ModuleType, nbytes: int) -> None:
        self._cudart = cudart
        self.nbytes = nbytes
        self.device = cuda_check(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
        self.host_ptr = cuda_check(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost")
        self.host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(self.host_ptr)))

    def free(self) -> None:
        """Release both buffers."""
        self._cudart.cudaFree(self.device)
        self._cudart.cudaFreeHost(self.host_ptr)


class DeviceStream:
    """One CUDA stream on one device, with the staged copies the TensorRT backend makes around an engine."""

    def __init__(self, cudart: ModuleType, device_id: int) -> None:
        self._cudart = cudart
        self.device_id = device_id
        self.activate()
        self.stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def activate(self) -> None:
        """Make this stream's device current for the calling thread."""
        cuda_check(self._cudart, self._cudart.cudaSetDevice(self.device_id), "cudaSetDevice")

    def upload(self, buffer: StagedBuffer, array: np.ndarray) -> None:
        """Queue a copy of `array` to `buffer`'s device memory, through its pinned host memory."""
        data = np.ascontiguousarray(array)
        if data.nbytes > buffer.nbytes:
            raise ValueError(f"{data.nbytes} bytes do not fit a {buffer.nbytes}-byte buffer")
        buffer.host[: data.nbytes] = data.reshape(-1).view(np.uint8)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        copied = self._cudart.cudaMemcpyAsync(buffer.device, buffer.host_ptr, data.nbytes, kind, self.stream)
        cuda_check(self._cudart, copied, "cudaMemcpyAsync to device")

    def download(self, buffer: StagedBuffer, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Queue a copy of `buffer`'s first values back, wait for the stream, and return them (a copy)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        copied = self._cudart.cudaMemcpyAsync(buffer.host_ptr, buffer.device, nbytes, kind, self.stream)
        cuda_check(self._cudart, copied, "cudaMemcpyAsync to host")
        self.synchronize()
        return buffer.host[:nbytes].view(dtype).reshape(shape).copy()  # the pinned buffer is reused

    def synchronize(self) -> None:
        """Wait until everything queued on the stream has run."""
        cuda_check(self._cudart, self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Destroy the stream (on its own device)."""
        if self.stream is not None:
            self.activate()
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
