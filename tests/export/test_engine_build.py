"""`mrl-export build-engine`: flags, planning, manifest entries, and the errors where TensorRT is missing.

The build itself needs TensorRT and a GPU: those tests are marked and skip with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mrl.export import engine_cli
from mrl.export.engine import (
    EngineBuildOptions,
    buildable_profiles,
    current_entry,
    engine_name,
    merge_engine,
    parse_span,
    plan_for,
    timing_cache_path,
)
from mrl.export.errors import ExportError
from mrl.runtime.backends.gpu import GpuInfo
from mrl.runtime.engines import cache_key
from mrl.runtime.errors import InvalidInputError, NotFoundError
from mrl.runtime.manifest import Engine, ShapeRange, Span, load_manifest, sha256_file

H100 = GpuInfo(name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A10 = GpuInfo(name="NVIDIA A10", compute_capability="8.6")
TRT_MISSING = importlib.util.find_spec("tensorrt") is None


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    """A private copy of the tiny artifact (the session one is shared and read-only)."""
    return shutil.copytree(tiny_artifact, tmp_path / "tiny")


@pytest.fixture(scope="module")
def manifest(tiny_artifact):
    return load_manifest(tiny_artifact)


# --- flags and planning -----------------------------------------------------------------------


def test_parse_span_reads_min_opt_max_and_a_single_value():
    assert parse_span("1:32:128", "--batch") == Span(1, 32, 128)
    assert parse_span("64", "--seq") == Span(64, 64, 64)


@pytest.mark.parametrize(
    "text, message",
    [("1:32", "MIN:OPT:MAX"), ("a:b:c", "whole numbers"), ("0:1:2", "1 <= min"), ("8:4:16", "1 <= min <= opt")],
)
def test_parse_span_explains_bad_flags(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_span(text, "--seq")


def test_plan_defaults_to_the_model_max_length(manifest):
    # The tiny model takes 48 tokens: one range from 1 to 48, batch 1:32:128.
    assert plan_for(manifest, EngineBuildOptions()) == (ShapeRange(batch=Span(1, 32, 128), seq=Span(1, 48, 48)),)
    flags = EngineBuildOptions(batch=Span(1, 8, 16), seqs=(Span(4, 8, 512),))
    assert plan_for(manifest, flags) == (
        ShapeRange(batch=Span(1, 8, 16), seq=Span(4, 8, 8)),
        ShapeRange(batch=Span(1, 1, 16), seq=Span(9, 48, 48)),  # 8 x 8 tokens at opt, as 1 x 48 is nearest
    )


def test_profiles_default_to_fp32_and_fp16_and_int8_is_refused_with_the_reason(manifest):
    assert [p.name for p in buildable_profiles(manifest, ())] == ["d32-fp32", "d16-fp32", "d8-fp32"]
    assert [p.name for p in buildable_profiles(manifest, ("d8-fp32",))] == ["d8-fp32"]
    with pytest.raises(NotFoundError, match="no profile 'd64-fp32'"):
        buildable_profiles(manifest, ("d64-fp32",))
    int8 = dataclasses.replace(manifest.profiles[0], name="d32-int8", precision="int8")
    mixed = dataclasses.replace(manifest, profiles=(*manifest.profiles, int8))
    assert "d32-int8" not in [p.name for p in buildable_profiles(mixed, ())]
    with pytest.raises(ExportError, match="MatMulInteger"):
        buildable_profiles(mixed, ("d32-int8",))
    with pytest.raises(ExportError, match="no fp32 or fp16 profile"):
        buildable_profiles(dataclasses.replace(manifest, profiles=(int8,)), ())


# --- manifest entries -------------------------------------------------------------------------


def _entry(manifest, profile, gpu=H100, version="10.13.3", ranges=None) -> Engine:
    ranges = ranges or plan_for(manifest, EngineBuildOptions())
    key = cache_key(gpu, version, profile.sha256, None, ranges)
    return Engine(
        profile=profile.name,
        file=engine_name(profile, key),
        sha256="0" * 64,
        cache_key=key,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=version,
        onnx_sha256=profile.sha256,
        weights_sha256=None,
        shape_ranges=ranges,
    )


def test_a_new_engine_replaces_the_same_profile_gpu_and_tensorrt_only(manifest):
    first, second = manifest.profiles[:2]
    old = _entry(manifest, first)
    other_gpu = _entry(manifest, first, gpu=A10)
    other_profile = _entry(manifest, second)
    new = _entry(manifest, first, ranges=(ShapeRange(batch=Span(1, 1, 1), seq=Span(1, 8, 48)),))
    engines, dropped = merge_engine((old, other_gpu, other_profile), new)
    assert engines == (other_gpu, other_profile, new)
    assert dropped == [old.file]
    assert merge_engine((old,), old) == ((old,), [])  # same key, same file: nothing to delete


def test_engine_and_timing_cache_names(manifest, tmp_path):
    profile = manifest.profiles[0]
    assert engine_name(profile, "ab" * 32) == f"engines/{profile.name}-abababababababab.engine"
    assert (
        timing_cache_path(tmp_path, H100, "10.13.3")
        == tmp_path / "engines/timing-nvidia-h100-80gb-hbm3-sm90-trt10.13.3.cache"
    )


def test_an_engine_is_kept_only_while_its_file_matches(artifact):
    manifest = load_manifest(artifact)
    profile = manifest.profiles[0]
    entry = _entry(manifest, profile)
    path = artifact / entry.file
    path.parent.mkdir()
    path.write_bytes(b"engine bytes")
    entry = dataclasses.replace(entry, sha256=sha256_file(path))
    listed = dataclasses.replace(manifest, engines=(entry,))
    assert current_entry(artifact, listed, profile, entry.cache_key) == entry
    assert current_entry(artifact, listed, profile, "f" * 64) is None
    path.write_bytes(b"tampered")
    assert current_entry(artifact, listed, profile, entry.cache_key) is None


# --- the CLI ----------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_without_tensorrt(artifact, capsys):
    code = engine_cli.main([str(artifact), "--dry-run", "--batch", "1:8:16", "--seq", "1:16:48"])
    out = capsys.readouterr().out
    assert code == 0
    assert "0: batch 1:8:16 x seq 1:16:16" in out and "1: batch 1:2:16 x seq 17:48:48" in out
    assert "profiles: d32-fp32 (fp32), d16-fp32 (fp32), d8-fp32 (fp32)" in out
    assert not (artifact / "engines").exists()


def test_missing_tensorrt_is_one_line_and_exit_2(artifact, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails, as where it is absent
    before = sorted(p.name for p in artifact.iterdir())
    code = engine_cli.main([str(artifact), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mrl-export build-engine: error: TensorRT is not installed")
    assert "pip install 'mrl-toolkit[tensorrt]'" in err
    assert sorted(p.name for p in artifact.iterdir()) == before  # nothing written


@pytest.mark.skipif(not TRT_MISSING, reason="TensorRT is installed here; this checks the CLI where it is not")
def test_mrl_export_build_engine_without_tensorrt_end_to_end(artifact):
    done = subprocess.run(
        [sys.executable, "-m", "mrl.export.cli", "build-engine", str(artifact)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("pip install 'mrl-toolkit[tensorrt]'")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--profiles", "d99-fp32"], "no profile 'd99-fp32'"),
        (["--seq", "100:120:200"], "starts above the model's max length of 48"),
        (["--batch", "4:2:8"], "1 <= min <= opt <= max"),
    ],
)
def test_bad_requests_are_one_line_and_exit_2(artifact, capsys, argv, message):
    assert _run(engine_cli.main, [str(artifact), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _run(main, argv) -> int:
    """The exit code of a CLI entry point, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_a_listed_engine_whose_file_is_gone_does_not_block_a_rebuild(artifact, capsys):
    manifest = load_manifest(artifact)
    dataclasses.replace(manifest, engines=(_entry(manifest, manifest.profiles[0]),)).save(artifact)
    assert engine_cli.main([str(artifact), "--dry-run"]) == 0
    capsys.readouterr()


