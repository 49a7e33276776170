"""A real grpc.aio server on 127.0.0.1 over the tiny artifact: results, batching, bad input, limits."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_helpers import GatedModel, cosines, running, sample, sentences, wait_until

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime import Embedder, EmbedOptions
from mrl.serving.client import AsyncEmbedClient, EmbedClient, build_request
from mrl.serving.config import BatcherConfig, RequestLimits


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def concurrent_parity(artifact, dims_cycle, n_requests=200):
    """`n_requests` concurrent requests of mixed dims (and some of several texts) against the offline Embedder."""
    model = GatedModel.open(artifact, BatcherConfig(max_batch_size=64))
    texts = sentences(n_requests + 20, seed=3)
    plan = [([texts[i]], dims_cycle[i % len(dims_cycle)]) for i in range(n_requests - 10)]
    plan += [(texts[i : i + 3], dims_cycle[i % len(dims_cycle)]) for i in range(n_requests - 10, n_requests)]
    async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as client:
        model.gate.clear()  # hold the first batch so the rest queue up and batch together
        first = asyncio.ensure_future(client.embed(["hold"], timeout=60))
        await wait_until(lambda: model.batches, "the first batch")
        calls = [asyncio.ensure_future(client.embed(t, dims=d, timeout=120)) for t, d in plan]
        await wait_until(lambda: model.batcher.queued_jobs >= n_requests, "every request to queue")
        model.gate.set()
        got = await asyncio.gather(*calls)
        await first
        count = sample(server, "mrl_batch_size_count", {"model": model.name})
        total = sample(server, "mrl_batch_size_sum", {"model": model.name})
    offline = Embedder.load(artifact)
    for (t, d), vectors in zip(plan, got, strict=True):
        assert vectors.shape == (len(t), d) and vectors.dtype == np.float32
        assert cosines(vectors, offline.embed(t, dims=d)).min() >= 0.99999
    return model, count, total, plan


def single_dims(model: GatedModel, plan: list[tuple[list[str], int]]) -> dict[tuple[int, ...], int]:
    """The dims each text was asked for, by its ids (texts asked for once, alone)."""
    alone = [t[0] for t, _ in plan if len(t) == 1]
    return {model.ids(t[0]): d for t, d in plan if len(t) == 1 and alone.count(t[0]) == 1}


def test_concurrent_mixed_dims_requests_match_the_offline_embedder_and_batch_together(tiny_artifact):
    model, count, total, plan = run(concurrent_parity(tiny_artifact, [8, 12, 16, 32, 5]))
    assert total / count > 1, "no batch held more than one text"
    assert max(len(b) for b in model.batches) > 1
    assert model.dims_mixed(single_dims(model, plan)), "requests for different dims never shared a batch"


@pytest.mark.slow
def test_minilm_concurrent_mixed_dims_match_the_offline_embedder(minilm_artifact):
    model, count, total, plan = run(concurrent_parity(minilm_artifact, [64, 100, 128, 256]))
    assert total / count > 1
    assert model.dims_mixed(single_dims(model, plan))


def expect_error(call, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in info.value.details()


def test_every_bad_input_gets_a_status_that_says_what_to_fix(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], limits=RequestLimits(max_inputs_per_request=4)) as server:
            # The sync client in a thread: a second, independent channel type, and the loop stays free.
            return await asyncio.to_thread(bad_inputs, server.port)

    run(scenario())
    # Only the last, good request (a long text cut to 48 tokens) reached the model.
    assert [[e.truncated for e in b] for b in model.batches] == [[True]], "a bad request reached the model"


def bad_inputs(port: int) -> None:
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    with EmbedClient(f"127.0.0.1:{port}", timeout=30) as c:
        expect_error(lambda: c.embed([]), invalid, "at least one text")
        expect_error(lambda: c.embed(["ok", ""]), invalid, "input 1 is an empty string")
        expect_error(lambda: c.embed(["a"] * 5), invalid, "at most 4", "split")
        expect_error(lambda: c.embed(["word " * 200], truncate=False), invalid, "max of 48", "truncation")
        expect_error(lambda: c.embed(["a"], dims=0), invalid, "at least 1")
        expect_error(lambda: c.embed(["a"], dims=33), invalid, "above the largest profile", "[8, 16, 32]")
        expect_error(lambda: c.embed(["a"], model="nope"), not_found, "no model named 'nope'", "tiny")
        expect_error(lambda: c.embed(["a"], prompt_name="nope"), invalid, "unknown prompt", "query")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as raw:  # the client refuses to send this one
            stub = pb_grpc.EmbedderStub(raw)
            bad = pb.EmbedRequest(inputs=["a"], encoding=99)
            expect_error(lambda: stub.Embed(bad), invalid, "unknown encoding 99")
        expect_error(lambda: c.embed(["a"], dims=12, encoding="int8"), invalid, "calibrated per profile", "8, 16, 32")
        expect_error(lambda: c.get_model("nope"), not_found, "no model named")
        # A long input with truncate=true is cut, not refused; and the server is still fine after all that.
        assert c.embed(["word " * 200], truncate=True, dims=8).shape == (1, 8)


def test_results_usage_prompts_and_model_info(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    offline = Embedder.load(tiny_artifact)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            response = await c.embed_response(["hello world", "a b"], prompt_name="query", dims=16)
            default = await c.embed(["hello world"])
            (info,) = await c.list_models()
            return response, default, info, await c.get_model(model.name)

    response, default, info, same = run(scenario())
    assert response.dimensions == 16 and response.encoding == pb.ENCODING_FLOAT32
    assert [len(e.values) for e in response.embeddings] == [16, 16]
    expected = offline.embed(["hello world", "a b"], dims=16, prompt_name="query")
    got = np.array([list(e.values) for e in response.embeddings])
    assert cosines(got, expected).min() >= 0.99999
    encoded = offline.tokenize(offline.plan(EmbedOptions(prompt_name="query")), ["hello world", "a b"])
    assert response.usage.input_tokens == sum(e.n_tokens for e in encoded)
    assert response.timing.total_ms >= response.timing.inference_ms > 0
    assert default.shape == (1, 32)
    assert info == same
    assert (info.full_dimensions, info.default_dimensions, info.max_input_tokens) == (32, 32, 48)
    assert sorted(p.dimensions for p in info.profiles) == [8, 16, 32]
    assert dict(info.prompts) == {"query": "query: ", "document": "passage: "}
    assert info.precision == "fp32" and info.ready


def test_one_bad_request_never_fails_others_batched_with_it(tiny_artifact):
    model = GatedModel.open(tiny_artifact, BatcherConfig(max_padding=1.0, workers=1))  # any lengths share a batch
    model.poison = model.ids("poison pill")
    texts = sentences(6, seed=5)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            model.gate.clear()
            first = asyncio.ensure_future(c.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            good = [asyncio.ensure_future(c.embed([t], dims=8, timeout=60)) for t in texts]
            bad = asyncio.ensure_future(c.embed(["poison pill"], timeout=60))
            await wait_until(lambda: model.batcher.queued_jobs == 7, "7 queued texts")
            model.gate.set()
            results = await asyncio.gather(*good)
            with pytest.raises(grpc.RpcError) as info:
                await bad
            await first
            return results, info.value

    results, error = run(scenario())
    assert error.code() == grpc.StatusCode.INTERNAL and "see the server log" in error.details()
    assert len(model.batches[1]) == 7, "the poison and the good texts did not share a batch"
    offline = Embedder.load(tiny_artifact)
    for text, vectors in zip(texts, results, strict=True):
        assert cosines(vectors, offline.embed([text], dims=8)).min() >= 0.99999


def test_an_expired_request_is_dropped_before_compute(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            model.gate.clear()
            first = asyncio.ensure_future(c.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            with pytest.raises(grpc.RpcError) as info:
                await c.embed(["too late"], timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: model.batcher.queued_jobs == 0, "the expired request to leave the queue")
            model.gate.set()
            await first
            assert (await c.embed(["after"])).shape == (1, 32)
            outcomes = ("ok", "deadline_exceeded", "cancelled")
            labels = {"model": model.name, "transport": "grpc"}
            return [sample(server, "mrl_requests_total", {**labels, "outcome": o}) for o in outcomes]

    assert run(scenario()) == [2, 1, 0]
    assert not model.ran("too late")
    assert model.ran("after")


def test_a_caller_gone_while_its_batch_runs_is_counted_as_expired_and_its_text_as_abandoned(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            model.gate.clear()
            call = asyncio.ensure_future(c.embed(["gone before done"], timeout=2))
            await wait_until(lambda: model.batches, "the batch to start")  # an idle server runs it at once
            arrived_by = asyncio.get_running_loop().time()
            with pytest.raises(grpc.RpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server's deadline runs from when the call arrived (after the client's began, before its
            # batch started): wait until it has surely passed too, so the batch ends after both.
            await asyncio.sleep(max(0.0, arrived_by + 2.1 - asyncio.get_running_loop().time()))
            model.gate.set()
            labels = {"model": model.name}
            await wait_until(lambda: sample(server, "mrl_abandoned_texts_total", labels) == 1, "the abandoned text")
            expired = {"model": model.name, "transport": "grpc", "outcome": "deadline_exceeded"}
            return sample(server, "mrl_requests_total", expired), sample(server, "mrl_texts_total", labels)

    assert run(scenario()) == (1, 0)


def test_a_cancelled_request_is_dropped_before_compute(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model]) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.EmbedderStub(channel)
            model.gate.clear()
            first = stub.Embed(build_request(["hold"]), timeout=60)
            await wait_until(lambda: model.batches, "the first batch")
            call = stub.Embed(build_request(["never mind"]), timeout=60)
            await wait_until(lambda: model.batcher.queued_jobs == 1, "the second request to queue")
            call.cancel()
            await wait_until(lambda: model.batcher.queued_jobs == 0, "the cancelled request to leave the queue")
            model.gate.set()
            await first
            return sample(
                server, "mrl_requests_total", {"model": model.name, "transport": "grpc", "outcome": "cancelled"}
            )

    assert run(scenario()) == 1
    assert not model.ran("never mind")


def test_a_full_queue_answers_resource_exhausted_at_once_but_takes_a_single_text_that_fits(tiny_artifact):
    config = BatcherConfig(max_queue_tokens=40, max_batch_tokens=40, max_batch_size=8, workers=1)
    model = GatedModel.open(tiny_artifact, config)
    ten_tokens = "one two three four five six seven eight"  # 8 words + [CLS] + [SEP]
    assert len(model.ids(ten_tokens)) == 10

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            model.gate.clear()
            first = asyncio.ensure_future(c.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            queued = asyncio.ensure_future(c.embed([ten_tokens] * 2, timeout=60))  # 20 of 40 tokens
            await wait_until(lambda: model.batcher.queued_tokens == 20, "20 queued tokens")
            with pytest.raises(grpc.RpcError) as info:
                await c.embed([ten_tokens] * 3, timeout=60)  # 30 more: over, refused without waiting
            single = asyncio.ensure_future(c.embed([ten_tokens], timeout=60))  # 10 more: fits
            await wait_until(lambda: model.batcher.queued_tokens == 30, "the single text to queue")
            model.gate.set()
            return info.value, await queued, await single, await first

    error, queued, single, _ = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in error.details()
    assert queued.shape == (2, 32) and single.shape == (1, 32)


def test_stream_answers_in_order_with_errors_in_band(tiny_artifact):
    model = GatedModel.open(tiny_artifact)
    texts = sentences(20, seed=9)

    async def scenario():
        async with running([model], stream_window=4) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            requests = [build_request([t], dims=8 + i % 3, request_id=str(i)) for i, t in enumerate(texts)]
            requests[5] = build_request(["x"], dims=99, request_id="5")
            return [r async for r in c.embed_stream(requests, timeout=60)]

    responses = run(scenario())
    assert [r.request_id for r in responses] == [str(i) for i in range(20)]
    assert responses[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not responses[5].embeddings
    assert "above the largest profile" in responses[5].error.message
    offline = Embedder.load(tiny_artifact)
    for i, r in enumerate(responses):
        if i != 5:
            assert r.dimensions == 8 + i % 3 and not r.HasField("error")
            got = np.array([list(r.embeddings[0].values)])
            assert cosines(got, offline.embed([texts[i]], dims=r.dimensions)).min() >= 0.99999


def test_several_models_are_addressed_by_name_and_reflection_lists_the_services(tiny_artifact):
    a = GatedModel.open(tiny_artifact, name="a")
    b = GatedModel.open(tiny_artifact, name="b")

    async def scenario():
        async with running([a, b]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            with pytest.raises(grpc.RpcError) as info:
                await c.embed(["x"])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "set model" in info.value.details()
            await c.embed(["only b"], model="b")
            names = [m.name for m in await c.list_models()]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
            return names, [s.name for s in replies[0].list_services_response.service]

    names, services = run(scenario())
    assert names == ["a", "b"]
    assert {"mrl.v1.Embedder", "grpc.health.v1.Health"} <= set(services)
    assert b.ran("only b") and not a.ran("only b")


def test_requests_above_the_message_size_limit_are_refused(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with (
            running([model], limits=RequestLimits(max_message_bytes=1024)) as server,
            AsyncEmbedClient(f"127.0.0.1:{server.port}") as c,
        ):
            with pytest.raises(grpc.RpcError) as info:
                await c.embed(["x" * 2000], timeout=30)
            return info.value.code(), (await c.embed(["small"], timeout=30)).shape

    assert run(scenario()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, (1, 32))
    assert not model.batches[1:]  # only the small request ran
