"""Calibration ranges for int8/uint8 outputs: at export, and `mrl-export calibrate` on an existing artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mrl.export.cli import main
from mrl.runtime import Embedder, EmbedOptions, OutputSpec
from mrl.runtime.encodings import calibration_ranges

TEXTS = ["how do I reset my password", "the weather is lovely in spring", "shipping takes three days", "ok"]


def ranges(embedder: Embedder, encoding: str, dims: int):
    """The calibrated ranges a request for `encoding` at `dims` is encoded with."""
    return embedder.plan(EmbedOptions(outputs=(OutputSpec(dims=dims, encoding=encoding),))).outputs[0].ranges


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def uncalibrated(tiny_artifact, tmp_path):
    """A copy of the tiny artifact whose manifest predates calibration."""
    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    data = json.loads((art / "manifest.json").read_text())
    del data["calibration"]
    (art / "manifest.json").write_text(json.dumps(data))
    return art


def test_calibrate_rewrites_the_manifest_with_ranges_over_the_texts(capsys, uncalibrated, tmp_path):
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    code, out, _ = run(capsys, "calibrate", uncalibrated, "--texts", texts)
    assert code == 0 and "d32-fp32, d16-fp32, d8-fp32" in out and "4 texts" in out
    embedder = Embedder.load(uncalibrated)  # every file still matches its sha256
    calibration = embedder.manifest.calibration
    assert calibration.texts == "corpus.txt" and calibration.n_texts == 4
    for dims in (8, 16, 32):
        want = calibration_ranges(embedder.embed(TEXTS, dims=dims))
        np.testing.assert_array_equal(ranges(embedder, "int8", dims), want)
    assert not list(uncalibrated.glob("*.tmp"))


@pytest.mark.parametrize(
    ("setup", "needle"),
    [("missing", "cannot read calibration texts"), ("empty", "holds no texts"), ("no-artifact", "does not exist")],
)
def test_calibrate_refusals_are_one_line_and_change_nothing(capsys, uncalibrated, tmp_path, setup, needle):
    texts = tmp_path / "corpus.txt"
    if setup != "missing":
        texts.write_text("\n \n" if setup == "empty" else "a text\n")
    artifact = tmp_path / "nowhere" if setup == "no-artifact" else uncalibrated
    before = (uncalibrated / "manifest.json").read_text()
    code, _, err = run(capsys, "calibrate", artifact, "--texts", texts)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert (uncalibrated / "manifest.json").read_text() == before


def test_calibrate_needs_texts(capsys, uncalibrated):
    code, _, err = run(capsys, "calibrate", uncalibrated)
    assert code == 2 and "--texts" in err and len(err.strip().splitlines()) == 1


def test_export_calibrates_on_the_given_texts(capsys, tiny_st_dir, tmp_path):
    texts = tmp_path / "mine.txt"
    texts.write_text("\n".join(TEXTS))
    code, _, err = run(capsys, tiny_st_dir, "--dims", "8", "--calibration-texts", texts, "--out", tmp_path / "a", "-q")
    assert code == 0, err
    embedder = Embedder.load(tmp_path / "a")
    assert embedder.manifest.calibration.texts == "mine.txt"
    np.testing.assert_array_equal(ranges(embedder, "uint8", 8), calibration_ranges(embedder.embed(TEXTS, dims=8)))
    code, _, err = run(
        capsys, tiny_st_dir, "--dims", "8", "--calibration-texts", tmp_path / "no.txt", "--out", tmp_path / "b"
    )
    assert code == 2 and "cannot read calibration texts" in err and not (tmp_path / "b").exists()