# --- on a GPU with TensorRT -------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_engines_run_them_and_keep_them(artifact):
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'mrl-toolkit[tensorrt]')")
    from mrl.runtime.backends.gpu import detect_gpu

    gpu, how = detect_gpu(0)
    if gpu is None or how != "cuda-python":
        pytest.skip(f"needs a CUDA GPU and cuda-python ({how})")
    from mrl.export.engine import build_engines
    from mrl.runtime import Embedder

    options = EngineBuildOptions(batch=Span(1, 4, 16), seqs=(Span(1, 8, 48),))
    manifest, results = build_engines(artifact, load_manifest(artifact), options)
    assert [r.status for r in results] == ["built"] * 3
    assert all(e.parity is not None and e.parity.passed for e in manifest.engines)
    assert load_manifest(artifact, verify=True).engines == manifest.engines
    _, again = build_engines(artifact, load_manifest(artifact), options)
    assert [r.status for r in again] == ["up to date"] * 3
    texts = ["one sentence", "another, much longer sentence " * 4]
    trt = Embedder.load(artifact, "tensorrt")
    cpu = Embedder.load(artifact, "onnxruntime-cpu")
    for dims in (8, 32):
        assert (
            np.sum(trt.embed(texts, dims, truncate=True) * cpu.embed(texts, dims, truncate=True), axis=1).min()
            >= 0.9999
        )
    assert Embedder.load(artifact).backend_name == "tensorrt"


class FakeBuilderConfig:
    """A TensorRT builder config as far as the timing cache goes: it cannot parse bytes it did not write."""

    def __init__(self, accepts=True):
        self.accepts, self.cache = accepts, "unset"

    def create_timing_cache(self, data):
        return "empty-cache" if data == b"" else ("cache" if data.startswith(b"TRTC") else None)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache is None:  # as TensorRT's bindings do for None
            raise TypeError("set_timing_cache(): incompatible function arguments")
        self.cache = cache
        return self.accepts or cache == "empty-cache"


@pytest.mark.parametrize(
    "data, accepts, used, cache",
    [
        (None, True, False, "empty-cache"),  # no file yet
        (b"TRTC good", True, True, "cache"),
        (b"\x00 corrupt", True, False, "empty-cache"),  # unparseable: TensorRT returns None
        (b"TRTC other gpu", False, False, "empty-cache"),  # refused: another GPU or TensorRT
    ],
)
def test_a_missing_corrupt_or_foreign_timing_cache_means_an_empty_one(tmp_path, data, accepts, used, cache):
    from mrl.export.engine import use_timing_cache

    path = tmp_path / "timing.cache"
    if data is not None:
        path.write_bytes(data)
    config = FakeBuilderConfig(accepts)
    assert use_timing_cache(config, path) is used
    assert config.cache == cache
