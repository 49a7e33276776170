"""Output encodings against sentence-transformers' quantize_embeddings, and the Embedder's use of them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from mrl.runtime import Embedder, EmbedOptions, InputTooLongError, OutputSpec
from mrl.runtime import encodings as enc
from mrl.runtime.errors import ArtifactError, EncodingError


def unit(n: int, dims: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_each_encoding_matches_quantize_embeddings(encoding):
    calibration, vectors = unit(200, 64, 0), unit(50, 64, 1)  # vectors reach outside the calibrated ranges
    ranges = enc.calibration_ranges(calibration)
    got = enc.encode(vectors, encoding, ranges)
    assert got.dtype == enc.dtype_of(encoding) and got.shape == (50, enc.width(encoding, 64))
    if encoding == "float16":
        np.testing.assert_array_equal(got, vectors.astype(np.float16))
        return
    want = quantize_embeddings(vectors, encoding, ranges=ranges)
    assert want.dtype == got.dtype
    if encoding in enc.CALIBRATED:
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # within one step
        assert (got == want).mean() > 0.999
    else:
        np.testing.assert_array_equal(got, want)


def test_ranges_are_quantize_embeddings_own():
    calibration, vectors = unit(100, 16, 2), unit(10, 16, 3)
    ranges = enc.calibration_ranges(calibration)
    np.testing.assert_array_equal(ranges, np.stack([calibration.min(0), calibration.max(0)]))
    want = quantize_embeddings(vectors, "int8", calibration_embeddings=calibration)
    np.testing.assert_array_equal(enc.encode(vectors, "int8", ranges), want)


def test_binary_layout_by_hand():
    v = np.array([[1, -1, 1, 1, -1, -1, -1, -1, 1]], dtype=np.float32)  # bits 1011 0000 | 1000 0000
    assert enc.encode(v, "ubinary").tolist() == [[0b10110000, 0b10000000]]
    assert enc.encode(v, "binary").tolist() == [[0b10110000 - 128, 0b10000000 - 128]]
    for name in enc.PACKED:
        assert enc.unpack_bits(enc.encode(v, name), name, 9).tolist() == [[1, 0, 1, 1, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize(
    ("encoding", "dims", "nbytes"),
    [("float32", 384, 1536), ("float16", 384, 768), ("int8", 64, 64), ("uint8", 64, 64), ("ubinary", 65, 9)],
)
def test_bytes_per_vector(encoding, dims, nbytes):
    assert enc.bytes_per_vector(encoding, dims) == nbytes
    assert enc.encode(unit(2, dims, 4), encoding, enc.calibration_ranges(unit(9, dims, 5)))[0].nbytes == nbytes


def test_refusals_say_what_to_do():
    with pytest.raises(EncodingError, match="choose from float32, float16, int8, uint8, binary, ubinary"):
        enc.check_encoding("bf16")
    with pytest.raises(EncodingError, match="needs per-dimension ranges"):
        enc.encode(unit(2, 8, 0), "uint8")
    with pytest.raises(EncodingError, match=r"need \(2, 8\)"):
        enc.encode(unit(2, 8, 0), "int8", np.zeros((2, 4)))


@pytest.fixture(scope="module")
def embedder(tiny_artifact):
    return Embedder.load(tiny_artifact)


def test_export_calibrates_every_profile(embedder):
    calibration = embedder.manifest.calibration
    assert calibration is not None and calibration.texts == "validation texts" and calibration.n_texts > 10
    for profile in embedder.profiles:
        r = calibration.ranges[profile.name]
        assert len(r.min) == len(r.max) == profile.dims and all(a < b for a, b in zip(r.min, r.max, strict=True))
    assert embedder.encodings == list(enc.ENCODINGS)


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_embedder_encodes_with_the_manifest_ranges(embedder, encoding):
    texts = ["one short text", "and another, a little longer than the first one"]
    floats = embedder.embed(texts, dims=16)
    got = embedder.embed(texts, dims=16, encoding=encoding)
    ranges = embedder.plan(EmbedOptions(outputs=(OutputSpec(dims=16, encoding=encoding),))).outputs[0].ranges
    assert (ranges is None) == (encoding not in enc.CALIBRATED)
    np.testing.assert_array_equal(got, enc.encode(floats, encoding, ranges))


def test_int8_between_profiles_is_refused_before_tokenising(embedder):
    with pytest.raises(EncodingError, match="ask for dims 8, 16, 32"):
        embedder.embed(["word " * 500], dims=12, encoding="int8")  # too long, but the encoding is checked first
    assert embedder.embed(["word"], dims=12, encoding="ubinary").shape == (1, 2)
    with pytest.raises(InputTooLongError):
        embedder.embed(["word " * 500], dims=12, encoding="ubinary")


def test_old_manifest_without_calibration_loads_and_refuses_int8(tiny_artifact, tmp_path):
    old = shutil.copytree(tiny_artifact, tmp_path / "old")
    data = json.loads((old / "manifest.json").read_text())
    del data["calibration"]
    (old / "manifest.json").write_text(json.dumps(data))
    embedder = Embedder.load(old)
    assert embedder.manifest.calibration is None
    assert embedder.encodings == ["float32", "float16", "binary", "ubinary"]
    with pytest.raises(EncodingError, match="mrl-export calibrate ARTIFACT --texts FILE"):
        embedder.embed(["hello"], encoding="uint8")
    assert embedder.embed(["hello"], encoding="binary").dtype == np.int8


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: c["ranges"]["d8-fp32"].update(min=c["ranges"]["d8-fp32"]["min"][:4]), "as many maxima as minima"),
        (lambda c: c["ranges"].update({"d16-fp32": c["ranges"]["d8-fp32"]}), "does not match a profile's dims"),
        (lambda c: c["ranges"]["d8-fp32"].update(max="high"), "must be a list of numbers"),
    ],
)
def test_malformed_calibration_is_refused_at_load(tiny_artifact, tmp_path, edit, words):
    art = shutil.copytree(tiny_artifact, tmp_path / "bad")
    data = json.loads((art / "manifest.json").read_text())
    edit(data["calibration"])
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=words):
        Embedder.load(art)
