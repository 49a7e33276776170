"""The Embedder against the sentence-transformers model it was exported from."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from mrl.runtime import DimsError, Embedder, InputTooLongError, UnknownPromptError, choose_profile
from mrl.runtime.embedder import truncate_normalize

TEXTS = [
    "A short one.",
    "Matryoshka embeddings nest smaller embeddings inside larger ones.",
    "The quick brown fox jumps over the lazy dog " * 8,  # longer than the tiny model's 48 tokens
    "ok",
]


@pytest.fixture(scope="module")
def embedder(tiny_artifact):
    return Embedder.load(tiny_artifact)


@pytest.fixture(scope="module")
def reference(tiny_st_dir):
    return SentenceTransformer(str(tiny_st_dir), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("dims", [8, 12, 16, 32])
def test_matches_sentence_transformers_truncated(embedder, reference, dims):
    got = embedder.embed(TEXTS, dims=dims, truncate=True)
    want = reference.encode(TEXTS, truncate_dim=dims, normalize_embeddings=True)
    assert got.shape == (len(TEXTS), dims) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cosines(got, want).min() >= 0.9999


def test_default_dims_is_the_largest_profile(embedder):
    assert embedder.embed(["hello"]).shape == (1, 32)


def test_order_is_kept_across_length_sorted_batches(embedder):
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(23)]
    together = embedder.embed(texts, dims=16, batch_size=4)
    alone = np.concatenate([embedder.embed([t], dims=16) for t in texts])
    assert _cosines(together, alone).min() >= 0.99999


def test_prompt_is_prepended_like_sentence_transformers(embedder, reference):
    got = embedder.embed(TEXTS, dims=16, prompt_name="query", truncate=True)
    want = reference.encode(TEXTS, prompt_name="query", truncate_dim=16, normalize_embeddings=True)
    assert _cosines(got, want).min() >= 0.9999
    # and the prompt really changes the vector
    assert _cosines(got, embedder.embed(TEXTS, dims=16, truncate=True)).min() < 0.9999


def test_unknown_prompt_names_the_known_ones(embedder):
    with pytest.raises(UnknownPromptError, match="document, query"):
        embedder.embed(["x"], prompt_name="passage")


@pytest.mark.parametrize("dims", [0, -3, 33, 1.5, "8", True])
def test_bad_dims_are_refused(embedder, dims):
    with pytest.raises(DimsError):
        embedder.embed(["x"], dims=dims)


def test_long_input_is_refused_unless_truncation_is_asked_for(embedder):
    with pytest.raises(InputTooLongError, match=r"input 1 .* max of 48"):
        embedder.embed(["fine", "word " * 100])
    assert embedder.embed(["word " * 100], truncate=True).shape == (1, 32)


def test_a_string_instead_of_a_list_is_refused(embedder):
    with pytest.raises(ValueError, match="list of strings"):
        embedder.embed("one string")


def test_choose_profile_takes_the_smallest_larger(embedder):
    assert choose_profile(embedder.profiles, 9).dims == 16
    assert choose_profile(embedder.profiles, 16).dims == 16
    assert choose_profile(embedder.profiles, 1).dims == 8


def test_run_encoded_gives_each_row_its_own_dims(embedder):
    texts = ["a short one", "a somewhat longer sentence to embed", "ok"]
    rows = embedder.run_encoded(embedder.tokenizer.encode(texts), [8, 32, 12])
    assert [r.shape for r in rows] == [(8,), (32,), (12,)]
    for text, row in zip(texts, rows, strict=True):
        alone = embedder.embed([text], dims=row.shape[0])[0]
        np.testing.assert_allclose(row, alone, atol=1e-6)


def test_resolve_dims_decides_the_default_once(embedder):
    assert embedder.resolve_dims(None) == 32
    assert embedder.resolve_dims(9) == 9
    with pytest.raises(DimsError, match="above the largest"):
        embedder.resolve_dims(33)


def test_truncate_normalize_renormalises():
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate_normalize(v, 2), [[0.6, 0.8]], rtol=1e-6)


def test_reports_the_providers_it_really_runs_on(embedder):
    embedder.embed(["x"], dims=8)
    assert "CPUExecutionProvider" in embedder.providers


def test_every_dims_runs_the_widest_graph_and_matches_its_own(tiny_artifact):
    """One graph per precision in memory: narrower dims are sliced from the widest and re-normalised."""
    from mrl.runtime.backends.onnxruntime import OnnxRuntimeBackend

    embedder = Embedder.load(tiny_artifact, "onnxruntime-cpu")
    feed = embedder.tokenizer.pad(embedder.tokenizer.encode(TEXTS, truncate=True))
    for dims in (8, 16):
        own = OnnxRuntimeBackend(tiny_artifact / f"d{dims}-fp32.onnx", ["CPUExecutionProvider"]).run(feed)
        sliced = np.stack(embedder.run_encoded(embedder.tokenizer.encode(TEXTS, truncate=True), [dims] * len(TEXTS)))
        np.testing.assert_allclose(sliced, own, atol=1e-6)
    assert embedder.profile_for(8).dims == 32
    assert list(embedder._backends) == ["d32-fp32"]  # one session, whatever dims were asked for
    with pytest.raises(DimsError, match="above the largest profile"):
        embedder.profile_for(33)
    embedder.close()
