"""Spreading gRPC calls over pods: a round_robin client, and connections closed at a maximum age."""

from __future__ import annotations

import asyncio

import grpc
from serving_helpers import GatedModel, running

from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.serving.client import AsyncEmbedClient, build_request


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_a_round_robin_client_spreads_calls_over_every_address(tiny_artifact):
    """What a headless Service's DNS gives a client (every pod's address): with round_robin each gets calls."""
    models = [GatedModel.open(tiny_artifact), GatedModel.open(tiny_artifact)]

    async def scenario():
        async with running(models[:1]) as a, running(models[1:]) as b:
            target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
            async with AsyncEmbedClient(target, load_balancing="round_robin") as client:
                for i in range(10):
                    await client.embed([f"text {i}"], timeout=30)
        return [len(m.batches) for m in models]

    assert all(n >= 3 for n in run(scenario())), "calls were not spread over both servers"


def test_a_connection_past_its_max_age_is_closed_and_calls_go_on(tiny_artifact):
    """Without it a client keeps its connection for ever and never reaches pods the autoscaler adds."""

    async def states(max_connection_age_s):
        async with (
            running([GatedModel.open(tiny_artifact)], max_connection_age_s=max_connection_age_s) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.EmbedderStub(channel)
            await stub.Embed(build_request(["first"]), timeout=30)
            await asyncio.sleep(2.5)  # past the age, its jitter (+-10%) and the server's GOAWAY
            after_age = channel.get_state()
            await stub.Embed(build_request(["again"]), timeout=30)
            return after_age

    assert run(states(1.0)) == grpc.ChannelConnectivity.IDLE  # closed by the server; the next call reconnected
    assert run(states(None)) == grpc.ChannelConnectivity.READY
