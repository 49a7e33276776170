"""Several outputs of every text from one forward pass, and truncation from either end, on both doors."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import grpc
import numpy as np
import openai
import pytest
from serving_helpers import GatedModel, running, wait_until

from mrl.proto import embedder_pb2 as pb
from mrl.runtime import Embedder, EmbedOptions, OutputSpec
from mrl.runtime.errors import InvalidInputError
from mrl.serving.client import AsyncEmbedClient, build_request, to_arrays
from mrl.serving.grpc_protocol import to_query

TEXTS = ["how do I reset my password?", "the weather is lovely in spring", "ok"]
# The index code (8 dims packed in one byte), a calibrated int8 vector, and the full float vector.
OUTPUTS = [(8, "ubinary"), (16, "int8"), (None, "float32")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def offline_outputs(artifact, texts, outputs=OUTPUTS, **options):
    embedder = Embedder.load(artifact)
    return [embedder.embed(texts, dims=d, encoding=e, **options) for d, e in outputs]


def test_grpc_outputs_come_from_one_forward_pass_and_match_each_output_alone(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            response = await client.embed_response(TEXTS, outputs=OUTPUTS)
            arrays = await client.embed_outputs(TEXTS, OUTPUTS, prompt_name="query")
            return response, arrays

    response, with_prompt = run(scenario())
    # Each text ran once per request, whatever the number of outputs.
    assert sum(len(b) for b in model.batches) == 2 * len(TEXTS)
    assert not response.embeddings and not response.dimensions  # the single-output fields stay unset
    assert [(o.dimensions, o.encoding) for o in response.outputs] == [
        (8, pb.ENCODING_UBINARY),
        (16, pb.ENCODING_INT8),
        (32, pb.ENCODING_FLOAT32),
    ]
    for got, want in zip(to_arrays(response), offline_outputs(tiny_artifact, TEXTS), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6)
    for got, want in zip(with_prompt, offline_outputs(tiny_artifact, TEXTS, prompt_name="query"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_http_outputs_as_numbers_and_as_base64(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    asked = [{"dimensions": 8, "output_dtype": "ubinary"}, {"dimensions": 16, "output_dtype": "int8"}, {}]

    async def scenario():
        async with running([model], http_port=0) as server, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            replies = []
            for form in ("float", "base64"):
                body = {"input": TEXTS, "outputs": asked, "encoding_format": form}
                async with session.post(url, json=body) as r:
                    replies.append((r.status, await r.json()))
            return replies

    (status, numbers), (status64, packed) = run(scenario())
    assert status == status64 == 200, (numbers, packed)
    described = [{"dimensions": 8, "output_dtype": "ubinary"}, {"dimensions": 16, "output_dtype": "int8"}]
    assert numbers["outputs"] == [*described, {"dimensions": 32, "output_dtype": "float32"}]
    assert "embedding" not in numbers["data"][0] and "dimensions" not in numbers
    want = offline_outputs(tiny_artifact, TEXTS)
    for k, expected in enumerate(want):
        got = np.array([item["embeddings"][k] for item in numbers["data"]], dtype=expected.dtype)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        raw = [base64.b64decode(item["embeddings"][k]) for item in packed["data"]]
        got = np.frombuffer(b"".join(raw), dtype=expected.dtype.newbyteorder("<")).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"outputs": []}, "outputs", "non-empty list"),
        ({"outputs": [{"dims": 8}]}, "outputs", "dimensions and output_dtype"),
        ({"outputs": [{}], "dimensions": 8}, "outputs", "not both"),
        ({"outputs": [{}], "encoding_format": "int8"}, "encoding_format", "give each output its output_dtype"),
        ({"outputs": [{"dimensions": 33}]}, "dimensions", "above the largest profile"),
        ({"outputs": [{}] * 9}, "outputs", "1 to 8 outputs"),
        ({"outputs": [{"output_dtype": "int4"}]}, "output_dtype", "unknown output_dtype"),
        ({"truncation_direction": "middle"}, "truncation_direction", "left (cut a text's start) or right"),
    ],
)
def test_bad_outputs_and_truncation_over_http_say_what_to_fix(tiny_artifact, body, param, words):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            async with session.post(url, json={"input": ["a text"], **body}) as r:
                return r.status, await r.json()

    status, reply = run(scenario())
    assert status == 400 and reply["error"]["param"] == param and words in reply["error"]["message"], reply
    assert not model.batches


def test_grpc_refuses_outputs_beside_dimensions_and_unknown_directions(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    both = build_request(["a"], outputs=[(8, "float32")])
    both.dimensions = 8
    unknown = build_request(["a"])
    unknown.truncation_direction = 7

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            errors = []
            for request in (both, unknown):
                responses = [r async for r in client.embed_stream([request])]
                errors.append(responses[0].error)
            return errors

    both_error, unknown_error = run(scenario())
    assert both_error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not both" in both_error.message
    assert unknown_error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "TRUNCATION_DIRECTION_LEFT" in unknown_error.message


LONG = " ".join(f"w{i}" for i in range(200))  # over the tiny model's 48 tokens; its ends differ


def test_truncation_from_the_left_keeps_a_long_texts_end_on_both_doors(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    offline = Embedder.load(tiny_artifact)
    left = offline.plan(EmbedOptions(outputs=(OutputSpec(dims=16),), truncate=True, truncation_direction="left"))
    (want_left,) = offline.run_plan(left, [LONG])
    want_right = offline.embed([LONG], dims=16, truncate=True)

    async def scenario():
        async with (
            running([model], http_port=0) as server,
            AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=60) as client,
            aiohttp.ClientSession() as session,
        ):
            over_grpc = await client.embed([LONG], dims=16, truncate=True, truncation_direction="left")
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            body = {"input": [LONG], "dimensions": 16, "truncate": True, "truncation_direction": "Left"}
            async with session.post(url, data=json.dumps(body)) as r:
                over_http = np.array([d["embedding"] for d in (await r.json())["data"]], dtype=np.float32)
            await wait_until(lambda: len(model.batches) == 2, "both requests to run")
            return over_grpc, over_http

    over_grpc, over_http = run(scenario())
    np.testing.assert_allclose(over_grpc, want_left, atol=1e-6)
    np.testing.assert_allclose(over_http, want_left, atol=1e-6)
    assert float((want_left @ want_right.T)[0, 0]) < 0.99  # the other end really was kept
    assert model.batches[0][0].truncated


def test_left_truncation_of_a_huge_text_tokenises_only_its_end_and_gives_the_same_ids(tiny_artifact):
    tokenizer = Embedder.load(tiny_artifact).tokenizer
    huge = "word " * 400_000 + LONG  # 2 MB: only about what the model can read is tokenised
    (cut,) = tokenizer.encode([huge], truncate=True, direction="left")
    (whole,) = tokenizer.encode([LONG], truncate=True, direction="left")
    assert cut.ids == whole.ids and cut.truncated


def test_the_openai_sdk_reads_outputs_from_model_extra_and_never_misreads_them_as_floats(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    asked = {"outputs": [{"dimensions": 8, "output_dtype": "ubinary"}, {"output_dtype": "int8"}]}

    def calls(url):
        client = openai.OpenAI(base_url=url, api_key="none")
        as_floats = client.embeddings.create(model=model.name, input=TEXTS, encoding_format="float", extra_body=asked)
        as_default = client.embeddings.create(model=model.name, input=TEXTS, extra_body=asked)  # SDK asks base64
        return as_floats, as_default

    async def scenario():
        async with running([model], http_port=0) as server:
            return await asyncio.to_thread(calls, f"http://127.0.0.1:{server.http_port}/v1")

    as_floats, as_default = run(scenario())
    codes, vectors = offline_outputs(tiny_artifact, TEXTS, [(8, "ubinary"), (None, "int8")])
    got = [item.model_extra["embeddings"] for item in as_floats.data]
    assert [g[0] for g in got] == codes.tolist() and [g[1] for g in got] == vectors.tolist()
    assert all(item.embedding is None for item in as_default.data)  # nothing misread as float32


def test_grpc_counts_outputs_and_inputs_before_reading_any():
    """16 MiB holds 8 million empty outputs: refused by their count, before each became a Python object (16 s)."""
    with pytest.raises(InvalidInputError, match="1 to 8 outputs, not 100000") as refused:
        to_query(pb.EmbedRequest(inputs=["a"], outputs=[pb.OutputSpec()] * 100_000), None)
    assert refused.value.field == "outputs"
    with pytest.raises(InvalidInputError, match="3000 inputs in one request") as refused:
        to_query(pb.EmbedRequest(inputs=[""] * 3000), None, max_inputs=2048)
    assert refused.value.field == "inputs"
