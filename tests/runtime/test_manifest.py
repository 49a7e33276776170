"""Artifact integrity: tampering, newer schemas and malformed manifests give typed errors."""

from __future__ import annotations

import json
import shutil

import pytest

from mrl.runtime import ArtifactError, Embedder, IntegrityError, SchemaVersionError, load_manifest


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    return copy


def test_manifest_records_what_the_issue_asks(tiny_artifact):
    m = load_manifest(tiny_artifact)
    assert m.schema_version == 2 and m.full_dims == 32 and m.pooling == "mean"
    assert m.source["kind"] == "sentence-transformers" and len(m.source["sha256"]) == 64
    assert m.tokenizer.max_length == 48 and m.tokenizer.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert m.prompts == {"query": "query: ", "document": "passage: "}
    assert [(p.dims, p.precision) for p in m.profiles] == [(32, "fp32"), (16, "fp32"), (8, "fp32")]
    for p in m.profiles:
        assert p.parity.passed and p.parity.min_cosine >= 0.9999 and p.parity.n_texts > 10
        assert p.weights == "weights-fp32.bin"


def test_tampered_graph_is_refused(artifact):
    graph = artifact / "d16-fp32.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=r"d16-fp32\.onnx does not match its sha256"):
        Embedder.load(artifact)


def test_tampered_weights_are_refused(artifact):
    weights = artifact / "weights-fp32.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"weights-fp32\.bin"):
        load_manifest(artifact)


def test_missing_graph_is_refused(artifact):
    (artifact / "d8-fp32.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_manifest(artifact)


def test_newer_schema_is_refused(artifact):
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match="upgrade mrl-toolkit"):
        load_manifest(artifact)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"schema_version": 1}'])
def test_malformed_manifest_is_refused(artifact, text):
    (artifact / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError):
        load_manifest(artifact)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not an mrl-toolkit artifact"):
        load_manifest(tmp_path)


def test_schema_1_manifests_still_load(artifact):
    """Written before ONNX Runtime CPU graphs and the int8 record existed: they load with those empty."""
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    for key in ("ort_cpu", "quantization"):
        data.pop(key, None)
    for profile in data["profiles"]:
        profile.pop("ort_cpu", None)
    path.write_text(json.dumps(data))
    m = load_manifest(artifact)
    assert m.schema_version == 1 and m.ort_cpu == () and m.quantization is None
    assert all(p.ort_cpu is None for p in m.profiles)
    assert Embedder.load(artifact).embed(["hello"]).shape == (1, 32)


def test_tampered_cpu_graph_is_refused(tiny_st_dir, tmp_path):
    from tinymodels import export

    out = export(tiny_st_dir, tmp_path / "a", (16,), ("fp32",), ort_cpu="optimized")
    graph = out / "d16-fp32.ort-cpu.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=r"d16-fp32\.ort-cpu\.onnx does not match its sha256"):
        load_manifest(out)
