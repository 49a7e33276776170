"""The HTTP door's socket: aiohttp's connection handling with OpenAI-shaped errors and a cap on connections.

aiohttp answers what its own parser refuses (oversized headers, a request line of 100 KB, Content-Length with
Transfer-Encoding, TLS on the plain port) with plain text, logged with a traceback each; here they get
OpenAI's JSON error shape and one log line. Past `max_connections` open connections a new one is answered
503 in JSON and closed, before it holds a file descriptor for long.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mrl.runtime.errors import shorten
from mrl.serving.errors import ErrorKind
from mrl.serving.http_errors import RETRY_AFTER_S
from mrl.serving.openai_protocol import error_body

log = logging.getLogger(__name__)

KIND_OF_STATUS = {
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.TOO_LARGE,
    500: ErrorKind.INTERNAL,
    503: ErrorKind.UNAVAILABLE,
    504: ErrorKind.DEADLINE_EXCEEDED,
}
"""What aiohttp's own refusals are, for OpenAI's `type` and `code` (anything else under 500: invalid)."""
REFUSAL_LINGER_S = 1.0
"""How long a refused connection stays open to let its client read the answer before the socket closes."""


class JsonErrorHandler(RequestHandler):
    """aiohttp's request handler, answering the requests it cannot parse in OpenAI's error shape."""

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """One log line and a JSON error, where aiohttp would log a traceback and answer plain text."""
        if status >= 500:
            log.error("HTTP: request from %s failed: %r", request.remote, exc)
            text = "internal error; see the server log"
        else:
            reason = message or (str(exc) if exc is not None else "bad request")
            log.info("HTTP: refused a malformed request from %s: %s", request.remote, shorten(reason, 200)[1:-1])
            text = f"the request is not valid HTTP ({shorten(reason, 200)[1:-1]}): send a well-formed HTTP/1.1 request"
        if request.writer.output_size > 0:  # part of a response went out: the connection is broken, as aiohttp says
            raise ConnectionError("a response was partly sent; cannot send the error")
        kind = KIND_OF_STATUS.get(status, ErrorKind.INVALID_ARGUMENT if status < 500 else ErrorKind.INTERNAL)
        response = web.Response(status=status, body=error_body(text, kind), content_type="application/json")
        response.force_close()
        return response


class Refusal(asyncio.Protocol):
    """Answers a connection over the cap with a 503 in JSON, then closes it."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Answer at once; close once the client has had a moment to read it."""
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._reply)
        if transport.can_write_eof():
            transport.write_eof()
        self._transport = transport
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        """What the client sends is not read: it is refused."""

    def eof_received(self) -> bool:
        """The client has read the answer and hung up."""
        if self._transport is not None:
            self._transport.close()
        return False


def refusal_reply(limit: int) -> bytes:
    """The raw 503 answer a connection over the cap gets."""
    body = error_body(
        f"this server has {limit} connections open, its limit (--max-connections): reuse a connection, "
        "close idle ones, or retry shortly",
        ErrorKind.UNAVAILABLE,
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HttpListener:
    """The listening socket of an aiohttp runner, with `JsonErrorHandler` for each connection and a cap."""

    def __init__(self, runner: web.BaseRunner, *, max_connections: int, handler_options: dict[str, Any]) -> None:
        self._runner = runner
        self._max = max_connections
        self._options = handler_options
        self._reply = refusal_reply(max_connections)
        self._server: asyncio.AbstractServer | None = None

    def _protocol(self) -> asyncio.Protocol:
        manager = self._runner.server
        assert manager is not None, "set the runner up first"
        if len(manager.connections) >= self._max:
            log.warning("HTTP: refused a connection: %d open, the limit (--max-connections)", self._max)
            return Refusal(self._reply)
        return JsonErrorHandler(manager, loop=asyncio.get_running_loop(), **self._options)

    async def start(self, host: str, port: int, context: ssl.SSLContext | None) -> int:
        """Listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, ssl=context, reuse_port=False)
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop accepting connections (the runner closes the open ones)."""
        if self._server is not None:
            self._server.close()
            self._server = None
