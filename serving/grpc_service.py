"""The gRPC front end: `mrl.v1.Embedder`, health and reflection over the serving core.

Thin on purpose: translate requests into `EmbedQuery`, call the core, and map results and errors back
(the one `ErrorKind` -> status code table below).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime.errors import InvalidInputError
from mrl.serving.auth import BearerTokenInterceptor
from mrl.serving.config import ServerConfig
from mrl.serving.core import EmbedCore, EmbedQuery
from mrl.serving.errors import ErrorKind, classify, public_message
from mrl.serving.model import EmbedResult, ModelInfo

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TRANSPORT = "grpc"

STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an error; errors not our own become INTERNAL without details."""
    return STATUS[classify(error)], public_message(error)


def model_info(info: ModelInfo) -> pb.ModelInfo:
    """What GetModel and ListModels say about a served model."""
    return pb.ModelInfo(
        name=info.name,
        full_dimensions=info.full_dims,
        profiles=[
            pb.Profile(name=p.name, dimensions=p.dims, precision=p.precision, layers=p.layers or 0)
            for p in info.profiles
        ],
        trained_dimensions=list(info.trained_dims),
        max_input_tokens=info.max_input_tokens,
        prompts=info.prompts,
        default_prompt=info.default_prompt or "",
        default_dimensions=info.default_dims,
        precision=info.precision,
        ready=info.ready,
        encodings=[encoding_value(e) for e in info.encodings],
        layers=list(info.layers),
        default_layers=info.default_layers or 0,
        total_layers=info.total_layers or 0,
        trained_layers=list(info.trained_layers),
    )


def encoding_name(value: int) -> str:
    """The runtime's name of a proto Encoding (ENCODING_INT8 -> "int8"; unset means float32)."""
    if value == pb.ENCODING_UNSPECIFIED:
        return "float32"
    if value not in pb.Encoding.values():
        raise InvalidInputError(f"unknown encoding {value}: use one of {', '.join(pb.Encoding.keys()[1:])}")
    return pb.Encoding.Name(value).removeprefix("ENCODING_").lower()


def encoding_value(name: str) -> int:
    """The proto Encoding of a runtime encoding name ("int8" -> ENCODING_INT8)."""
    return pb.Encoding.Value(f"ENCODING_{name.upper()}")


def to_query(request: pb.EmbedRequest, deadline: float | None) -> EmbedQuery:
    """The core's view of an EmbedRequest."""
    return EmbedQuery(
        # Copied out once: each read of a protobuf string field decodes it anew (milliseconds for a MiB).
        texts=list(request.inputs),
        model=request.model,
        dims=request.dimensions if request.HasField("dimensions") else None,
        layers=request.layers if request.HasField("layers") else None,
        prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
        truncate=request.truncate,
        deadline=deadline,
        encoding=encoding_name(request.encoding),
    )


def to_embeddings(result: EmbedResult) -> list[pb.Embedding]:
    """One Embedding per row: float32 in `values`, every other encoding as its bytes in `data`."""
    if result.encoding == "float32":
        return [pb.Embedding(values=row) for row in result.vectors.tolist()]
    little = result.vectors.astype(result.vectors.dtype.newbyteorder("<"), copy=False)
    return [pb.Embedding(data=row.tobytes()) for row in little]


def to_response(result: EmbedResult, model: str, request_id: str, total_seconds: float) -> pb.EmbedResponse:
    """An EmbedResponse holding the embeddings in input order."""
    return pb.EmbedResponse(
        embeddings=to_embeddings(result),
        model=model,
        dimensions=result.dims,
        layers=result.layers or 0,
        encoding=encoding_value(result.encoding),
        usage=pb.Usage(input_tokens=result.input_tokens),
        timing=pb.Timing(
            queue_ms=result.queue_seconds * 1000,
            inference_ms=result.inference_seconds * 1000,
            total_ms=total_seconds * 1000,
        ),
        request_id=request_id,
    )


@dataclass(frozen=True)
class _Malformed:
    """What a request's bytes became when they were not the message the method takes."""

    error: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or whatever a parser raises on garbage
            return _Malformed(type(e).__name__)

    return parse


def _malformed_message(error: _Malformed) -> str:
    return f"the request is not a valid message for this method ({error.error}): send a serialized request of its type"


