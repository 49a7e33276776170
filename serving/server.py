"""The server's lifecycle: one core and its front ends (doors); listen, warm up, serve, drain.

A front end is registered once in FRONT_ENDS: a class that says whether the configuration wants it, and
that starts listening and stops. A new door (KServe's open inference protocol, say) is a module of its own
and one line here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

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


class FrontEnd(Protocol):
    """A door into the core: a listener speaking one wire protocol."""

    name: str
    port: int | None
    """The port bound (None before `start`)."""

    async def start(self) -> int:
        """Listen, reporting not-ready until the core is warm; returns the bound port."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop listening; what is still open gets `grace` seconds (the core has drained by then)."""
        ...


class FrontEndClass(Protocol):
    """How a front end is registered: whether a configuration wants it, and how it is made."""

    def __call__(self, core: EmbedCore, config: ServerConfig) -> FrontEnd: ...

    def wanted(self, config: ServerConfig) -> bool: ...


FRONT_ENDS: tuple[FrontEndClass, ...] = (GrpcFrontEnd, HttpFrontEnd)  # type: ignore[assignment]
"""Every door the server can open, in start order."""


class EmbedServer:
    """Served models behind the front ends the configuration asks for, with metrics."""

    def __init__(self, models: Sequence[ServedModel], config: ServerConfig, metrics: ServerMetrics) -> None:
        self.core = EmbedCore(models, config.limits, metrics)
        self.config = config
        self.metrics = metrics
        self.front_ends: list[FrontEnd] = [door(self.core, config) for door in FRONT_ENDS if door.wanted(config)]
        self.metrics_port: int | None = None

    @property
    def models(self) -> dict[str, ServedModel]:
        """Served models by name."""
        return self.core.models

    def _port(self, name: str) -> int | None:
        return next((door.port for door in self.front_ends if door.name == name), None)

    @property
    def port(self) -> int | None:
        """The gRPC port bound (None before `start`)."""
        return self._port(GrpcFrontEnd.name)

    @property
    def http_port(self) -> int | None:
        """The HTTP port bound (None before `start`, or without HTTP)."""
        return self._port(HttpFrontEnd.name)

    async def start(self) -> None:
        """Start the batchers and every front end; each says not-ready until `warmup`."""
        self.core.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_port = self.metrics.serve(host, self.config.metrics_port)
        for door in self.front_ends:
            await door.start()

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
        await asyncio.gather(*(door.stop(STREAM_GRACE_S) for door in self.front_ends))
        await self.core.close()
        self.metrics.stop()
        log.info("stopped")
