"""The backend registry, "auto" selection, missing-dependency errors and the no-heavy-imports rule."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

import mrl.runtime.backends as backends
from mrl.runtime.backends import Probe, choose_backend, create_backend, resolve_backend
from mrl.runtime.backends.gpu import GpuInfo
from mrl.runtime.engines import cache_key, default_shape_ranges, weights_sha256
from mrl.runtime.errors import BackendUnavailableError, NotFoundError
from mrl.runtime.manifest import Engine, load_manifest

H100 = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
TRT = "10.13.3"
CPU_ONLY = ("CPUExecutionProvider",)
GPU_ORT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def probe(**changes) -> Probe:
    base = Probe(
        gpu=H100, gpu_note="cuda-python", tensorrt_version=TRT, tensorrt_note="tensorrt imports", ort_providers=GPU_ORT
    )
    return dataclasses.replace(base, **changes)


def with_engines(manifest, gpu=H100, version=TRT, profiles=None):
    """The manifest with an (unbuilt) engine entry per profile, keyed for `gpu` and `version`."""
    entries = []
    for p in manifest.profiles if profiles is None else profiles:
        r = default_shape_ranges(manifest.tokenizer.max_length)
        key = cache_key(gpu, version, p.sha256, weights_sha256(manifest, p), r)
        entries.append(
            Engine(
                profile=p.name,
                file=f"engines/{p.name}.engine",
                sha256="0" * 64,
                cache_key=key,
                gpu=gpu.name,
                compute_capability=gpu.compute_capability,
                tensorrt_version=version,
                onnx_sha256=p.sha256,
                weights_sha256=weights_sha256(manifest, p),
                shape_ranges=r,
            )
        )
    return dataclasses.replace(manifest, engines=tuple(entries))


@pytest.fixture(scope="module")
def manifest(tiny_artifact):
    return load_manifest(tiny_artifact)


def test_auto_prefers_tensorrt_when_every_profile_has_an_engine_here(manifest):
    name, reason = choose_backend(probe(), with_engines(manifest), "fp32")
    assert name == "tensorrt"
    assert "TensorRT 10.13.3 engines for every fp32 profile on NVIDIA H100" in reason


def test_auto_skips_tensorrt_for_missing_foreign_or_stale_engines(manifest):
    partial = with_engines(manifest, profiles=manifest.profiles[:1])
    name, reason = choose_backend(probe(), partial, "fp32")
    assert name == "onnxruntime-cuda"
    assert "no engine for d16-fp32, d8-fp32" in reason and "mrl-export build-engine" in reason
    foreign = with_engines(manifest, gpu=GpuInfo(name="NVIDIA A10", compute_capability="8.6"))
    assert choose_backend(probe(), foreign, "fp32")[0] == "onnxruntime-cuda"
    assert choose_backend(probe(tensorrt_version="10.14.0"), with_engines(manifest), "fp32")[0] == "onnxruntime-cuda"


def test_auto_falls_to_cuda_then_cpu_and_says_why(manifest):
    no_trt = probe(
        tensorrt_version=None, tensorrt_note="TensorRT is not installed (pip install 'mrl-toolkit[tensorrt]')"
    )
    name, reason = choose_backend(no_trt, with_engines(manifest), "fp32")
    assert name == "onnxruntime-cuda" and reason.startswith("TensorRT is not installed")
    name, reason = choose_backend(dataclasses.replace(no_trt, ort_providers=CPU_ONLY), manifest, "fp32")
    assert name == "onnxruntime-cpu" and "no CUDA provider" in reason
    nothing = probe(gpu=None, gpu_note="nvidia-smi is not here", tensorrt_version=None, ort_providers=CPU_ONLY)
    name, reason = choose_backend(nothing, manifest, None)
    assert name == "onnxruntime-cpu" and "no GPU (nvidia-smi is not here)" in reason


def test_auto_needs_cuda_python_for_tensorrt(manifest):
    name, reason = choose_backend(probe(gpu_note="nvidia-smi (cuda-python missing)"), with_engines(manifest), "fp32")
    assert name == "onnxruntime-cuda" and "cuda-python" in reason


def test_resolve_backend_logs_the_choice(tiny_artifact, manifest, monkeypatch, caplog):
    monkeypatch.setattr(
        backends, "probe_machine", lambda: probe(gpu=None, tensorrt_version=None, ort_providers=CPU_ONLY)
    )
    with caplog.at_level(logging.INFO, logger="mrl.runtime.backends"):
        assert resolve_backend("auto", tiny_artifact, manifest) == "onnxruntime-cpu"
    assert "backend auto -> onnxruntime-cpu" in caplog.text
    assert resolve_backend("torch", tiny_artifact, manifest) == "torch"


def test_auto_on_this_machine_is_a_working_backend(tiny_artifact, manifest):
    """Whatever this machine has, auto resolves to a registered backend that embeds."""
    from mrl.runtime import Embedder

    embedder = Embedder.load(tiny_artifact)
    assert embedder.backend_name in backends.backend_names()
    assert embedder.embed(["hello"]).shape == (1, 32)
    embedder.close()


def test_registry_names_and_extras():
    names = backends.backend_names()
    assert {"onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch"} <= set(
        names
    )
    assert backends.pip_extra("tensorrt") == "mrl-toolkit[tensorrt]"
    assert backends.pip_extra("onnxruntime-cuda") == "mrl-toolkit-gpu"  # a distribution of its own, not an extra
    assert backends.pip_extra("torch") == "mrl-toolkit[export]"


def test_unknown_backend_is_not_found(tiny_artifact, manifest):
    with pytest.raises(NotFoundError, match="choose one of: auto, onnxruntime"):
        create_backend("openvino", tiny_artifact, manifest, manifest.profiles[0])


def test_tensorrt_missing_is_one_typed_error_naming_the_extra(tiny_artifact, manifest, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now fails, as where it is absent
    with pytest.raises(BackendUnavailableError) as info:
        create_backend("tensorrt", tiny_artifact, manifest, manifest.profiles[0])
    message = str(info.value)
    assert "pip install 'mrl-toolkit[tensorrt]'" in message and "\n" not in message


def test_tensorrt_without_cuda_python_names_the_extra(tiny_artifact, manifest, monkeypatch):
    fake = type(sys)("tensorrt")
    fake.__version__ = TRT  # only the version is read before the CUDA check
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(
        BackendUnavailableError, match=r"cuda-python\) are not installed: pip install 'mrl-toolkit\[tensorrt\]'"
    ):
        create_backend("tensorrt", tiny_artifact, manifest, manifest.profiles[0])


def test_runtime_imports_no_torch_transformers_or_tensorrt():
    code = (
        "import sys, mrl.runtime, mrl.runtime.backends, mrl.runtime.engines, mrl.runtime.backends.gpu, "
        "mrl.runtime.backends.onnxruntime, mrl.runtime.backends.tensorrt, mrl.runtime.backends.torch\n"
        "heavy = ('torch', 'transformers', 'sentence_transformers', 'tensorrt', 'cuda')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
