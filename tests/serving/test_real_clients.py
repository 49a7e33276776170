"""Real clients with their default settings against a real server (issue 20): LangChain's OpenAIEmbeddings and
the `openai` SDK work, or fail with a message that says what to change."""

from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest
import tiktoken
from langchain_openai import OpenAIEmbeddings
from serving_helpers import GatedModel, cosines, running, sample, sentences

from mrl.runtime import Embedder
from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import BatcherConfig


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}/v1"


def test_langchain_with_raw_texts_embeds_1500_texts_in_its_default_chunks_of_1000(tiny_artifact):
    """LangChain sends 1,000 texts a request by default; the server took at most 512."""
    model = GatedModel.open(tiny_artifact, BatcherConfig())
    texts = sentences(1500, seed=3)

    async def scenario():
        async with running([model], http_port=0) as server:
            embeddings = OpenAIEmbeddings(
                model="tiny-bert", base_url=base_url(server), api_key="unused", check_embedding_ctx_length=False
            )
            vectors = await asyncio.to_thread(embeddings.embed_documents, texts)
            ok = sample(server, "mrl_requests_total", {"model": "tiny-bert", "transport": "http", "outcome": "ok"})
            return vectors, ok

    vectors, requests = run(scenario())
    assert requests == 2  # 1,000 and 500
    got = np.asarray(vectors, dtype=np.float32)
    assert got.shape == (1500, 32) and cosines(got, Embedder.load(tiny_artifact).embed(texts)).min() >= 0.9999


def byte_level_encoding() -> tiktoken.Encoding:
    """A tiktoken encoding of one token per byte: tiktoken downloads its real BPE files, which this offline
    machine cannot reach, and LangChain's default path needs only token ids of some encoding."""
    return tiktoken.Encoding(
        name="bytes", pat_str=r"(?s).", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )


def test_langchains_default_token_ids_get_a_400_that_says_what_to_set(tiny_artifact, monkeypatch):
    """check_embedding_ctx_length=True (the default) sends tiktoken ids, which are not this model's ids."""
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda _name: byte_level_encoding())
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server:
            embeddings = OpenAIEmbeddings(model="tiny-bert", base_url=base_url(server), api_key="unused")
            with pytest.raises(openai.BadRequestError) as info:
                await asyncio.to_thread(embeddings.embed_documents, ["hello world"])
            return info.value

    error = run(scenario())
    assert error.body["param"] == "input"
    assert "check_embedding_ctx_length=False" in error.body["message"], error.body


def test_the_openai_sdk_cannot_get_int8_outputs_wrong(tiny_artifact):
    """The SDK asks for base64 unless told otherwise and decodes it as float32: with output_dtype int8 that
    returned garbage floats. Now refused, saying what works, and what it says works."""
    model = GatedModel.open(tiny_artifact)
    texts = ["how do I reset my password?", "a second text"]

    async def scenario():
        async with running([model], http_port=0) as server:
            client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused")
            with pytest.raises(openai.BadRequestError) as info:
                await client.embeddings.create(
                    model="tiny-bert", input=texts, dimensions=32, extra_body={"output_dtype": "int8"}
                )
            as_told = await client.embeddings.create(
                model="tiny-bert", input=texts, dimensions=32, extra_body={"encoding_format": "int8"}
            )
            floats = await client.embeddings.create(model="tiny-bert", input=texts, dimensions=32)
            return info.value, as_told, floats

    refused, as_told, floats = run(scenario())
    assert refused.body["param"] == "output_dtype"
    assert 'extra_body={"encoding_format": "int8"}' in refused.body["message"], refused.body
    embedder = Embedder.load(tiny_artifact)
    codes = np.asarray([d.embedding for d in as_told.data])
    want = embedder.embed(texts, dims=32, encoding="int8")
    assert codes.shape == want.shape and np.abs(codes - want).max() <= 1  # a value on a bucket's edge may move one
    got = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    assert cosines(got, embedder.embed(texts, dims=32)).min() >= 0.9999


def test_a_gateways_model_name_reaches_the_served_model_through_an_alias(tiny_artifact):
    """Gateways send OpenAI's model names: without an alias, text-embedding-3-small got 404."""
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        aliases = {"text-embedding-3-small": "tiny-bert"}
        async with running([model], http_port=0, model_aliases=aliases) as server:
            client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused")
            http = await client.embeddings.create(model="text-embedding-3-small", input=["hello"])
            async with AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
                grpc_vectors = await c.embed(["hello"], model="text-embedding-3-small", timeout=30)
            with pytest.raises(openai.NotFoundError) as info:
                await client.embeddings.create(model="text-embedding-3-large", input=["hello"])
            return http, grpc_vectors, info.value

    http, grpc_vectors, missing = run(scenario())
    assert http.model == "tiny-bert" and len(http.data[0].embedding) == 32 and grpc_vectors.shape == (1, 32)
    assert "text-embedding-3-small" in missing.body["message"]  # the aliases are listed with the names


def test_auto_truncate_cuts_long_texts_unless_the_request_says_otherwise(tiny_artifact):
    long = "word " * 200  # over the tiny model's 48 tokens

    async def scenario(auto: bool):
        async with running([GatedModel.open(tiny_artifact)], http_port=0, auto_truncate=auto) as server:
            client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused")
            outcomes = []
            for extra in ({}, {"truncate": False}, {"truncate": True}):
                try:
                    await client.embeddings.create(model="tiny-bert", input=[long], extra_body=extra)
                    outcomes.append("ok")
                except openai.BadRequestError as e:
                    outcomes.append(e.body["param"])
            return outcomes

    assert run(scenario(auto=False)) == ["input", "input", "ok"]  # as OpenAI's API: a 400 by default
    assert run(scenario(auto=True)) == ["ok", "input", "ok"]  # the server's default; the request's own wins


def test_langchain_asks_for_truncation_per_request_through_model_kwargs(tiny_artifact):
    """What docs/hardening.md tells LangChain users whose chunks run over the model's max length."""
    model = GatedModel.open(tiny_artifact)
    long = "word " * 200

    async def scenario():
        async with running([model], http_port=0) as server:
            embeddings = OpenAIEmbeddings(
                model="tiny-bert",
                base_url=base_url(server),
                api_key="unused",
                check_embedding_ctx_length=False,
                model_kwargs={"extra_body": {"truncate": True}},
            )
            return await asyncio.to_thread(embeddings.embed_documents, [long, "short"])

    vectors = run(scenario())
    want = Embedder.load(tiny_artifact).embed([long, "short"], truncate=True)
    assert cosines(np.asarray(vectors, dtype=np.float32), want).min() >= 0.9999
