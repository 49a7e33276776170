"""Bearer-token auth, TLS, health transitions and the metrics endpoint, on a real server."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import GatedModel, running, sample, self_signed

from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import TlsConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def check(target: str, service: str, **kwargs) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=30, **kwargs
        )
        return reply.status


def test_a_missing_or_wrong_token_is_unauthenticated_and_never_reaches_the_model(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], auth_token="s3cret-token") as server:
            target = f"127.0.0.1:{server.port}"
            codes = {}
            for name, token in [("none", None), ("wrong", "guess"), ("prefix", "s3cret")]:
                async with AsyncEmbedClient(target, token=token) as c:
                    for call in (c.embed(["never " + name], timeout=30), c.list_models(timeout=30)):
                        with pytest.raises(grpc.RpcError) as info:
                            await call
                        codes[name] = info.value.code(), info.value.details()
                    with pytest.raises(grpc.RpcError) as info:
                        _ = [r async for r in c.embed_stream([], timeout=30)]
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncEmbedClient(target, token="s3cret-token") as c:
                ok = await c.embed(["allowed"], timeout=30)
            # Health stays open for probes that carry no credentials.
            health = await check(target, "")
            requests = sample(server, "mrl_requests_total", {"model": model.name, "transport": "grpc", "outcome": "ok"})
            denied = sample(server, "mrl_auth_denied_total", {"method": "/mrl.v1.Embedder/Embed"})
            return codes, ok, health, (requests, denied)

    codes, ok, health, requests = run(scenario())
    for code, details in codes.values():
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    assert ok.shape == (1, 32) and health == SERVING
    assert requests == (1, 3)  # one call reached the service; three were refused before it
    assert model.ran("allowed") and not any(model.ran("never " + n) for n in codes)


def test_tls_serves_clients_that_trust_the_certificate_and_refuses_plaintext(tiny_artifact, tmp_path):
    cert, key = self_signed(tmp_path)
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        tls = TlsConfig(certificate_chain=cert, private_key=key)
        async with running([model], tls=tls) as server:
            target = f"127.0.0.1:{server.port}"
            async with AsyncEmbedClient(target, root_certificates=cert, token=None) as c:
                vectors = await c.embed(["over tls"], timeout=30)
            async with AsyncEmbedClient(target) as plain:
                with pytest.raises(grpc.RpcError) as info:
                    await plain.embed(["in clear"], timeout=10)
            return vectors, info.value.code()

    vectors, plaintext = run(scenario())
    assert vectors.shape == (1, 32)
    assert plaintext == grpc.StatusCode.UNAVAILABLE
    assert not model.ran("in clear")


def test_tls_config_refuses_files_that_are_not_pem():
    with pytest.raises(ValueError, match="not PEM"):
        TlsConfig(certificate_chain=b"hello", private_key=b"-----BEGIN PRIVATE KEY-----")


def test_health_is_not_serving_until_warm_then_serving_then_not_serving_on_shutdown(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        model.warm_gate = asyncio.Event()
        statuses = []
        async with running([model], warm=False, metrics_port=0) as server:
            target = f"127.0.0.1:{server.port}"
            warming = asyncio.ensure_future(server.warmup())
            for service in ("", "mrl.v1.Embedder", model.name):
                statuses.append(("cold", service, await check(target, service)))
            async with AsyncEmbedClient(target) as c:
                with pytest.raises(grpc.RpcError) as info:
                    await c.embed(["too early"], timeout=30)
                cold_embed = info.value.code(), info.value.details()
                cold_info = await c.get_model(timeout=30)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).read()
            model.warm_gate.set()
            await warming
            for service in ("", "mrl.v1.Embedder", model.name):
                statuses.append(("warm", service, await check(target, service)))
            with pytest.raises(grpc.RpcError) as unknown:
                await check(target, "no-such-model")
            async with grpc.aio.insecure_channel(target) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                seen = [(await watch.read()).status]
                stopping = asyncio.ensure_future(server.stop(grace=5))
                seen.append((await watch.read()).status)
                await stopping
        return statuses, cold_embed, cold_info, metrics.decode(), unknown.value.code(), seen

    statuses, cold_embed, cold_info, metrics, unknown, seen = run(scenario())
    assert [s for phase, _, s in statuses if phase == "cold"] == [NOT_SERVING] * 3
    assert [s for phase, _, s in statuses if phase == "warm"] == [SERVING] * 3
    assert cold_embed[0] == grpc.StatusCode.UNAVAILABLE and "warming up" in cold_embed[1]
    assert not cold_info.ready
    assert f'mrl_model_ready{{model="{model.name}"}} 0.0' in metrics
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert seen == [SERVING, NOT_SERVING]
    assert not model.ran("too early")


def test_metrics_endpoint_reports_requests_tokens_and_batches(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], metrics_port=0) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as c:
            await c.embed(["one two three"], timeout=30)
            with pytest.raises(grpc.RpcError):
                await c.embed([""], timeout=30)
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read().decode())

    text = run(scenario())
    name = model.name
    for line in (
        f'mrl_requests_total{{model="{name}",outcome="ok",transport="grpc"}} 1.0',
        f'mrl_requests_total{{model="{name}",outcome="invalid_argument",transport="grpc"}} 1.0',
        f'mrl_input_tokens_total{{model="{name}"}} 5.0',
        f'mrl_batch_size_count{{model="{name}"}} 1.0',
        f'mrl_queue_depth{{model="{name}"}} 0.0',
        f'mrl_model_ready{{model="{name}"}} 1.0',
    ):
        assert line in text, line
    for family in ("mrl_request_latency_seconds_bucket", "mrl_queue_time_seconds_bucket", "mrl_inference_seconds"):
        assert family in text


def test_grpc_health_answers_while_the_cores_event_loop_is_busy(tiny_artifact):
    """The gRPC door runs on an event loop of its own (issue 20): its calls do not wait behind the core's loop,
    which here is blocked outright for longer than the probe's deadline."""
    model = GatedModel.open(tiny_artifact)
    answers: list[object] = []

    def probe(target: str) -> None:
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
                answers.append(reply.status)
            except grpc.RpcError as e:
                answers.append(e.code())

    async def scenario():
        async with running([model]) as server:
            prober = threading.Thread(target=probe, args=(f"127.0.0.1:{server.port}",))
            prober.start()
            time.sleep(5)  # blocks the loop the core (and, before, the gRPC door) runs on
            prober.join()

    run(scenario())
    assert answers == [SERVING]
