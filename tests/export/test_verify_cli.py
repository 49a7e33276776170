"""What export stores for the acceptance test, and `mrl-export verify ARTIFACT`: one row per profile, exit 0 or 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from acceptance_helpers import copy_artifact, disagree

from mrl.export.artifact import ExportOptions, export_artifact
from mrl.export.cli import main
from mrl.export.parity import THRESHOLDS, validation_texts
from mrl.export.source import load_source
from mrl.runtime import load_manifest
from mrl.runtime.acceptance import AcceptanceTest
from mrl.runtime.machine import this_machine


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["verify", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_stores_the_texts_the_source_vectors_and_the_thresholds(tiny_artifact):
    manifest = load_manifest(tiny_artifact)
    assert manifest.acceptance is not None and manifest.acceptance.file == "acceptance.npz"
    assert (tiny_artifact / "acceptance.npz").stat().st_size < 64_000  # small: 21 texts and 21 vectors per depth
    test = AcceptanceTest.load(tiny_artifact, manifest.acceptance, manifest.full_dims)
    assert list(test.texts) == validation_texts() and test.prompt == ""
    assert list(test.references) == [None] and test.references[None].shape == (21, 32)
    assert test.sources == {None: "pytorch-sentence-transformers"}
    assert test.thresholds == {"fp32": THRESHOLDS["fp32"]}
    for p in manifest.profiles:  # the parity rows say where they were computed
        assert p.parity.machine == this_machine() and p.parity.machine.cpu
        assert p.ort_cpu is None or p.ort_cpu.parity.machine == this_machine()


def test_references_are_stored_per_depth(tiny_2d_artifact):
    manifest = load_manifest(tiny_2d_artifact)
    test = AcceptanceTest.load(tiny_2d_artifact, manifest.acceptance, manifest.full_dims)
    assert sorted(test.references, key=str) == [1, None]
    assert "hidden_states[1]" in test.sources[1]
    assert not (test.references[1] == test.references[None]).all()


def test_without_validation_there_is_nothing_to_store(tiny_st_dir, tmp_path):
    out = tmp_path / "unchecked"
    export_artifact(load_source(str(tiny_st_dir)), out, ExportOptions(dims=(8,), validate=False))
    assert load_manifest(out).acceptance is None and not (out / "acceptance.npz").exists()


def test_verify_prints_a_row_per_profile_and_exits_0(tiny_2d_artifact, capsys):
    code, out, err = run(capsys, tiny_2d_artifact)
    assert code == 0, err
    assert f"machine: {this_machine()}" in out
    rows = [line for line in out.splitlines() if re.match(r"\| (l1-)?d\d+-fp32 ", line)]
    assert len(rows) == 6
    for row in rows:
        assert "| onnxruntime-cpu [CPUExecutionProvider] |" in row and row.endswith("| pass |")
    assert "6 profiles checked" in out and "all pass" in out and err == ""


def test_verify_exits_2_with_a_line_per_failure(tiny_artifact, tmp_path, capsys):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    disagree(artifact)
    code, out, err = run(capsys, artifact, "--precision", "fp32", "--backend", "onnxruntime-cpu")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for line, name in zip(lines, ("d32-fp32", "d16-fp32", "d8-fp32"), strict=True):
        assert line.startswith(f"mrl-export verify: FAIL {name}: mean cosine 0.9"), line
        assert "needs min_cosine >= 0.9999" in line and "on onnxruntime-cpu [CPUExecutionProvider]" in line
    assert out.count("| FAIL |") == 3 and "3 failed" in out


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("acceptance", "carries no acceptance test"),
        ("sha256", "acceptance.npz does not match its sha256"),
        ("int8", "has no int8 profiles"),
        ("tensorrt", "cannot run here"),
    ],
)
def test_verify_refusals_are_one_line(tiny_artifact, tmp_path, capsys, change, words):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    argv = [artifact]
    if change == "acceptance":
        data = json.loads((artifact / "manifest.json").read_text())
        del data["acceptance"]
        (artifact / "manifest.json").write_text(json.dumps(data))
    elif change == "sha256":
        with open(artifact / "acceptance.npz", "ab") as f:
            f.write(b"\0")
    elif change == "int8":
        argv += ["--precision", "int8"]
    else:  # TensorRT is not installed here (and where it is, this artifact has no engines)
        argv += ["--backend", "tensorrt"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert words in line, line


def test_verify_usage_errors(capsys):
    code, _, err = run(capsys, "somewhere", "--precision", "fp64")
    assert code == 2 and "unknown precision 'fp64'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "somewhere", "--backend", "gpu")
    assert code == 2 and "invalid choice: 'gpu'" in err


def test_verify_leaves_logging_as_it_found_it(tiny_artifact, capsys):
    import logging

    ours = logging.getLogger("mrl")
    before = (ours.handlers[:], ours.propagate, ours.level)
    run(capsys, tiny_artifact)
    assert (ours.handlers[:], ours.propagate, ours.level) == before


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="no qemu-x86_64 (apt-get install qemu-user)")
def test_on_an_avx2_only_cpu_the_emulated_machine_is_checked_and_named(tiny_artifact):
    """Under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512 or VNNI): fp32 holds there, and the row says that CPU."""
    code = "import sys; from mrl.export.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code, "verify", str(tiny_artifact)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (machine,) = [line for line in done.stdout.splitlines() if line.startswith("machine: ")]
    assert re.search(r"\(avx2[;)]", machine), machine  # only AVX2, whatever the host has
    assert done.stdout.count("| pass |") == 3
