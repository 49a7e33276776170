"""The OpenAI-compatible HTTP front end on a real server on 127.0.0.1: errors, batching with gRPC, lifecycle,
auth and TLS, the real `openai` client and curl."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl

import aiohttp
import numpy as np
import openai
import pytest
from serving_helpers import GatedModel, cosines, running, sample, self_signed, wait_until

from mrl.runtime import Embedder
from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import BatcherConfig, RequestLimits, TlsConfig
from mrl.serving.core import ServingState


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def call(session: aiohttp.ClientSession, method: str, url: str, body=None, headers=None):
    """(status, headers, parsed JSON) of one request; `body` as bytes, or an object sent as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with session.request(method, url, data=data, headers=headers) as r:
        return r.status, r.headers, json.loads(await r.read())


# (body, extra headers, status, error code, words the message must hold)
BAD_REQUESTS = [
    (b"{oops", {}, 400, "invalid_argument", "not valid JSON"),
    (b'{"input": [101, 2023, 102]}', {}, 400, "invalid_argument", "token-id arrays are not supported"),
    (b'{"input": ["a", 3]}', {}, 400, "invalid_argument", "input[1] must be a string"),
    (b'{"input": "a", "dimensions": "16"}', {}, 400, "invalid_argument", "whole number"),
    (b'{"input": "a", "dimension": 16}', {}, 400, "invalid_argument", "unknown field 'dimension'"),
    (b'{"input": "a", "encoding_format": "int4"}', {}, 400, "invalid_argument", "choose from float, base64"),
    (b'{"input": ""}', {}, 400, "invalid_argument", "input 0 is an empty string"),
    (b'{"input": ["a", "b", "c", "d", "e"]}', {}, 400, "invalid_argument", "at most 4"),
    (b'{"input": "a", "dimensions": 33}', {}, 400, "invalid_argument", "above the largest profile"),
    (b'{"input": "a", "prompt_name": "nope"}', {}, 400, "invalid_argument", "unknown prompt name"),
    (b'{"input": "a", "dimensions": 12, "encoding_format": "int8"}', {}, 400, "invalid_argument", "calibrated"),
    (json.dumps({"input": "word " * 200}).encode(), {}, 400, "invalid_argument", "truncation"),
    (b'{"input": "a", "model": "nope"}', {}, 404, "not_found", "no model named 'nope'"),
    (json.dumps({"input": ["x" * 5000]}).encode(), {}, 413, "too_large", "over this server's limit of 4096 bytes"),
    (b'{"input": "a"}', {"X-Request-Timeout": "soon"}, 400, "invalid_argument", "X-Request-Timeout"),
]


