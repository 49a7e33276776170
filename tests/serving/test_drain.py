"""SIGTERM under load, as an orchestrator sends it: every call sent before traffic stops is answered,
health says NOT_SERVING for the whole drain (Check and Watch), and the process exits once the work is done."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import Served

from mrl.serving.client import AsyncEmbedClient

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BALANCER_LAG_S = 0.5  # calls still sent after SIGTERM, until the load balancer notices


async def load_then_sigterm(served: Served, clients: int) -> dict:
    target = f"127.0.0.1:{served.port}"
    outcomes: list[tuple[float, str]] = []
    watched: list[int] = []
    checked: list[int] = []
    removed = asyncio.Event()  # the load balancer has taken the server out: no new calls

    async with grpc.aio.insecure_channel(target) as channel, AsyncEmbedClient(target) as c:
        health = health_pb2_grpc.HealthStub(channel)

        async def watch() -> None:
            with_errors = health.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                async for reply in with_errors:
                    watched.append(reply.status)
            except grpc.RpcError:
                pass  # the server ended the stream on exit

        async def client(i: int) -> None:
            while not removed.is_set():
                sent = time.monotonic()
                try:
                    await c.embed([f"text number {i} of a closed loop"] * 3, dims=8, timeout=60)
                    outcomes.append((sent, "OK"))
                except grpc.RpcError as e:
                    outcomes.append((sent, e.code().name))

        watcher = asyncio.ensure_future(watch())
        running = [asyncio.ensure_future(client(i)) for i in range(clients)]
        await asyncio.sleep(1.0)
        signalled = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(BALANCER_LAG_S, removed.set)
        while True:  # a load balancer's health checks, until the port closes
            try:
                checked.append((await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status)
            except grpc.RpcError:
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*running)
        await asyncio.wait_for(watcher, timeout=10)
    exit_code = await asyncio.to_thread(served.proc.wait, 60)
    return {
        "outcomes": outcomes,
        "watched": watched,
        "checked": checked,
        "exit_code": exit_code,
        "exit_after_s": time.monotonic() - signalled,
    }


def test_sigterm_under_load_answers_every_call_and_reports_not_serving_until_exit(tiny_artifact):
    # Batches would wait a minute to fill: only the drain's flush keeps the calls from waiting that long.
    served = Served(str(tiny_artifact), "--port", "0", "--max-queue-delay-ms", "60000",
                    "--max-batch-size", "1000", "--shutdown-grace-s", "30")  # fmt: skip
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
        result = asyncio.run(asyncio.wait_for(load_then_sigterm(served, clients=16), timeout=120))
    finally:
        served.stop()
    codes = [code for _, code in result["outcomes"]]
    assert len(codes) > 16 and set(codes) == {"OK"}, sorted(set(codes))
    assert NOT_SERVING in result["checked"], "health Check stopped answering before it said NOT_SERVING"
    assert result["watched"][0] == SERVING and result["watched"][-1] == NOT_SERVING, result["watched"]
    assert result["exit_code"] == 0, "".join(served.lines)
    # The open Watch stream must not hold the exit for the 30 s grace.
    assert result["exit_after_s"] < 15, result["exit_after_s"]
    log = "".join(served.lines)
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log
