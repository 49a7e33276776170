"""The Embedder against the sentence-transformers model it was exported from."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from mrl.runtime import (
    DimsError,
    Embedder,
    EmbedOptions,
    EncodingError,
    InputTooLongError,
    InvalidInputError,
    LayersError,
    OutputSpec,
    UnknownPromptError,
    truncate_normalize,
)

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


def test_a_plan_decides_graph_dims_encoding_prompt_and_depth_once(embedder):
    plan = embedder.plan()
    assert (plan.graph.name, plan.layers, plan.prompt, plan.truncate) == ("d32-fp32", 2, "", False)
    assert [(o.dims, o.encoding) for o in plan.outputs] == [(32, "float32")]
    asked = EmbedOptions(
        outputs=(OutputSpec(dims=9), OutputSpec(dims=16, encoding="ubinary")), prompt_name="query", truncate=True
    )
    plan = embedder.plan(asked)
    # The widest graph runs whatever the dims: one copy of the weights in memory.
    assert plan.graph.name == "d32-fp32" and plan.prompt == embedder.manifest.prompts["query"] and plan.truncate
    assert [(o.dims, o.encoding, o.width) for o in plan.outputs] == [(9, "float32", 9), (16, "ubinary", 2)]


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        (EmbedOptions(layers=5), LayersError, r"layers 5 is not served; served layers: 2 \(the model has 2\)"),
        (EmbedOptions(outputs=(OutputSpec(dims=33),)), DimsError, r"above the largest profile \(32\)"),
        (EmbedOptions(outputs=(OutputSpec(dims=0),)), DimsError, "at least 1"),
        (EmbedOptions(prompt_name="passage"), UnknownPromptError, "document, query"),
        (EmbedOptions(outputs=(OutputSpec(encoding="int4"),)), EncodingError, "unknown encoding 'int4'"),
        (EmbedOptions(outputs=()), InvalidInputError, "1 to 8 outputs"),
        (EmbedOptions(outputs=(OutputSpec(),) * 9), InvalidInputError, "1 to 8 outputs"),
        # The first mistake in the documented order is the one reported: layers, dims, prompt, encoding.
        (EmbedOptions(outputs=(OutputSpec(dims=99, encoding="int4"),), prompt_name="x"), DimsError, "above"),
        (EmbedOptions(outputs=(OutputSpec(encoding="int4"),), prompt_name="x"), UnknownPromptError, "prompts"),
    ],
)
def test_a_plan_refuses_the_first_mistake_naming_the_field(embedder, options, error, words):
    with pytest.raises(error, match=words) as info:
        embedder.plan(options)
    fields = {LayersError: "layers", DimsError: "dims", UnknownPromptError: "prompt_name", EncodingError: "encoding"}
    assert info.value.field == fields.get(error, "outputs")


def test_run_plan_gives_each_output_from_one_forward_pass(embedder):
    texts = ["a short one", "a somewhat longer sentence to embed", "ok"]
    plan = embedder.plan(EmbedOptions(outputs=(OutputSpec(dims=8), OutputSpec(dims=32), OutputSpec(dims=12))))
    outputs = embedder.run_plan(plan, texts)
    assert [o.shape for o in outputs] == [(3, 8), (3, 32), (3, 12)]
    for dims, got in zip((8, 32, 12), outputs, strict=True):
        np.testing.assert_allclose(got, embedder.embed(texts, dims=dims), atol=1e-6)


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
        np.testing.assert_allclose(embedder.embed(TEXTS, dims=dims, truncate=True), own, atol=1e-6)
        assert embedder.plan(EmbedOptions(outputs=(OutputSpec(dims=dims),))).graph.dims == 32
    embedder.close()
