"""The Embedder's depth: `layers` picks the profiles that keep that many layers; others are refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mrl.runtime import Embedder, LayersError, choose_profile, load_manifest

TEXTS = ["A short one.", "Matryoshka embeddings nest smaller embeddings inside larger ones.", "ok"]


@pytest.fixture(scope="module")
def embedder(tiny_2d_artifact):
    return Embedder.load(tiny_2d_artifact)


def _edited(artifact, tmp_path, edit):
    """A copy of the artifact whose manifest.json went through `edit(data)`."""
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_layers_served_and_the_default(embedder):
    assert embedder.layers_served == [1, 3]
    assert embedder.default_layers is None and embedder.default_dims == 32
    assert embedder.resolve_layers(None) is None and embedder.resolve_layers(3) is None
    assert embedder.resolve_layers(1) == 1


def test_full_depth_is_the_default_and_named_either_way(embedder):
    unset = embedder.embed(TEXTS, dims=16)
    np.testing.assert_array_equal(unset, embedder.embed(TEXTS, dims=16, layers=3))
    shallow = embedder.embed(TEXTS, dims=16, layers=1)
    assert shallow.shape == (3, 16) and np.sum(shallow * unset, axis=1).max() < 0.99
    np.testing.assert_allclose(np.linalg.norm(shallow, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("layers", [2, 4, 0, -1, True, 1.0, "1"])
def test_layers_no_profile_runs_are_refused_with_the_ones_served(embedder, layers):
    with pytest.raises(LayersError) as info:
        embedder.embed(TEXTS, layers=layers)
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        assert "served layers: 1, 3 (the model has 3)" in str(info.value)


def test_run_encoded_slices_mixed_dims_at_one_depth(embedder):
    encoded = embedder.tokenizer.encode(TEXTS)
    rows = embedder.run_encoded(encoded, [8, 32, 16], layers=1)
    for row, dims, text in zip(rows, [8, 32, 16], TEXTS, strict=True):
        np.testing.assert_allclose(row, embedder.embed([text], dims=dims, layers=1)[0], atol=1e-6)


def test_choose_profile_by_depth_and_dims(embedder):
    assert choose_profile(embedder.profiles, 12, 1).name == "l1-d16-fp32"
    assert choose_profile(embedder.profiles, 12).name == "d16-fp32"
    with pytest.raises(LayersError):
        choose_profile(embedder.profiles, 8, 2)
    # The graph that runs is the widest at that depth (one per precision and depth); 9 dims are sliced from it.
    widest = max((p for p in embedder.profiles if p.layers == 1), key=lambda p: p.dims)
    assert embedder.profile_for(9, layers=1) == widest and widest.name.startswith("l1-")


def test_an_artifact_of_truncated_profiles_only_defaults_to_its_deepest(tiny_2d_artifact, tmp_path):
    def keep_layer_1(data):
        data["profiles"] = [p for p in data["profiles"] if p["layers"] == 1]

    embedder = Embedder.load(_edited(tiny_2d_artifact, tmp_path, keep_layer_1))
    assert embedder.default_layers == 1 and embedder.layers_served == [1]
    np.testing.assert_array_equal(embedder.embed(TEXTS, dims=8), embedder.embed(TEXTS, dims=8, layers=1))
    with pytest.raises(LayersError, match="served layers: 1 "):
        embedder.embed(TEXTS, layers=3)
    embedder.warmup()


def test_a_manifest_from_before_layers_still_loads(tiny_2d_artifact, tmp_path):
    def as_before(data):
        data.pop("total_layers"), data.pop("trained_layers")
        data["profiles"] = [p for p in data["profiles"] if p.pop("layers") is None]

    artifact = _edited(tiny_2d_artifact, tmp_path, as_before)
    manifest = load_manifest(artifact)
    assert manifest.total_layers is None and all(p.layers is None for p in manifest.profiles)
    embedder = Embedder.load(artifact)
    assert embedder.embed(TEXTS, dims=8).shape == (3, 8) and embedder.layers_served == [None]
    with pytest.raises(LayersError, match="runs its full depth only"):
        embedder.embed(TEXTS, layers=3)


def test_manifest_records_layers(tiny_2d_artifact):
    manifest = load_manifest(tiny_2d_artifact)
    assert manifest.total_layers == 3 and manifest.trained_layers is None and manifest.layers == [1, 3]
    assert {manifest.depth(p) for p in manifest.profiles} == {1, 3}
    data = json.loads((tiny_2d_artifact / "manifest.json").read_text())
    assert data["total_layers"] == 3 and {p["layers"] for p in data["profiles"]} == {None, 1}
