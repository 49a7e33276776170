"""The ONNX Runtime backend's explicit provider configuration (TensorRT and CUDA) and device choices."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import mrl.runtime.backends.onnxruntime as ortb
from mrl.runtime import Embedder
from mrl.runtime.backends.gpu import GpuInfo
from mrl.runtime.errors import ArtifactError, BackendUnavailableError, InvalidInputError
from mrl.runtime.manifest import ShapeRange, Span, load_manifest

H100 = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A10 = GpuInfo(name="NVIDIA A10", compute_capability="8.6")
R = ShapeRange(batch=Span(1, 32, 128), seq=Span(1, 128, 512))


@pytest.fixture(scope="module")
def manifest(tiny_artifact):
    return load_manifest(tiny_artifact)


def test_tensorrt_provider_options_pin_shapes_caches_and_graph_precision(tmp_path):
    opts = ortb.tensorrt_provider_options(("input_ids", "attention_mask"), R, tmp_path, 1, {})
    assert opts["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert opts["trt_profile_opt_shapes"] == "input_ids:32x128,attention_mask:32x128"
    assert opts["trt_profile_max_shapes"] == "input_ids:128x512,attention_mask:128x512"
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_fp16_enable"] is False  # strongly typed: the graph says the precision
    assert opts["device_id"] == 1
    assert (
        ortb.tensorrt_provider_options(("input_ids",), R, tmp_path, 0, {"trt_max_workspace_size": 2})[
            "trt_max_workspace_size"
        ]
        == 2
    )


def test_cuda_provider_options_keep_fp32_graphs_in_fp32():
    assert ortb.cuda_provider_options("fp32", 0, {})["use_tf32"] == 0
    assert ortb.cuda_provider_options("fp16", 0, {})["use_tf32"] == 1
    custom = ortb.cuda_provider_options("fp32", 2, {"gpu_mem_limit": 1 << 30, "use_tf32": 1})
    assert custom == {
        "device_id": 2,
        "use_tf32": 1,
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": 1 << 30,
    }


def test_options_are_validated_by_name():
    with pytest.raises(InvalidInputError, match="unknown onnxruntime backend option 'thread'"):
        ortb.OrtOptions.parse({"thread": 2})
    with pytest.raises(InvalidInputError, match="unknown onnxruntime device 'gpu'"):
        ortb.OrtOptions.parse({"device": "gpu"})


def test_cpu_device_and_cpu_only_builds_take_the_cpu(tiny_artifact, manifest):
    profile = manifest.profiles[0]
    assert ortb.plan_providers(tiny_artifact, manifest, profile, ortb.OrtOptions(device="cpu")) == [
        "CPUExecutionProvider"
    ]
    if set(ort.get_available_providers()) & set(ortb.GPU_PROVIDERS):
        pytest.skip("this onnxruntime build has GPU providers")
    assert ortb.plan_providers(tiny_artifact, manifest, profile, ortb.OrtOptions()) == ["CPUExecutionProvider"]


def _gpu_build(monkeypatch, gpu, trt_version="10.13.3"):
    monkeypatch.setattr(
        ortb.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(ortb, "detect_gpu", lambda device_id: (gpu, "cuda-python" if gpu else "no GPU"))
    monkeypatch.setattr(ortb, "installed_tensorrt_version", lambda: trt_version)


def test_auto_on_a_gpu_build_configures_every_provider(tiny_artifact, manifest, monkeypatch, tmp_path):
    _gpu_build(monkeypatch, H100)
    fp32 = manifest.profiles[0]
    providers = ortb.plan_providers(tiny_artifact, manifest, fp32, ortb.OrtOptions(trt_cache_dir=tmp_path))
    (trt_name, trt), (cuda_name, cuda), cpu = providers
    assert (trt_name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    # The tiny model takes 48 tokens: one range, pinned.
    assert trt["trt_profile_max_shapes"] == "input_ids:128x48,attention_mask:128x48,token_type_ids:128x48"
    cache = trt["trt_engine_cache_path"]
    assert cache.startswith(str(tmp_path / H100.slug)) and f"{fp32.name}-" in cache
    assert (tmp_path / H100.slug).is_dir()
    assert cuda["use_tf32"] == 0


def test_tensorrt_cache_folders_differ_per_gpu_and_tensorrt(tiny_artifact, manifest, monkeypatch, tmp_path):
    profile = manifest.profiles[0]
    monkeypatch.setattr(ortb, "installed_tensorrt_version", lambda: "10.13.3")
    h100 = ortb.tensorrt_cache_dir(tmp_path, manifest, profile, R, H100)
    assert h100 != ortb.tensorrt_cache_dir(tmp_path, manifest, profile, R, A10)
    monkeypatch.setattr(ortb, "installed_tensorrt_version", lambda: "10.14.0")
    assert h100 != ortb.tensorrt_cache_dir(tmp_path, manifest, profile, R, H100)


def test_auto_leaves_out_tensorrt_without_tensorrt_and_gpus_without_a_gpu(tiny_artifact, manifest, monkeypatch):
    profile = manifest.profiles[0]
    _gpu_build(monkeypatch, H100, trt_version=None)
    names = [
        p if isinstance(p, str) else p[0]
        for p in ortb.plan_providers(tiny_artifact, manifest, profile, ortb.OrtOptions())
    ]
    assert names == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    _gpu_build(monkeypatch, None)
    assert ortb.plan_providers(tiny_artifact, manifest, profile, ortb.OrtOptions()) == ["CPUExecutionProvider"]


def test_explicit_cuda_without_the_cuda_provider_is_an_error_naming_the_extra(tiny_artifact):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match=r"no CUDAExecutionProvider.*pip install 'mrl-toolkit\[gpu\]'"):
        Embedder.load(tiny_artifact, "onnxruntime-cuda").embed(["x"])


def test_named_cpu_backend_matches_the_default(tiny_artifact):
    texts = ["one sentence", "another, somewhat longer sentence to embed"]
    cpu = Embedder.load(tiny_artifact, "onnxruntime-cpu")
    default = Embedder.load(tiny_artifact, "onnxruntime", intra_op_threads=1)
    np.testing.assert_allclose(cpu.embed(texts), default.embed(texts), atol=1e-6)
    assert cpu.providers == ["CPUExecutionProvider"]
    cpu.close()
    default.close()


@pytest.mark.gpu
def test_onnxruntime_cuda_really_runs_on_the_gpu_and_matches_the_cpu(tiny_artifact):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA provider")
    from mrl.runtime.backends.gpu import detect_gpu

    if detect_gpu(0)[0] is None:
        pytest.skip("needs a CUDA GPU")
    texts = ["one sentence", "another, somewhat longer sentence to embed"]
    gpu = Embedder.load(tiny_artifact, "onnxruntime-cuda")
    cpu = Embedder.load(tiny_artifact, "onnxruntime-cpu")
    vectors = gpu.embed(texts)
    assert "CUDAExecutionProvider" in gpu.providers  # the backend refuses a silent CPU fallback
    cosine = np.sum(vectors * cpu.embed(texts), axis=1)
    assert cosine.min() >= 0.9999


def test_choose_graph_takes_the_cpu_graph_on_the_cpu_provider_only(manifest):
    import dataclasses

    from mrl.runtime.manifest import OrtCpuGraph

    plain = dataclasses.replace(manifest.profiles[0], ort_cpu=None)
    fused = dataclasses.replace(plain, ort_cpu=OrtCpuGraph(file=f"{plain.name}.ort-cpu.onnx", sha256="0" * 64))
    cpu, cuda = ["CPUExecutionProvider"], [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    assert ortb.choose_graph(fused, cpu, "auto")[0] == fused.ort_cpu.file
    assert ortb.choose_graph(fused, cuda, "auto") == (
        plain.file,
        "the portable graph: the ONNX Runtime CPU graph is for the CPU provider only",
    )
    assert ortb.choose_graph(fused, cpu, "portable")[0] == plain.file
    assert "has no ONNX Runtime CPU graph" in ortb.choose_graph(plain, cpu, "auto")[1]
    with pytest.raises(ArtifactError, match="--ort-cpu optimized"):
        ortb.choose_graph(plain, cpu, "optimized")
    with pytest.raises(InvalidInputError, match="CPU provider only"):
        ortb.choose_graph(fused, cuda, "optimized")
    with pytest.raises(InvalidInputError, match="unknown onnxruntime graph 'fused'"):
        ortb.OrtOptions.parse({"graph": "fused"})


def test_skip_layer_norm_fusion_is_left_out_on_the_cpu_only():
    assert ortb.cpu_disabled_optimizers(["CPUExecutionProvider"]) == ["SkipLayerNormFusion"]
    assert ortb.cpu_disabled_optimizers([("CUDAExecutionProvider", {}), "CPUExecutionProvider"]) == []
