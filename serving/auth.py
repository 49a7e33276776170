"""Bearer-token auth as a server interceptor: a call without the right token never reaches a handler."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Load balancers and orchestrators probe health without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def token_matches(metadata: tuple[tuple[str, Any], ...] | None, token: str) -> bool:
    """Whether the call's `authorization` metadata is `Bearer <token>` (compared in constant time)."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, given = text.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
    return False


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts with UNAUTHENTICATED."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
        return _denied(handler, "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")
