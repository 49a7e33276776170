"""Cohere's embed API (`POST /v2/embed`) with the real `cohere` SDK: every embedding type from one forward pass,
input types mapped to the model's prompts, truncation from either end, errors the SDK raises as they should."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import cohere
import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings
from serving_helpers import GatedModel, cosines, running

from mrl.runtime import Embedder, EmbedOptions, OutputSpec
from mrl.serving.cohere_protocol import CohereError, parse_request, prompt_for

TEXTS = ["how do I reset my password?", "the weather is lovely in spring", "ok"]
TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def with_sdk(model, calls, token=None):
    """Run `calls(client)` with the SDK in a thread, against a real server over `model` on 127.0.0.1."""

    async def scenario():
        async with running([model], http_port=0, auth_token=token) as server:
            client = cohere.ClientV2(base_url=f"http://127.0.0.1:{server.http_port}", api_key=token or "none")
            return await asyncio.to_thread(calls, client)

    return run(scenario())


def test_every_embedding_type_from_one_call_matches_the_offline_embedder(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    def calls(client):
        return client.embed(
            model=model.name, texts=TEXTS, input_type="search_document", embedding_types=TYPES, output_dimension=16
        )

    reply = with_sdk(model, calls)
    assert sum(len(b) for b in model.batches) == len(TEXTS), "one forward pass for every type"
    assert reply.texts == TEXTS and reply.meta.billed_units.input_tokens > len(TEXTS)
    offline = Embedder.load(tiny_artifact)
    floats = offline.embed(TEXTS, dims=16, prompt_name="document")  # search_document -> the model's "document"
    got = reply.embeddings
    assert cosines(np.array(got.float_), floats).min() >= 0.99999
    decoded = np.frombuffer(b"".join(base64.b64decode(v) for v in got.base64), dtype="<f4").reshape(3, 16)
    np.testing.assert_allclose(decoded, np.array(got.float_), atol=1e-7)
    # The packed types are sentence-transformers' quantize_embeddings exactly; the integer types use the
    # ranges calibrated at export (within one step of quantize_embeddings given the same ranges).
    for kind in ("binary", "ubinary"):
        np.testing.assert_array_equal(np.array(getattr(got, kind)), quantize_embeddings(floats, kind))
    plan = offline.plan(EmbedOptions(outputs=(OutputSpec(dims=16, encoding="int8"),)))
    ranges = plan.outputs[0].ranges
    for kind in ("int8", "uint8"):
        want = quantize_embeddings(floats, kind, ranges=ranges).astype(np.int64)
        assert np.abs(np.array(getattr(got, kind)) - want).max() <= 1
        np.testing.assert_array_equal(
            np.array(getattr(got, kind)), offline.embed(TEXTS, dims=16, prompt_name="document", encoding=kind)
        )


def test_input_types_pick_the_models_prompts_and_truncation_follows_truncate(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    long = " ".join(f"w{i}" for i in range(200))  # over the tiny model's 48 tokens

    def calls(client):
        query = client.embed(model=model.name, texts=TEXTS, input_type="search_query", embedding_types=["float"])
        start = client.embed(model=model.name, texts=[long], input_type="search_query", truncate="START")
        end = client.embed(model=model.name, texts=[long], input_type="search_query")  # END: Cohere's default
        with pytest.raises(cohere.errors.BadRequestError) as refused:
            client.embed(model=model.name, texts=[long], input_type="search_query", truncate="NONE")
        with pytest.raises(cohere.errors.BadRequestError) as no_prompt:
            client.embed(model=model.name, texts=TEXTS, input_type="classification")
        return query, start, end, refused.value, no_prompt.value

    query, start, end, refused, no_prompt = with_sdk(model, calls)
    offline = Embedder.load(tiny_artifact)
    assert cosines(np.array(query.embeddings.float_), offline.embed(TEXTS, prompt_name="query")).min() >= 0.99999
    options = EmbedOptions(prompt_name="query", truncate=True, truncation_direction="left")
    (left,) = offline.run_plan(offline.plan(options), [long])
    assert cosines(np.array(start.embeddings.float_), left).min() >= 0.99999
    right = offline.embed([long], prompt_name="query", truncate=True)
    assert cosines(np.array(end.embeddings.float_), right).min() >= 0.99999
    assert "max of 48 tokens" in str(refused.body)
    assert "classification" in str(no_prompt.body) and "document, query" in str(no_prompt.body)


def test_a_model_without_prompts_embeds_every_input_type_as_is(tiny_artifact, tmp_path):
    artifact = tmp_path / "no-prompts"
    shutil.copytree(tiny_artifact, artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["prompts"], manifest["default_prompt"] = {}, None
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    model = GatedModel.open(artifact)

    def calls(client):
        return [client.embed(model=model.name, texts=TEXTS, input_type=t) for t in ("classification", "search_query")]

    replies = with_sdk(model, calls)
    plain = Embedder.load(tiny_artifact).embed(TEXTS)  # no prompt at all
    for reply in replies:
        assert cosines(np.array(reply.embeddings.float_), plain).min() >= 0.99999


def test_the_sdk_gets_its_own_errors_for_tokens_models_and_types(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    def calls(client):
        errors = []
        bad = cohere.ClientV2(base_url=client._client_wrapper.get_base_url(), api_key="wrong")
        for call, kind in (
            (
                lambda: bad.embed(model=model.name, texts=TEXTS, input_type="search_query"),
                cohere.errors.UnauthorizedError,
            ),
            (lambda: client.embed(model="nope", texts=TEXTS, input_type="search_query"), cohere.errors.NotFoundError),
            (
                lambda: client.embed(model=model.name, texts=TEXTS, input_type="search_query", output_dimension=33),
                cohere.errors.BadRequestError,
            ),
            (
                lambda: client.embed(model=model.name, texts=TEXTS, input_type="search_query", embedding_types=["x"]),
                cohere.errors.BadRequestError,
            ),
        ):
            with pytest.raises(kind) as caught:
                call()
            errors.append(caught.value)
        return errors

    unauthorized, unknown, too_wide, bad_type = with_sdk(model, calls, token="s3cret")
    assert "bearer token" in unauthorized.body["message"]  # Cohere's error shape on Cohere's route
    assert "no model named 'nope'" in str(unknown.body)
    assert "above the largest profile" in str(too_wide.body)
    assert "unknown embedding type 'x'" in str(bad_type.body)
    assert not model.batches


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{", "not valid JSON"),
        (b'{"texts": []}', "non-empty list"),
        (b'{"texts": ["a"], "images": ["data:,"]}', "texts only"),
        (b'{"texts": ["a"], "max_tokens": 8}', "max_tokens is not supported"),
        (b'{"texts": ["a"], "input_type": "image"}', "input_type must be one of"),
        (b'{"texts": ["a"], "input_type": ["x"]}', "input_type must be one of"),
        (b'{"texts": ["a"], "truncate": "MIDDLE"}', "NONE, START or END"),
        (b'{"texts": ["a"], "embedding_types": [{}]}', "unknown embedding type"),
        (b'{"texts": ["a"], "output_dimension": "16"}', "output_dimension must be a number"),
        (b'{"texts": ["a"], "colour": 1}', "unknown field 'colour'"),
    ],
)
def test_bad_bodies_say_what_to_fix(body, words):
    with pytest.raises(CohereError, match=words):
        parse_request(body)


def test_counts_are_checked_before_each_value_is_read():
    """As on OpenAI's route: a list over its limit is refused by its length, before its items are read."""
    with pytest.raises(CohereError, match=r"5 inputs in one request; this server takes at most 4"):
        parse_request(b'{"texts": ["a", "b", "c", "d", 5]}', max_inputs=4)
    with pytest.raises(CohereError, match=r"lists each type once: 7 is too many"):
        parse_request(b'{"texts": ["a"], "embedding_types": ["float", "int8", "int8", "int8", "int8", "int8", 1]}')
    with pytest.raises(CohereError, match=r"more JSON values than a request of at most 4 texts"):
        parse_request(b'{"texts": ["a"], "model": ' + b"[]," * 200 + b"[]}", max_inputs=4)


def test_input_types_map_to_prompts_by_the_documented_rule():
    assert prompt_for("search_query", {}) is None  # a model without prompts: texts as they are
    assert prompt_for("search_query", {"query": "q: ", "document": "d: "}) == "query"
    assert prompt_for("search_document", {"passage": "p: "}) == "passage"
    assert prompt_for("search_query", {"search_query": "sq: ", "query": "q: "}) == "search_query"  # exact name first
    with pytest.raises(CohereError, match=r"looked for clustering; it has document, query"):
        prompt_for("clustering", {"query": "q: ", "document": "d: "})
