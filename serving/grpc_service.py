"""The gRPC front end: `mrl.v1.Embedder`, health and reflection over the serving core.

Thin on purpose: `grpc_protocol` translates messages into the core's `EmbedQuery` and results and errors
back; this module receives calls, awaits the core and runs the grpc.aio server's lifecycle.

The grpc.aio server runs on an event loop of its own, in a thread of its own, and hands each request to the
core on the server's main loop. grpc.aio takes several turns of its loop per call (accept one call, start its
task, read the message, send the status); on the main loop each of those turns waited behind every other
door's ready work, so under a retry storm of both doors a gRPC refusal took 4-6x (p50) and 5-8x (p99) an HTTP
refusal (BENCHMARKS.md, issue 20). On its own loop those turns are short, and a refusal costs one hop to the
main loop and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.serving.config import GRPC_MAX_INT, ServerConfig
from mrl.serving.core import EmbedCore, deadline_after
from mrl.serving.grpc_interceptors import BearerTokenInterceptor, Malformed, MalformedRequestInterceptor
from mrl.serving.grpc_protocol import (
    HEALTH_SERVICE_NAME,
    SERVICE_NAME,
    error_response,
    model_info,
    status_for,
    to_query,
    to_response,
)

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TRANSPORT = "grpc"
MAX_STREAMS_PER_CONNECTION = 1024
IN_BAND_METHODS = (f"/{SERVICE_NAME}/EmbedStream",)
"""Streams that answer a malformed request in band, as any failed request, and go on."""
T = TypeVar("T")


async def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` run on `loop` (another thread's); cancelling the wait cancels it there."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class EmbedderService(pb_grpc.EmbedderServicer):
    """Handles Embed, EmbedStream, ListModels and GetModel by calling the core."""

    def __init__(
        self, core: EmbedCore, core_loop: asyncio.AbstractEventLoop, stream_window: int, truncate_default: bool
    ) -> None:
        self._core = core
        self._core_loop = core_loop
        self._stream_window = stream_window
        self._truncate_default = truncate_default

    async def _handle(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> tuple[pb.EmbedResponse | None, grpc.StatusCode, str]:
        """Run one request; returns the response, or None with the status code and message to send."""
        start = time.perf_counter()
        try:
            query = to_query(
                request,
                deadline_after(context.time_remaining()),
                truncate_default=self._truncate_default,
                max_inputs=self._core.limits.max_inputs_per_request,
            )
            model, result = await run_on(self._core_loop, self._core.embed(query, TRANSPORT))
        except Exception as e:
            return None, *status_for(e)
        elapsed = time.perf_counter() - start
        response = to_response(result, model.name, request.request_id, elapsed, several=bool(request.outputs))
        return response, grpc.StatusCode.OK, ""

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Embed a list of texts."""
        response, code, message = await self._handle(request, context)
        if response is None:
            await context.abort(code, message)
        return response

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Embed each streamed request as it arrives (several at once), answering in request order."""
        window = asyncio.Semaphore(self._stream_window)
        pending: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()

        async def one(request: pb.EmbedRequest | Malformed) -> pb.EmbedResponse:
            if isinstance(request, Malformed):
                return error_response(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            response, code, message = await self._handle(request, context)
            return response if response is not None else error_response(code, message, request.request_id)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # Unread requests stay in gRPC's flow control: a fast sender cannot queue without bound.
                    await window.acquire()
                    await pending.put(asyncio.ensure_future(one(request)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                response = await task
                window.release()
                yield response
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every served model."""
        return pb.ListModelsResponse(models=[model_info(i) for i in self._core.model_infos()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """One served model by name."""
        try:
            model = self._core.resolve(request.name)
        except Exception as e:
            await context.abort(*status_for(e))
        return model_info(model.info())


class GrpcFrontEnd:
    """A grpc.aio server over the core: Embedder, health (fed by the core's readiness), reflection, auth, TLS.

    The server, its health servicer and every call live on the door's own loop (`_loop`, in its own thread);
    the core stays on the main loop, which `start`, `stop` and the readiness listener are called from."""

    name = TRANSPORT

    @staticmethod
    def wanted(config: ServerConfig) -> bool:
        """Always: gRPC is the server's own protocol."""
        return True

    def __init__(self, core: EmbedCore, config: ServerConfig) -> None:
        self._core = core
        self._config = config
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        core.add_listener(self._on_readiness)

    async def _on_readiness(self, name: str, serving: bool) -> None:
        if self._loop is not None:
            await run_on(self._loop, self._set_health(name, serving))

    async def _set_health(self, name: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for health_name in ("", SERVICE_NAME) if name == "" else (name,):
            await self.health.set(health_name, status)

    async def start(self) -> int:
        """Listen, reporting NOT_SERVING until the core is warm; returns the bound port."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mrl-grpc", daemon=True)
        self._thread.start()
        try:
            self.port = await run_on(self._loop, self._start(asyncio.get_running_loop()))
        except BaseException:
            await self._end_loop()
            raise
        mode = "TLS" if self._config.tls else "plaintext"
        log.info("gRPC listening on %s:%d (%s)", self._config.host, self.port, mode)
        return self.port

    async def _start(self, core_loop: asyncio.AbstractEventLoop) -> int:
        for name in ("", SERVICE_NAME, *self._core.models):
            await self.health.set(name, NOT_SERVING)
        # First in the list, so it wraps whatever handler the rest choose (the auth refusal's included).
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor(IN_BAND_METHODS)]
        if self._config.auth_token is not None:
            denied = self._core.metrics.auth_denied
            interceptors.append(BearerTokenInterceptor(self._config.auth_token, lambda m: denied.labels(m).inc()))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self._config.limits.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                # Two servers must not silently share one port.
                ("grpc.so_reuseport", 0),
                # Past the cap a new connection is closed at once (the client sees UNAVAILABLE and retries),
                # and idle ones go away, before they use up the process's file descriptors.
                ("grpc.max_allowed_incoming_connections", self._config.max_connections),
                # Calls open at once on one connection (an idle EmbedStream costs a task): more wait at the client.
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.max_connection_idle_ms", int(self._config.idle_timeout_s * 1000)),
                *self._age_options(),
            ],
        )
        service = EmbedderService(self._core, core_loop, self._config.stream_window, self._config.auto_truncate)
        pb_grpc.add_EmbedderServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self._config.host}:{self._config.port}"
        try:
            if self._config.tls is not None:
                tls = self._config.tls
                credentials = grpc.ssl_server_credentials([(tls.private_key, tls.certificate_chain)])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} ({e}): is the port in use?") from None
        await server.start()
        self._server = server
        return port

    def _age_options(self) -> list[tuple[str, int]]:
        """gRPC's connection-age settings: a connection past the age gets GOAWAY and its calls the shutdown grace."""
        age = self._config.max_connection_age_s
        if age is None:
            return []
        grace_ms = int(min(self._config.shutdown_grace_s * 1000, GRPC_MAX_INT))
        return [("grpc.max_connection_age_ms", int(age * 1000)), ("grpc.max_connection_age_grace_ms", grace_ms)]

    async def stop(self, grace: float) -> None:
        """Refuse new calls and let calls in flight finish, for up to `grace` seconds."""
        if self._loop is not None:
            await run_on(self._loop, self._stop(grace))
            await self._end_loop()

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _end_loop(self) -> None:
        """Stop the door's loop and wait for its thread (without blocking the main loop)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()
