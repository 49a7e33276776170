"""The Embedder's depth: `layers` picks the profiles that keep that many layers; others are refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mrl.runtime import Embedder, EmbedOptions, LayersError, OutputSpec, load_manifest

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
    default = embedder.plan()
    assert (default.layers, default.graph.name, default.outputs[0].dims) == (3, "d32-fp32", 32)
    # Full depth has one spelling inside (`Profile.layers` None) and two at the door: unset, or the total.
    assert embedder.plan(EmbedOptions(layers=3)).graph is default.graph
    shallow = embedder.plan(EmbedOptions(layers=1))
    assert (shallow.layers, shallow.graph.name) == (1, "l1-d32-fp32")


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


def test_every_dims_at_a_depth_is_cut_from_its_widest_graph(embedder):
    plan = embedder.plan(EmbedOptions(outputs=(OutputSpec(dims=8), OutputSpec(dims=9)), layers=1))
    assert plan.graph.name == "l1-d32-fp32"  # one graph per precision and depth
    eight, nine = embedder.run_plan(plan, TEXTS)
    np.testing.assert_allclose(eight, embedder.embed(TEXTS, dims=8, layers=1), atol=1e-6)
    assert nine.shape == (3, 9)


def test_an_artifact_of_truncated_profiles_only_defaults_to_its_deepest(tiny_2d_artifact, tmp_path):
    def keep_layer_1(data):
        data["profiles"] = [p for p in data["profiles"] if p["layers"] == 1]

    embedder = Embedder.load(_edited(tiny_2d_artifact, tmp_path, keep_layer_1))
    assert embedder.plan().layers == 1 and embedder.layers_served == [1]
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
