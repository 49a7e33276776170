"""The server as an attacker tries it: garbage bytes, huge names, huge texts, a full queue."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import GatedModel, running, wait_until

from mrl.proto import embedder_pb2 as pb
from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import BatcherConfig
from mrl.serving.grpc_interceptors import Malformed, MalformedRequestInterceptor

GARBAGE = b"\xff\xff\xff\xff\x0f\x08"  # a varint that never ends: no protobuf message parses from it


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def test_garbage_request_bytes_get_invalid_argument_on_every_service(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model]) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            raw = {
                "/mrl.v1.Embedder/Embed": channel.unary_unary("/mrl.v1.Embedder/Embed"),
                "/mrl.v1.Embedder/GetModel": channel.unary_unary("/mrl.v1.Embedder/GetModel"),
                "/grpc.health.v1.Health/Check": channel.unary_unary("/grpc.health.v1.Health/Check"),
            }
            codes = {}
            for method, call in raw.items():
                with pytest.raises(grpc.RpcError) as info:
                    await call(GARBAGE, timeout=30)
                codes[method] = (info.value.code(), info.value.details())
            # A stream answers a garbage request in band, like any failed request, and goes on.
            stream = channel.stream_stream(
                "/mrl.v1.Embedder/EmbedStream", response_deserializer=pb.EmbedResponse.FromString
            )
            good = pb.EmbedRequest(inputs=["fine"]).SerializeToString()
            replies = [r async for r in stream(iter([good, GARBAGE, good]), timeout=30)]
            async with AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:  # and the server is fine after it
                return codes, replies, await c.embed(["after the garbage"], timeout=30)

    codes, replies, after = run(scenario())
    for method, (code, details) in codes.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "not a valid message" in details
    assert [len(r.embeddings) for r in replies] == [1, 0, 1]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid message" in replies[1].error.message
    assert after.shape == (1, 32)


@pytest.mark.parametrize("field", ["model", "prompt_name"])
def test_a_huge_name_is_echoed_cut_so_the_status_still_arrives(tiny_artifact, field):
    model = GatedModel.open(tiny_artifact)
    huge = "n" * 100_000

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            with pytest.raises(grpc.RpcError) as info:
                await c.embed(["x"], timeout=30, **{field: huge})
            return info.value

    error = run(scenario())
    want = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT
    assert error.code() == want, error.details()
    assert len(error.details()) < 400 and "100000 characters" in error.details()


async def latencies_while(server, busy_calls) -> dict[str, list[float]]:
    """Health checks and one-text Embeds of a second client, timed while `busy_calls` run."""
    target = f"127.0.0.1:{server.port}"
    seen: dict[str, list[float]] = {"health": [], "embed": []}
    async with grpc.aio.insecure_channel(target) as channel, AsyncEmbedClient(target) as c:
        health = health_pb2_grpc.HealthStub(channel)
        busy = asyncio.ensure_future(asyncio.gather(*busy_calls(target)))
        while not busy.done():
            start = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            seen["health"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await c.embed(["a small request beside the huge one"], timeout=30)
            seen["embed"].append(time.perf_counter() - start)
            await asyncio.sleep(0.01)
        seen["busy_results"] = await busy
    return seen


def test_huge_texts_never_stall_health_or_other_callers(tiny_artifact):
    model = GatedModel.open(tiny_artifact, BatcherConfig())
    one_mib = "ten chars " * ((1 << 20) // 10)
    fifteen_mib = "ten chars " * ((15 << 20) // 10)

    def huge_calls(target: str):
        async def call(texts: list[str]):
            async with AsyncEmbedClient(target) as c:
                return await c.embed(texts, truncate=True, timeout=120)

        return [call([one_mib]), call([fifteen_mib]), call([one_mib] * 8)]

    async def scenario():
        async with running([model]) as server:
            return await latencies_while(server, huge_calls)

    seen = run(scenario())
    assert [r.shape for r in seen["busy_results"]] == [(1, 32), (1, 32), (8, 32)]
    assert seen["health"] and seen["embed"]
    # Tokenised whole, the 15 MiB text alone held the event loop for over 30 s. The bound is loose on
    # purpose (a shared 2-core machine): what it catches is a stall of seconds.
    assert max(seen["health"]) < 1.0 and max(seen["embed"]) < 2.0, seen


def test_a_refusal_needs_no_tokenising_and_no_room_in_the_queue(tiny_artifact):
    model = GatedModel.open(tiny_artifact, BatcherConfig(max_queue_tokens=64, max_batch_tokens=64, workers=1))
    # As if exported without calibration ranges: int8 outputs are then a caller's mistake.
    model.embedder.manifest = dataclasses.replace(model.embedder.manifest, calibration=None)
    tokenised: list[int] = []
    tokenize = model.embedder.tokenize
    model.embedder.tokenize = lambda plan, texts: tokenised.append(len(texts)) or tokenize(plan, texts)

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            model.gate.clear()
            first = asyncio.ensure_future(c.embed(["hold the only worker"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            filler = asyncio.ensure_future(c.embed(["fill the queue " * 8] * 2, timeout=60))
            await wait_until(lambda: model.batcher.queued_tokens > 40, "a nearly full queue")
            before = list(tokenised)
            codes = []
            for kwargs in ({"dims": 0}, {"dims": 999}, {"prompt_name": "nope"}, {"model": "nope"}):
                with pytest.raises(grpc.RpcError) as info:
                    await c.embed(["refused"], timeout=30, **kwargs)
                codes.append(info.value.code())
            too_big = ["a request for which the queue has no room left " * 4]
            for kwargs in ({"encoding": "int8"}, {}):  # a caller's mistake is named before a full queue
                with pytest.raises(grpc.RpcError) as info:
                    await c.embed(too_big, timeout=30, **kwargs)
                codes.append(info.value.code())
            refused_without_tokenising = tokenised == before
            model.gate.set()
            await first, await filler
            return codes, refused_without_tokenising

    codes, refused_without_tokenising = run(scenario())
    invalid, missing, full = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert codes == [invalid, invalid, invalid, missing, invalid, full]  # what the caller must fix comes first
    assert refused_without_tokenising


def test_the_malformed_guard_wraps_each_method_once():
    """A handler is guarded once and reused for later calls, and guarded anew when another handler is chosen."""
    interceptor = MalformedRequestInterceptor()
    embed = grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=pb.EmbedRequest.FromString)
    denied = grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=pb.EmbedRequest.FromString)
    details = SimpleNamespace(method="/mrl.v1.Embedder/Embed", invocation_metadata=())  # a HandlerCallDetails

    def chosen(handler):
        async def continuation(_details):
            return handler

        return asyncio.run(interceptor.intercept_service(continuation, details))

    first, again = chosen(embed), chosen(embed)
    assert first is again and first is not embed
    other = chosen(denied)
    assert other is not first and chosen(denied) is other
    garbage = other.request_deserializer(b"\xff\xff\xff")  # still the lenient parser: no exception escapes
    assert isinstance(garbage, Malformed)
    assert chosen(None) is None