IN_BAND_METHODS = (f"/{SERVICE_NAME}/EmbedStream",)
"""Streams that answer a malformed request in band, as any failed request, and go on."""


def guard_malformed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with requests that do not parse answered INVALID_ARGUMENT, not gRPC's own UNKNOWN.

    Streams listed in IN_BAND_METHODS receive the malformed request (a `_Malformed`) and answer it themselves.
    """

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(request))

    # A class, not an async generator: an aborted async generator leaves an aclose() task that raises.
    class checked:
        def __init__(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            self._requests, self._context = requests.__aiter__(), context

        def __aiter__(self) -> checked:
            return self

        async def __anext__(self) -> Any:
            request = await self._requests.__anext__()
            await check(request, self._context)
            return request

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await handler.unary_unary(request, context)

    async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await handler.stream_unary(checked(requests, context), context)

    if method in IN_BAND_METHODS:
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer))

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await check(request, context)
        async for response in _responses(handler.unary_stream(request, context)):
            yield response

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in _responses(handler.stream_stream(checked(requests, context), context)):
            yield response

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, unary_unary),
        (True, False): (grpc.stream_unary_rpc_method_handler, stream_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, unary_stream),
        (True, True): (grpc.stream_stream_rpc_method_handler, stream_stream),
    }
    make, behaviour = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        behaviour,
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


async def _responses(result: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behaviour, whether it yields them or writes them with `context.write`."""
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers requests whose bytes do not parse with INVALID_ARGUMENT, for every service of the server."""

    def __init__(self) -> None:
        # Per method, the handler last chosen and its guarded form: wrapping anew on every call cost about
        # 3% of the server's CPU under load. Only served methods get here, so it stays small.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the handler the other interceptors and the server chose."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        chosen, guarded = self._guarded.get(method, (None, None))
        if chosen is not handler:
            guarded = guard_malformed(handler, method)
            self._guarded[method] = (handler, guarded)
        return guarded


class EmbedderService(pb_grpc.EmbedderServicer):
    """Handles Embed, EmbedStream, ListModels and GetModel by calling the core."""

    def __init__(self, core: EmbedCore, stream_window: int) -> None:
        self._core = core
        self._stream_window = stream_window

    async def _handle(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> tuple[pb.EmbedResponse | None, grpc.StatusCode, str]:
        """Run one request; returns the response, or None with the status code and message to send."""
        start = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        try:
            model, result = await self._core.embed(to_query(request, deadline), TRANSPORT)
        except Exception as e:
            return None, *status_for(e)
        response = to_response(result, model.name, request.request_id, time.perf_counter() - start)
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

        async def one(request: pb.EmbedRequest | _Malformed) -> pb.EmbedResponse:
            if isinstance(request, _Malformed):
                error = pb.Error(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=_malformed_message(request))
                return pb.EmbedResponse(error=error)
            response, code, message = await self._handle(request, context)
            if response is not None:
                return response
            return pb.EmbedResponse(request_id=request.request_id, error=pb.Error(code=code.value[0], message=message))

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
    """A grpc.aio server over the core: Embedder, health (fed by the core's readiness), reflection, auth, TLS."""

    def __init__(self, core: EmbedCore, config: ServerConfig) -> None:
        self._core = core
        self._config = config
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        core.add_listener(self._on_readiness)

    async def _on_readiness(self, name: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for health_name in ("", SERVICE_NAME) if name == "" else (name,):
            await self.health.set(health_name, status)

    async def start(self) -> int:
        """Listen, reporting NOT_SERVING until the core is warm; returns the bound port."""
        for name in ("", SERVICE_NAME, *self._core.models):
            await self.health.set(name, NOT_SERVING)
        # First in the list, so it wraps whatever handler the rest choose (the auth refusal's included).
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
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
            ],
        )
        pb_grpc.add_EmbedderServicer_to_server(EmbedderService(self._core, self._config.stream_window), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self._config.host}:{self._config.port}"
        try:
            if self._config.tls is not None:
                tls = self._config.tls
                credentials = grpc.ssl_server_credentials([(tls.private_key, tls.certificate_chain)])
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} ({e}): is the port in use?") from None
        await server.start()
        self._server = server
        mode = "TLS" if self._config.tls else "plaintext"
        log.info("gRPC listening on %s:%d (%s)", self._config.host, self.port, mode)
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new calls and let calls in flight finish, for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()
