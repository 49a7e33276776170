"""The torch backend: the source model in PyTorch must match the ONNX Runtime backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mrl.runtime.backends.torch as torchb
from mrl.export.parity import validation_texts
from mrl.runtime import Embedder
from mrl.runtime.errors import ArtifactError, BackendUnavailableError, InvalidInputError
from mrl.runtime.manifest import load_manifest

torch = pytest.importorskip("torch", reason="the torch backend needs torch (pip install 'mrl-toolkit[export]')")


def _compare(artifact, backend: str, **options) -> dict[int, float]:
    texts = validation_texts()
    reference = Embedder.load(artifact, "onnxruntime-cpu")
    candidate = Embedder.load(artifact, backend, **options)
    worst = {}
    for dims in reference.manifest.dims:
        cosine = np.sum(
            reference.embed(texts, dims, truncate=True) * candidate.embed(texts, dims, truncate=True), axis=1
        )
        worst[dims] = float(cosine.min())
    reference.close()
    candidate.close()
    return worst


def test_torch_cpu_fp32_matches_onnxruntime_on_every_profile(tiny_artifact):
    worst = _compare(tiny_artifact, "torch", device="cpu")
    assert set(worst) == {8, 16, 32}
    assert min(worst.values()) >= 0.9999, worst


def test_torch_backend_shares_one_model_between_profiles(tiny_artifact):
    embedder = Embedder.load(tiny_artifact, "torch", device="cpu")
    # The Embedder itself runs only the widest; backends of the other profiles still share its model.
    backends = [embedder.backend_for(profile) for profile in embedder.profiles]
    assert len(backends) == 3 and len({id(b.model) for b in backends}) == 1
    assert embedder.providers == [f"torch {torch.__version__} cpu fp32"]
    first = backends[0].model
    embedder.close()
    assert all(b.model is None for b in backends)
    again = Embedder.load(tiny_artifact, "torch", device="cpu")
    assert again.backend_for(again.profiles[0]).model is not first  # the last close freed it; loaded anew
    again.close()


def test_device_and_dtype_choices():
    assert torchb.resolve_device("auto", cuda_available=False) == "cpu"
    assert torchb.resolve_device("auto", cuda_available=True) == "cuda"
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        torchb.resolve_device("cuda:1", cuda_available=False)
    with pytest.raises(InvalidInputError, match="unknown torch device 'tpu'"):
        torchb.resolve_device("tpu", cuda_available=True)
    assert torchb.resolve_dtype(None, "fp16", "cuda") == "fp16"
    assert torchb.resolve_dtype(None, "fp16", "cpu") == "fp32"
    assert torchb.resolve_dtype(None, "int8", "cuda") == "fp32"
    assert torchb.resolve_dtype("bf16", "fp32", "cpu") == "bf16"
    with pytest.raises(InvalidInputError, match="unknown torch dtype"):
        torchb.resolve_dtype("fp8", "fp32", "cpu")


def test_missing_source_model_says_how_to_point_at_one(tiny_artifact, tmp_path):
    manifest = load_manifest(tiny_artifact)
    moved = dataclasses.replace(manifest, source={**manifest.source, "path": str(tmp_path / "gone")})
    with pytest.raises(ArtifactError, match="pass model_path="):
        torchb.create(tiny_artifact, moved, moved.profiles[0])
    backend = torchb.create(tiny_artifact, moved, moved.profiles[0], device="cpu", model_path=manifest.source["path"])
    assert backend.run(_feed()).shape == (2, 32)
    backend.close()


def test_onnx_sourced_artifacts_have_no_torch_model(tiny_artifact):
    manifest = load_manifest(tiny_artifact)
    onnx_sourced = dataclasses.replace(manifest, source={**manifest.source, "kind": "onnx"})
    with pytest.raises(BackendUnavailableError, match="no PyTorch model"):
        torchb.create(tiny_artifact, onnx_sourced, onnx_sourced.profiles[0])


def test_output_is_unit_length_and_truncated(tiny_artifact):
    manifest = load_manifest(tiny_artifact)
    smallest = min(manifest.profiles, key=lambda p: p.dims)
    backend = torchb.create(tiny_artifact, manifest, smallest, device="cpu")
    out = backend.run(_feed())
    backend.close()
    assert out.shape == (2, smallest.dims) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def _feed() -> dict[str, np.ndarray]:
    ids = np.array([[101, 2023, 2003, 102, 0], [101, 2178, 6251, 2008, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, threshold", [("fp32", 0.9999), ("fp16", 0.999)])
def test_torch_cuda_matches_onnxruntime_cpu(tiny_artifact, dtype, threshold):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch")
    worst = _compare(tiny_artifact, "torch", device="cuda", dtype=dtype)
    assert min(worst.values()) >= threshold, worst
