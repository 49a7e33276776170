"""The ONNX Runtime backend's explicit provider configuration (TensorRT and CUDA) and device choices."""

from __future__ import annotations

from typing import ClassVar

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
    with pytest.raises(
        BackendUnavailableError,
        match=r"no CUDAExecutionProvider.*For GPUs: pip uninstall -y mrl-toolkit onnxruntime && pip install \S+gpu$",
    ):
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


# --- what the session really runs: ONNX Runtime's silent retry without our options ----------------


class FakeSession:
    """Stands in for an InferenceSession after ONNX Runtime's retry: CUDA first, its options the defaults."""

    DEFAULTS: ClassVar = {"device_id": "0", "use_tf32": "1", "arena_extend_strategy": "kNextPowerOfTwo"}
    made: ClassVar[list[dict]] = []

    def __init__(self, path, options, providers=None, **kwargs):
        self.asked, self.kwargs, self.fallback = providers, kwargs, True
        FakeSession.made.append(self.__dict__)

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CUDAExecutionProvider": dict(self.DEFAULTS), "CPUExecutionProvider": {}}

    def disable_fallback(self):
        self.fallback = False

    def get_inputs(self):
        return []


class AsAskedSession(FakeSession):
    """A session that applied the options it was given."""

    def get_provider_options(self):
        cuda = dict(self.asked[0][1])
        return {"CUDAExecutionProvider": {k: str(int(v) if isinstance(v, bool) else v) for k, v in cuda.items()}}


@pytest.fixture
def gpu_onnxruntime(monkeypatch):
    monkeypatch.setattr(ortb.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ortb, "preload_gpu_libraries", lambda tensorrt: ())
    FakeSession.made.clear()


CUDA_ASKED = [("CUDAExecutionProvider", ortb.cuda_provider_options("fp32", 0, {})), "CPUExecutionProvider"]


def test_a_named_gpu_backend_refuses_a_session_that_dropped_its_options(gpu_onnxruntime, monkeypatch, tmp_path):
    monkeypatch.setattr(ortb.ort, "InferenceSession", FakeSession)
    with pytest.raises(BackendUnavailableError, match=r"use_tf32 is '1', asked 0.*arena_extend_strategy"):
        ortb.OnnxRuntimeBackend(tmp_path / "g.onnx", CUDA_ASKED, strict=True)
    # Named backends also stop ONNX Runtime's own retry, so its real error surfaces.
    assert FakeSession.made[-1]["kwargs"] == {"enable_fallback": 0}


def test_auto_warns_and_runs_where_the_options_were_dropped(gpu_onnxruntime, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(ortb.ort, "InferenceSession", FakeSession)
    backend = ortb.OnnxRuntimeBackend(tmp_path / "g.onnx", CUDA_ASKED, strict=False)
    assert "use_tf32 is '1', asked 0" in caplog.text
    assert backend.device == "cuda"
    assert FakeSession.made[-1]["kwargs"] == {} and FakeSession.made[-1]["fallback"] is False  # no retry at run time


def test_a_session_that_took_the_options_passes_quietly(gpu_onnxruntime, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(ortb.ort, "InferenceSession", AsAskedSession)
    asked = [("CUDAExecutionProvider", ortb.cuda_provider_options("fp32", 0, {"gpu_mem_limit": 1 << 30}))]
    ortb.OnnxRuntimeBackend(tmp_path / "g.onnx", asked, strict=True)
    assert "did not start" not in caplog.text


def test_fallback_problems_compare_as_onnxruntime_reports_options():
    asked = [("TensorrtExecutionProvider", {"trt_fp16_enable": False, "trt_engine_cache_enable": True}), "CPU"]
    applied = {"TensorrtExecutionProvider": {"trt_fp16_enable": "0", "trt_engine_cache_enable": "1"}}
    assert ortb.fallback_problems(asked, ["TensorrtExecutionProvider", "CPU"], applied) == []
    problems = ortb.fallback_problems(asked, ["CUDAExecutionProvider", "CPU"], {})
    assert problems == ["asked for TensorrtExecutionProvider first, runs on CUDAExecutionProvider"]
    # Keys a provider does not report are not judged.
    assert ortb.fallback_problems([("CUDAExecutionProvider", {"new_key": 1})], ["CUDAExecutionProvider"], {}) == []


def test_both_onnxruntime_wheels_are_named_in_the_error(monkeypatch):
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(ortb.importlib.metadata, "version", lambda dist: versions[dist])
    assert "both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are installed" in ortb.wheels_note()


def test_gpu_libraries_are_loaded_before_a_gpu_session(monkeypatch, tmp_path):
    monkeypatch.setattr(
        ortb.ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ortb.ort, "InferenceSession", FakeSession)
    loaded = []
    monkeypatch.setattr(ortb, "preload_gpu_libraries", lambda tensorrt: loaded.append(tensorrt))
    with pytest.raises(BackendUnavailableError):  # the fake runs CUDA first: refused, after the preload
        ortb.OnnxRuntimeBackend(tmp_path / "g.onnx", ["TensorrtExecutionProvider"], strict=True)
    assert loaded == [True]


def test_preloading_reports_what_it_could_not_load(monkeypatch, caplog):
    ortb.preload_gpu_libraries.cache_clear()
    monkeypatch.setattr(
        ortb.ort, "preload_dlls", lambda: print("Failed to load libcudart.so.13: not found"), raising=False
    )
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    try:
        notes = ortb.preload_gpu_libraries(True)
    finally:
        ortb.preload_gpu_libraries.cache_clear()
    assert notes[0] == "Failed to load libcudart.so.13: not found"
    assert "tensorrt does not import" in notes[1] and "libnvinfer" in notes[1]
    assert "Failed to load libcudart.so.13" in caplog.text


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
