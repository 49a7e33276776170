"""The server's lifecycle: one core, its front ends and the metrics endpoint; listen, warm up, serve, drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mrl.serving.config import ServerConfig
from mrl.serving.core import EmbedCore
from mrl.serving.grpc_service import GrpcFrontEnd
from mrl.serving.http_service import HttpFrontEnd
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import ServedModel

log = logging.getLogger(__name__)

DRAIN_QUIET_S = 0.1
"""A drain ends once no call has been in flight for this long: the traffic has stopped, not merely paused."""
STREAM_GRACE_S = 0.2
"""What streams left open at the end of a drain (health Watch, idle EmbedStream) get before being ended."""


class EmbedServer:
    """Served models behind a gRPC front end and, when configured, an OpenAI-compatible HTTP one; with metrics."""

    def __init__(self, models: Sequence[ServedModel], config: ServerConfig, metrics: ServerMetrics) -> None:
        self.core = EmbedCore(models, config.limits, metrics)
        self.config = config
        self.metrics = metrics
        self.grpc = GrpcFrontEnd(self.core, config)
        self.http = None if config.http_port is None else HttpFrontEnd(self.core, config)
        self.metrics_port: int | None = None

    @property
    def models(self) -> dict[str, ServedModel]:
        """Served models by name."""
        return self.core.models

    @property
    def port(self) -> int | None:
        """The gRPC port bound (None before `start`)."""
        return self.grpc.port

    @property
    def http_port(self) -> int | None:
        """The HTTP port bound (None before `start`, or without HTTP)."""
        return None if self.http is None else self.http.port

    async def start(self) -> int:
        """Start the batchers and listen; every front end says not-ready until `warmup`. Returns the gRPC port."""
        self.core.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
        port = await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        return port

    async def warmup(self) -> None:
        """Warm every model; front ends report ready as each model, then the server, is warm."""
        await self.core.warmup()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report not-ready, serve until no call has been in flight for a moment (at most `grace` s),
        end the streams left open (health Watch, idle EmbedStream) and release the models."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        await self.core.drain()
        log.info("shutting down: health says NOT_SERVING; serving calls until none is in flight (grace %.0f s)", grace)
        if not await self.core.wait_idle(DRAIN_QUIET_S, grace):
            log.warning("calls still in flight after the %.0f s grace: cancelling them", grace)
        stopping = [self.grpc.stop(STREAM_GRACE_S)] + ([] if self.http is None else [self.http.stop()])
        await asyncio.gather(*stopping)
        await self.core.close()
        self.metrics.stop()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until the server stops."""
        await self.grpc.wait_for_termination()
