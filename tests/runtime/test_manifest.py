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
    assert m.schema_version == 1 and m.full_dims == 32 and m.pooling == "mean"
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


def test_a_swapped_tokenizer_is_refused(artifact):
    (artifact / "tokenizer.json").write_text((artifact / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNK2]"'))
    with pytest.raises(IntegrityError, match=r"tokenizer\.json does not match its sha256"):
        Embedder.load(artifact)


def edit(artifact, change) -> None:
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["profiles"][0].update(dims="abc"), r"profiles\[0\]\.dims must be a whole number, not 'abc'"),
        (lambda d: d["profiles"][1].update(dims=16.5), r"profiles\[1\]\.dims must be a whole number"),
        (lambda d: d["tokenizer"].update(max_length=None), r"tokenizer\.max_length must be a whole number, not None"),
        (lambda d: d.update(prompts={"query": 3}), r"prompts\.query must be a string"),
        (lambda d: d.update(trained_dims="64"), r"trained_dims must be a list of whole numbers, not '64'"),
        (lambda d: d["profiles"][0].pop("file"), r"profiles\[0\] lacks the field 'file'"),
        (
            lambda d: d["profiles"][0].update(future=3),
            r"profiles\[0\] has fields this toolkit does not know \(future\)",
        ),
        (lambda d: d["profiles"][0].update(file="../../etc/passwd"), "outside the artifact"),
        (lambda d: d["profiles"][0].update(precision="fp8"), "unknown precision 'fp8'"),
        (lambda d: d["profiles"][0].update(dims=64), "outside 1..32"),
    ],
)
def test_manifest_fields_are_checked_at_load_naming_the_field(artifact, change, message):
    edit(artifact, change)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(artifact, verify=False)


def test_an_artifact_from_before_tokenizer_hashing_still_loads_with_a_warning(artifact, caplog):
    edit(artifact, lambda d: d["tokenizer"].pop("sha256"))
    assert load_manifest(artifact).tokenizer.sha256 is None
    assert "not verified" in caplog.text


def test_manifests_without_cpu_graphs_still_load(artifact):
    """Written before ONNX Runtime CPU graphs and the int8 record existed: they load with those empty."""
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
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


# Values of the right type that make no sense: each refused at load, naming the field (issue 20).
NONSENSE = [
    (lambda d: d["tokenizer"].update(max_length=0), r"tokenizer\.max_length must be at least 1, not 0"),
    (lambda d: d["tokenizer"].update(max_length=-1), r"tokenizer\.max_length must be at least 1, not -1"),
    (lambda d: d["tokenizer"].update(max_length=10**9), r"tokenizer\.max_length 1000000000 is more than any model"),
    (lambda d: d["tokenizer"].update(inputs=["foo"]), r"tokenizer\.inputs names 'foo'.*input_ids, attention_mask"),
    (lambda d: d["tokenizer"].update(inputs=["attention_mask"]), r"tokenizer\.inputs must include input_ids"),
    (lambda d: d["tokenizer"].update(padding_side="middle"), r"tokenizer\.padding_side must be left or right"),
    (lambda d: d["tokenizer"].update(pad_token_id=-1), r"tokenizer\.pad_token_id must be 0 or more, not -1"),
    (lambda d: d.update(default_prompt="nope"), r"default_prompt 'nope' names no prompt; prompts: document, query"),
    (lambda d: d.update(full_dims=0), r"full_dims must be at least 1, not 0"),
    (lambda d: d.update(profiles=[]), r"profiles lists none"),
    (lambda d: d["profiles"][1].update(name=d["profiles"][0]["name"]), r"profiles name 'd32-fp32' twice"),
    (lambda d: d.update(trained_dims=[0, 16]), r"trained_dims holds 0, outside 1\.\.32"),
    (lambda d: d.update(total_layers=0), r"total_layers must be at least 1, not 0"),
    (lambda d: d.update(total_layers=2, trained_layers=[3]), r"trained_layers holds 3, outside 1\.\.2"),
    (lambda d: d["weights"][0].update(bytes=-5), r"weights\[0\]\.bytes must be 0 or more, not -5"),
    (lambda d: d["profiles"][0].update(layers=0), r"profiles\[0\]\.layers must be at least 1, not 0"),
    (lambda d: d.update(schema_version=0), r"schema_version must be at least 1, not 0"),
]


@pytest.mark.parametrize(("change", "message"), NONSENSE)
def test_manifest_values_that_make_no_sense_are_refused_naming_the_field(artifact, change, message):
    edit(artifact, change)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(artifact, verify=False)


def test_calibration_ranges_must_be_finite_and_ordered(artifact):
    def swap(d):
        ranges = d["calibration"]["ranges"]["d32-fp32"]
        ranges["min"], ranges["max"] = ranges["max"], ranges["min"]

    edit(artifact, swap)
    with pytest.raises(ArtifactError, match=r"calibration\.ranges\.d32-fp32: a minimum is above its maximum"):
        load_manifest(artifact, verify=False)
    edit(artifact, lambda d: d["calibration"]["ranges"]["d32-fp32"]["min"].__setitem__(0, float("nan")))
    with pytest.raises(ArtifactError, match=r"calibration\.ranges\.d32-fp32 holds a value that is not a finite"):
        load_manifest(artifact, verify=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # The tiny BERT's post-processor adds [CLS] and [SEP]: 2 tokens leave no room for any text.
        (lambda d: d["tokenizer"].update(max_length=2), r"tokenizer\.max_length 2 leaves no room for text"),
        (lambda d: d["tokenizer"].update(pad_token_id=10**9), r"tokenizer\.pad_token_id 1000000000 is outside the"),
        (lambda d: d["tokenizer"].update(pad_token_id=5), r"tokenizer\.pad_token_id 5 is not the id of its pad_token"),
        # A prompt of 48 tokens or more leaves no room for text: texts were refused, or cut away whole (the model
        # embedded the prompt alone), with the artifact served as if it were fine.
        (lambda d: d["prompts"].update(query="query " * 60), r"prompts\.query fills tokenizer\.max_length \(48"),
        (lambda d: d.update(prompts={"q": "q " * 10**6}, default_prompt="q"), r"prompts\.q fills tokenizer"),
    ],
)
def test_tokenizer_settings_are_checked_against_the_tokenizer_at_load(artifact, change, message):
    edit(artifact, change)
    with pytest.raises(ArtifactError, match=message):
        Embedder.load(artifact)
