"""The acceptance test an artifact carries, run by `Embedder.load` on this machine: passes, refusals, old artifacts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from acceptance_helpers import copy_artifact, disagree
from tinymodels import export, save_sentence_transformer

from mrl.runtime import AcceptanceError, ArtifactError, Embedder, IntegrityError, load_manifest
from mrl.runtime.acceptance import check
from mrl.runtime.machine import this_machine
from mrl.runtime.manifest import sha256_file


@pytest.fixture(scope="module")
def deep_int8(tmp_path_factory):
    """A 3-layer tiny BERT whose layers move the vectors (init_std 0.2), at layers 1 and 3, fp32 and int8."""
    root = tmp_path_factory.mktemp("acceptance")
    model = save_sentence_transformer(root / "model", layers=3, init_std=0.2)
    return export(model, root / "art", (8, 16, 32), ("fp32", "int8"), layers=(1, 3))


def test_load_checks_every_served_dims_and_passes_here(tiny_artifact, caplog):
    with caplog.at_level(logging.INFO, logger="mrl.runtime.acceptance"):
        embedder = Embedder.load(tiny_artifact)
    assert "acceptance test of" in caplog.text and "passed: 3 fp32 profiles" in caplog.text
    verdict = check(embedder)
    embedder.close()
    assert verdict.checked and verdict.passed and verdict.machine == this_machine()
    assert [(c.profile, c.dims) for c in verdict.checks] == [("d32-fp32", 32), ("d16-fp32", 16), ("d8-fp32", 8)]
    assert verdict.backend == "onnxruntime-cpu" and verdict.providers == ("CPUExecutionProvider",)
    for c in verdict.checks:
        assert c.parity.n_texts == 21 and c.parity.min_cosine >= 0.9999 and c.parity.machine == this_machine()


def test_on_the_exporting_machine_it_repeats_the_exports_parity(deep_int8):
    """Same texts, same batches, same graph: the numbers the manifest recorded, so any change is the machine's."""
    manifest = load_manifest(deep_int8)
    for precision in ("fp32", "int8"):
        embedder = Embedder.load(deep_int8, precision=precision)
        verdict = check(embedder)
        assert {c.layers for c in verdict.checks} == {1, 3}
        for c in verdict.checks:
            profile = next(p for p in manifest.profiles if p.name == c.profile)
            recorded = profile.ort_cpu.parity if profile.ort_cpu else profile.parity  # the graph ORT's CPU runs
            assert c.parity.min_cosine == pytest.approx(recorded.min_cosine, abs=2e-6), c.profile
            assert c.parity.mean_cosine == pytest.approx(recorded.mean_cosine, abs=2e-6), c.profile
        if precision == "int8":  # not trivially exact on this model
            assert min(c.parity.min_cosine for c in verdict.checks) < 0.9999
        embedder.close()


def test_a_machine_that_disagrees_is_refused_with_the_numbers(tiny_artifact, tmp_path):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    disagree(artifact)
    with pytest.raises(AcceptanceError) as caught:
        Embedder.load(artifact)
    message = str(caught.value)
    assert "\n" not in message
    machine = this_machine()
    for words in ("d32-fp32: mean cosine 0.9", "d8-fp32", "needs min_cosine >= 0.9999", "onnxruntime-cpu"):
        assert words in message, message
    for words in ("[CPUExecutionProvider]", f"CPU {machine.cpu} (", *machine.cpu_flags, "acceptance=False"):
        assert words in message, message
    embedder = Embedder.load(artifact, acceptance=False)
    assert embedder.embed(["still loads when asked"], dims=8).shape == (1, 8)
    embedder.close()


def test_a_manifest_edit_that_changes_the_vectors_is_caught(tiny_artifact, tmp_path):
    """Manifest fields are not hashed: a BERT (absolute positions) told to pad on the left computes other vectors."""
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    data = json.loads((artifact / "manifest.json").read_text())
    data["tokenizer"]["padding_side"] = "left"
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(AcceptanceError, match=r"d32-fp32: mean cosine 0\.9\d+, min 0\.\d+;"):
        Embedder.load(artifact)


