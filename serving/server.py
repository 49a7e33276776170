"""The server's lifecycle: listen, report NOT_SERVING, warm up, serve, shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.serving.auth import BearerTokenInterceptor
from mrl.serving.config import ServerConfig
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import ServedModel
from mrl.serving.service import SERVICE_NAME, EmbedderService

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check_names(models: Sequence[ServedModel]) -> dict[str, ServedModel]:
    """Models by name, refusing two models under one name."""
    by_name: dict[str, ServedModel] = {}
    for model in models:
        if model.name in by_name:
            raise ValueError(
                f"two artifacts are both named {model.name!r}: give one another name with NAME=ARTIFACT_DIR"
            )
        by_name[model.name] = model
    return by_name


class EmbedServer:
    """A grpc.aio server over served models, with health, reflection, metrics, auth and TLS."""

    def __init__(self, models: Sequence[ServedModel], config: ServerConfig, metrics: ServerMetrics) -> None:
        self.models = check_names(models)
        self.config = config
        self.metrics = metrics
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def health_names(self) -> list[str]:
        """Names the health service answers for: "" (the whole server), the Embedder service, each model."""
        return ["", SERVICE_NAME, *self.models]

    async def start(self) -> int:
        """Listen and start the batchers; health says NOT_SERVING until `warmup`. Returns the bound port."""
        for name in self.health_names:
            await self.health.set(name, NOT_SERVING)
        interceptors = []
        if self.config.auth_token is not None:
            denied = self.metrics.auth_denied
            interceptors.append(BearerTokenInterceptor(self.config.auth_token, lambda m: denied.labels(m).inc()))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                # Two servers must not silently share one port.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_EmbedderServicer_to_server(EmbedderService(self.models, self.config, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self.config.tls.private_key, self.config.tls.certificate_chain)]
                )
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} ({e}): is the port in use?") from None
        for model in self.models.values():
            self.metrics.ready.labels(model.name).set(0)
            model.batcher.on_batch = self.metrics.batch_observer(model.name)
            self.metrics.track_queue(
                model.name, lambda m=model: m.batcher.queued_jobs, lambda m=model: m.batcher.queued_tokens
            )
            model.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
        await server.start()
        self._server = server
        log.info("listening on %s:%d (%s)", self.config.host, self.port, "TLS" if self.config.tls else "plaintext")
        return self.port

    async def warmup(self) -> None:
        """Warm each model in turn, marking each SERVING once warm, and the server once all are."""
        for model in self.models.values():
            await model.warmup()
            self.metrics.ready.labels(model.name).set(1)
            await self.health.set(model.name, SERVING)
        await self.health.set(SERVICE_NAME, SERVING)
        await self.health.set("", SERVING)
        log.info("serving %s", ", ".join(self.models))

    async def stop(self, grace: float | None = None) -> None:
        """Say NOT_SERVING, refuse new calls, let calls in flight finish (up to `grace` s), then release models."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for model in self.models.values():
            model.batcher.hurry()  # queued work runs now: nothing is worth waiting for a fuller batch
        if self._server is not None:
            log.info("shutting down: finishing calls in flight (grace %.0f s)", grace)
            await self._server.stop(grace)
            self._server = None
        await asyncio.gather(*(m.close() for m in self.models.values()))
        self.metrics.stop()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()
