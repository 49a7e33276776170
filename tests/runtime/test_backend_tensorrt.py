"""The tensorrt backend: typed errors where TensorRT or CUDA is missing; on a GPU, engines that match ONNX Runtime."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from mrl.runtime import Embedder
from mrl.runtime.errors import BackendUnavailableError
from mrl.runtime.manifest import Span, load_manifest


def test_embedder_with_tensorrt_missing_raises_the_typed_error(tiny_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    embedder = Embedder.load(tiny_artifact, "tensorrt")
    with pytest.raises(
        BackendUnavailableError, match=r"TensorRT is not installed here .*pip install 'mrl-toolkit\[tensorrt\]'"
    ):
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