def test_only_the_depth_that_disagrees_is_named(deep_int8, tmp_path):
    artifact = copy_artifact(deep_int8, tmp_path / "a")
    disagree(artifact, depths=(1,))
    with pytest.raises(AcceptanceError) as caught:
        Embedder.load(artifact, precision="int8")
    message = str(caught.value)
    assert "l1-d32-int8" in message and "l1-d8-int8" in message and "needs mean_cosine >= 0.99" in message
    assert "d32-int8: mean" not in message.replace("l1-d32-int8", "")  # full depth (3 layers) still agrees
    embedder = Embedder.load(artifact, precision="int8", acceptance=False)
    assert {c.profile for c in check(embedder).failures} == {"l1-d32-int8", "l1-d16-int8", "l1-d8-int8"}
    embedder.close()


def test_a_changed_acceptance_file_is_an_integrity_error(tiny_artifact, tmp_path):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    path = artifact / load_manifest(artifact).acceptance.file
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=r"acceptance\.npz does not match its sha256"):
        Embedder.load(artifact)
    path.unlink()
    with pytest.raises(IntegrityError, match=r"acceptance\.npz is listed in the manifest but missing"):
        load_manifest(artifact)


def test_an_artifact_without_one_loads_and_says_nothing_was_checked(tiny_artifact, tmp_path, caplog):
    """As artifacts written before acceptance tests (and parity rows without machines) are."""
    artifact = copy_artifact(tiny_artifact, tmp_path / "old")
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    (artifact / data.pop("acceptance")["file"]).unlink()
    for profile in data["profiles"]:
        for graph in (profile, profile.get("ort_cpu") or {}):
            if graph.get("parity"):
                del graph["parity"]["machine"]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="mrl.runtime.acceptance"):
        embedder = Embedder.load(artifact)
    assert "carries no acceptance test" in caplog.text and "nothing can check" in caplog.text
    verdict = check(embedder)
    assert not verdict.checked and not verdict.passed and not verdict.failures
    assert embedder.embed(["an old artifact"]).shape == (1, 32)
    embedder.close()


def _rewrite(artifact, **arrays) -> None:
    """Replace the acceptance file's entries and re-hash it in the manifest."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    path = artifact / manifest["acceptance"]["file"]
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files}
    np.savez_compressed(path, **{**entries, **arrays})
    manifest["acceptance"]["sha256"] = sha256_file(path)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_a_malformed_acceptance_file_is_refused_naming_it(tiny_artifact, tmp_path):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    _rewrite(artifact, reference_full=np.zeros((21, 16), dtype=np.float32))
    with pytest.raises(ArtifactError, match=r"acceptance\.npz: references at full must be 21 x 32"):
        Embedder.load(artifact)
    meta = {"format": 99, "texts": ["a text"], "prompt": "", "thresholds": {}, "sources": {}}
    _rewrite(artifact, meta=np.array(json.dumps(meta)))
    with pytest.raises(ArtifactError, match=r"newer mrl-toolkit .* upgrade"):
        Embedder.load(artifact)
    _rewrite(artifact, meta=np.array("not json"))
    with pytest.raises(ArtifactError, match="meta is not JSON"):
        Embedder.load(artifact)


def test_an_acceptance_file_outside_the_artifact_is_refused(tiny_artifact, tmp_path):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    path = artifact / "manifest.json"
    data = json.loads(path.read_text())
    data["acceptance"]["file"] = "../elsewhere.npz"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        load_manifest(artifact, verify=False)


def test_the_torch_backend_is_checked_too(tiny_artifact, tmp_path):
    """The source model in PyTorch computes the references themselves: it passes; told otherwise, it is refused."""
    pytest.importorskip("sentence_transformers")
    embedder = Embedder.load(tiny_artifact, "torch", device="cpu")
    verdict = check(embedder)
    embedder.close()  # frees the shared source model (other tests count on it being freed)
    assert verdict.passed and verdict.backend == "torch" and len(verdict.checks) == 3
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    disagree(artifact)
    with pytest.raises(AcceptanceError, match=r"on torch \["):
        Embedder.load(artifact, "torch", device="cpu")


def test_more_dims_than_one_plan_takes_are_all_checked(tiny_st_dir, tmp_path):
    """Nine dims at one depth: more outputs than one request plan allows (8), so they are cut in two plans."""
    artifact = export(tiny_st_dir, tmp_path / "nine", (2, *range(4, 33, 4)))
    embedder = Embedder.load(artifact)
    verdict = check(embedder)
    embedder.close()
    assert sorted(c.dims for c in verdict.checks) == [2, 4, 8, 12, 16, 20, 24, 28, 32] and verdict.passed
