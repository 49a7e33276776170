"""Server interceptors of the gRPC front end: requests that do not parse, and calls without the bearer token.

Both answer a call with a handler of their own of the same kind (unary or streaming, each way) as the one
the server chose, so they share one table of handler kinds.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from mrl.serving.auth import token_matches

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
"""Load balancers and orchestrators probe health without credentials."""

_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def kind(handler: grpc.RpcMethodHandler) -> tuple[bool, bool]:
    """(request streaming, response streaming) of a method handler."""
    return bool(handler.request_streaming), bool(handler.response_streaming)


def same_kind(
    handler: grpc.RpcMethodHandler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and serializers that runs `behaviour` (and its own deserializer, if given)."""
    return _MAKERS[kind(handler)](
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class Malformed:
    """What a request's bytes became when they were not the message the method takes."""

    error: str

    def message(self) -> str:
        """What the caller is told."""
        return (
            f"the request is not a valid message for this method ({self.error}): send a serialized request of its type"
        )


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or whatever a parser raises on garbage
            return Malformed(type(e).__name__)

    return parse


def guard_malformed(handler: grpc.RpcMethodHandler, in_band: bool = False) -> grpc.RpcMethodHandler:
    """`handler` with requests that do not parse answered INVALID_ARGUMENT, not gRPC's own UNKNOWN.

    An `in_band` method (a stream that answers each request in its responses) receives the malformed request
    (a `Malformed`) and answers it itself, as any failed request, and goes on.
    """
    if handler.request_deserializer is None:
        return handler
    lenient = _lenient(handler.request_deserializer)
    if in_band:
        return handler._replace(request_deserializer=lenient)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())

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

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await check(request, context)
        async for response in _responses(handler.unary_stream(request, context)):
            yield response

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in _responses(handler.stream_stream(checked(requests, context), context)):
            yield response

    behaviours = {
        (False, False): unary_unary,
        (True, False): stream_unary,
        (False, True): unary_stream,
        (True, True): stream_stream,
    }
    return same_kind(handler, behaviours[kind(handler)], lenient)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """The responses of a streaming behaviour, whether it yields them or writes them with `context.write`."""
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers requests whose bytes do not parse with INVALID_ARGUMENT, for every service of the server."""

    def __init__(self, in_band: tuple[str, ...] = ()) -> None:
        self._in_band = in_band
        """Full names (`/package.Service/Method`) of the methods that answer malformed requests in band."""
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
            guarded = guard_malformed(handler, method in self._in_band)
            self._guarded[method] = (handler, guarded)
        return guarded


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>`; health checks stay open."""

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token is empty: write a token to the --auth-token-file")
        self._token = token
        self._on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on when it carries the token, else answer it with UNAUTHENTICATED."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if token_matches(handler_call_details.invocation_metadata, self._token):
            return handler
        log.debug("refused %s: missing or wrong bearer token", method)
        if self._on_denied is not None:
            self._on_denied(method)
        message = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return same_kind(handler, deny)