def test_every_bad_request_gets_an_openai_error_that_says_what_to_fix(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    limits = RequestLimits(max_inputs_per_request=4, max_message_bytes=4096)

    async def scenario():
        async with running([model], http_port=0, limits=limits) as server, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{server.http_port}"
            replies = [await call(s, "POST", f"{base}/v1/embeddings", body, h) for body, h, *_ in BAD_REQUESTS]
            replies.append(await call(s, "GET", f"{base}/v1/embeddings"))
            replies.append(await call(s, "POST", f"{base}/v3/embed", {"input": "a"}))
            replies.append(await call(s, "GET", f"{base}/v1/models/nope"))
            good = await call(
                s, "POST", f"{base}/v1/embeddings", {"input": "word " * 200, "truncate": True, "user": "u"}
            )
            return replies, good

    replies, good = run(scenario())
    expected = [(status, code, words) for _, _, status, code, words in BAD_REQUESTS]
    expected += [(405, "invalid_argument", "GET is not allowed"), (404, "not_found", "no route '/v3/embed'")]
    expected += [(404, "not_found", "no model named 'nope'")]
    for (status, headers, body), (want, code, words) in zip(replies, expected, strict=True):
        error = body["error"]
        assert (status, error["code"]) == (want, code) and words in error["message"], (status, error)
        assert set(error) == {"message", "type", "param", "code"} and headers["Content-Type"] == "application/json"
    assert replies[len(BAD_REQUESTS)][1]["Allow"] == "POST"
    assert good[0] == 200 and len(good[2]["data"][0]["embedding"]) == 32
    # Only the last, good request (cut to 48 tokens) reached the model.
    assert [[e.truncated for e in b] for b in model.batches] == [[True]], "a bad request reached the model"


def test_http_and_grpc_requests_are_batched_together(tiny_artifact):
    model = GatedModel.open(tiny_artifact, BatcherConfig(max_padding=1.0, workers=1))

    async def scenario():
        async with (
            running([model], http_port=0) as server,
            AsyncEmbedClient(f"127.0.0.1:{server.port}") as c,
            aiohttp.ClientSession() as s,
        ):
            model.gate.clear()
            first = asyncio.ensure_future(c.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            over_grpc = asyncio.ensure_future(c.embed(["sent over grpc"], dims=8, timeout=60))
            body = {"input": ["sent over http"], "dimensions": 16}
            over_http = asyncio.ensure_future(
                call(s, "POST", f"http://127.0.0.1:{server.http_port}/v1/embeddings", body)
            )
            await wait_until(lambda: model.batcher.queued_jobs == 2, "both requests to queue")
            model.gate.set()
            grpc_vectors, (status, _, reply) = await over_grpc, await over_http
            await first
            labels = {"model": model.name, "outcome": "ok"}
            counts = [sample(server, "mrl_requests_total", {**labels, "transport": t}) for t in ("grpc", "http")]
            return grpc_vectors, status, reply, counts

    grpc_vectors, status, reply, counts = run(scenario())
    grpc_ids, http_ids = model.ids("sent over grpc"), model.ids("sent over http")
    shared = [b for b in model.batches if {tuple(e.ids) for e in b} == {grpc_ids, http_ids}]
    assert shared, "the HTTP and the gRPC request never shared a batch"
    offline = Embedder.load(tiny_artifact)
    http_vectors = np.array([d["embedding"] for d in reply["data"]], dtype=np.float32)
    assert status == 200 and cosines(http_vectors, offline.embed(["sent over http"], dims=16)).min() >= 0.99999
    assert cosines(grpc_vectors, offline.embed(["sent over grpc"], dims=8)).min() >= 0.99999
    assert counts == [2, 1]


def test_full_queue_is_429_with_retry_after_and_a_passed_deadline_is_504(tiny_artifact):
    config = BatcherConfig(max_queue_tokens=40, max_batch_tokens=40, max_batch_size=8, workers=1)
    model = GatedModel.open(tiny_artifact, config)
    ten_tokens = "one two three four five six seven eight"

    async def scenario():
        async with running([model], http_port=0) as server, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            model.gate.clear()
            first = asyncio.ensure_future(call(s, "POST", url, {"input": "hold"}))
            await wait_until(lambda: model.batches, "the first batch")
            queued = asyncio.ensure_future(call(s, "POST", url, {"input": [ten_tokens] * 2}))
            await wait_until(lambda: model.batcher.queued_tokens == 20, "20 queued tokens")
            full = await call(s, "POST", url, {"input": [ten_tokens] * 3})
            late = await call(s, "POST", url, {"input": "too late"}, {"X-Request-Timeout": "0.3"})
            await wait_until(lambda: model.batcher.queued_tokens == 20, "the late request to leave the queue")
            model.gate.set()
            return full, late, await queued, await first

    (full_status, full_headers, full), (late_status, _, late), queued, first = run(scenario())
    assert full_status == 429 and full_headers["Retry-After"] == "1" and "queue is full" in full["error"]["message"]
    assert full["error"]["type"] == "rate_limit_error"
    assert late_status == 504 and late["error"]["code"] == "deadline_exceeded"
    assert queued[0] == first[0] == 200
    assert not model.ran("too late")


def test_a_client_that_hangs_up_frees_its_place_before_compute(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server, aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            model.gate.clear()
            first = asyncio.ensure_future(call(s, "POST", url, {"input": "hold"}))
            await wait_until(lambda: model.batches, "the first batch")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as impatient:
                gone = asyncio.ensure_future(call(impatient, "POST", url, {"input": "never mind"}))
                await wait_until(lambda: model.batcher.queued_jobs == 1, "the second request to queue")
                gone.cancel()  # closes its connection
            await wait_until(lambda: model.batcher.queued_jobs == 0, "the abandoned request to leave the queue")
            model.gate.set()
            await first
            labels = {"model": model.name, "transport": "http", "outcome": "cancelled"}
            await wait_until(lambda: sample(server, "mrl_requests_total", labels) == 1, "the cancel to be counted")

    run(scenario())
    assert not model.ran("never mind")


def test_503_while_warming_up_and_health_503_at_once_on_drain_while_calls_are_still_served(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        model.warm_gate = asyncio.Event()
        async with running([model], warm=False, http_port=0) as server, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{server.http_port}"
            warming = asyncio.ensure_future(server.warmup())
            cold = (
                await call(s, "GET", f"{base}/health"),
                await call(s, "POST", f"{base}/v1/embeddings", {"input": "a"}),
            )
            model.warm_gate.set()
            await warming
            warm = await call(s, "GET", f"{base}/health")
            model.gate.clear()
            in_flight = asyncio.ensure_future(call(s, "POST", f"{base}/v1/embeddings", {"input": "in flight"}))
            await wait_until(lambda: model.batches, "the request in flight to run")
            stopping = asyncio.ensure_future(server.stop(grace=60))
            await wait_until(lambda: server.core.state is ServingState.DRAINING, "the server to drain")
            draining = await call(s, "GET", f"{base}/health")
            # A caller the load balancer has not yet moved away is still answered, not failed.
            late = asyncio.ensure_future(call(s, "POST", f"{base}/v1/embeddings", {"input": "sent while draining"}))
            await wait_until(lambda: model.batcher.queued_jobs == 1, "the late request to queue")
            model.gate.set()
            finished, answered = await in_flight, await late
            await stopping
            with pytest.raises(aiohttp.ClientConnectionError):
                await call(s, "GET", f"{base}/health")
            return cold, warm, draining, finished, answered

    (cold_health, cold_embed), warm, draining, finished, answered = run(scenario())
    assert cold_health[0] == 503 and cold_health[2]["status"] == "starting"
    assert cold_embed[0] == 503 and cold_embed[1]["Retry-After"] == "1"
    assert "warming up" in cold_embed[2]["error"]["message"]
    assert warm[0] == 200 and warm[2] == {"status": "serving", "models": {model.name: True}}
    assert draining[0] == 503 and draining[2]["status"] == "draining"
    assert finished[0] == answered[0] == 200
    assert model.ran("sent while draining")


def test_bearer_token_tls_models_and_metrics_on_the_http_port(tiny_artifact, tmp_path):
    cert, key = self_signed(tmp_path)
    model = GatedModel.open(tiny_artifact)
    trust = ssl.create_default_context(cadata=cert.decode())

    async def scenario():
        tls = TlsConfig(certificate_chain=cert, private_key=key)
        async with (
            running([model], http_port=0, http_metrics=True, tls=tls, auth_token="s3cret") as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s,
        ):
            base = f"https://127.0.0.1:{server.http_port}"
            good = {"Authorization": "Bearer s3cret"}
            body = {"input": "hello"}
            replies = {
                "none": await call(s, "POST", f"{base}/v1/embeddings", body),
                "wrong": await call(s, "POST", f"{base}/v1/embeddings", body, {"Authorization": "Bearer guess"}),
                "models-none": await call(s, "GET", f"{base}/v1/models"),
                "ok": await call(s, "POST", f"{base}/v1/embeddings", body, good),
                "models": await call(s, "GET", f"{base}/v1/models", None, good),
                "model": await call(s, "GET", f"{base}/v1/models/{model.name}", None, good),
                "health": await call(s, "GET", f"{base}/health"),
            }
            async with s.get(f"{base}/metrics") as r:
                metrics = (r.status, await r.text())
            with pytest.raises(aiohttp.ClientError):
                await call(s, "GET", f"http://127.0.0.1:{server.http_port}/health")
            return replies, metrics

    replies, (metrics_status, metrics) = run(scenario())
    for name in ("none", "wrong", "models-none"):
        status, headers, body = replies[name]
        assert (
            status == 401 and headers["WWW-Authenticate"] == "Bearer" and "Bearer <token>" in body["error"]["message"]
        )
    assert replies["ok"][0] == 200 and replies["health"][0] == 200
    (listed,) = replies["models"][2]["data"]
    assert listed == replies["model"][2] and listed["id"] == model.name and listed["object"] == "model"
    assert listed["profiles"][0]["dimensions"] == 32 and listed["prompts"] == {
        "query": "query: ",
        "document": "passage: ",
    }
    assert metrics_status == 200
    assert f'mrl_requests_total{{model="{model.name}",outcome="ok",transport="http"}} 1.0' in metrics
    assert 'mrl_auth_denied_total{method="/v1/embeddings"} 2.0' in metrics
    assert len(model.batches) == 1  # only the request with the token ran (warm-up is not a batch)


def openai_round_trip(base_url: str, model: str, texts: list[str], dims: int):
    """Embeddings through the real `openai` client: its default (base64) and encoding_format="float"."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    default = client.embeddings.create(model=model, input=texts, dimensions=dims)
    floats = client.embeddings.create(model=model, input=texts, dimensions=dims, encoding_format="float")
    with pytest.raises(openai.BadRequestError, match="above the largest profile"):
        client.embeddings.create(model=model, input=texts, dimensions=100000)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input=texts)
    listed = [m.id for m in client.models.list()]
    query = client.embeddings.create(model=model, input=texts, dimensions=dims, extra_body={"prompt_name": "query"})
    return default, floats, listed, query


def check_against_offline(artifact, default, floats, texts, dims):
    offline = Embedder.load(artifact).embed(texts, dims=dims)
    for response in (default, floats):
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert got.shape == (len(texts), dims) and [d.index for d in response.data] == list(range(len(texts)))
        assert cosines(got, offline).min() >= 0.99999
        assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_the_openai_client_round_trip_matches_the_offline_embedder(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    texts = ["how do I reset my password?", "the weather is lovely in spring", "ok"]

    async def scenario():
        async with running([model], http_port=0) as server:
            url = f"http://127.0.0.1:{server.http_port}/v1"
            return await asyncio.to_thread(openai_round_trip, url, model.name, texts, 16)

    default, floats, listed, query = run(scenario())
    check_against_offline(tiny_artifact, default, floats, texts, 16)
    assert listed == [model.name] and default.model == model.name
    with_prompt = Embedder.load(tiny_artifact).embed(texts, dims=16, prompt_name="query")
    assert cosines(np.array([d.embedding for d in query.data]), with_prompt).min() >= 0.99999


@pytest.mark.slow
def test_the_openai_client_round_trip_on_minilm_at_128_dims(minilm_artifact):
    model = GatedModel.open(minilm_artifact)
    texts = ["How do I reset my password?", "I forgot my login credentials.", "The weather in Paris is lovely."]

    async def scenario():
        async with running([model], http_port=0) as server:
            url = f"http://127.0.0.1:{server.http_port}/v1"
            return await asyncio.to_thread(openai_round_trip, url, model.name, texts, 128)

    default, floats, _, _ = run(scenario())
    check_against_offline(minilm_artifact, default, floats, texts, 128)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_embeddings(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server:
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            body = '{"input": ["hello world"], "dimensions": 8, "encoding_format": "ubinary"}'
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "60", url, "-d", body, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            return proc.returncode, json.loads(out)

    code, reply = run(scenario())
    assert code == 0 and reply["output_dtype"] == "ubinary" and reply["dimensions"] == 8
    expected = Embedder.load(tiny_artifact).embed(["hello world"], dims=8, encoding="ubinary")
    assert [d["embedding"] for d in reply["data"]] == expected.tolist()
