"""The HTTP front end: aiohttp on the server's own event loop (the one grpc.aio runs on), so HTTP and gRPC
requests share each model's batches.

Thin on purpose: read the body, let a protocol module parse it into an `EmbedQuery` (`openai_protocol` for
OpenAI's API, `cohere_protocol` for Cohere's), call the core, write the result or the error back. Routes:
POST /v1/embeddings, POST /v2/embed, GET /v1/models[/NAME], GET /health and, when asked, GET /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mrl.runtime.errors import shorten
from mrl.serving import cohere_protocol as cohere
from mrl.serving.auth import token_matches
from mrl.serving.config import ServerConfig
from mrl.serving.core import EmbedCore, EmbedQuery, deadline_after
from mrl.serving.errors import ErrorKind, RequestExpiredError, RequestTooLargeError
from mrl.serving.http_listener import HttpListener
from mrl.serving.model import EmbedResult, ServedModel
from mrl.serving.openai_protocol import (
    ProtocolError,
    embeddings_response,
    error_reply,
    error_response,
    model_entry,
    models_response,
    parse_embeddings_request,
)

log = logging.getLogger(__name__)

TRANSPORT = "http"
OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Probes and scrapers need no token, as on gRPC's health service."""
COHERE_PATH = "/v2/embed"
TIMEOUT_HEADER = "X-Request-Timeout"
"""Seconds the caller will wait; past them the request is dropped and answered 504 (gRPC has its deadline)."""
ROUTES = "POST /v1/embeddings, POST /v2/embed, GET /v1/models, GET /v1/models/NAME, GET /health"
IDENTITY = frozenset({"", "identity"})
"""Content-Encodings taken: none. A compressed body is refused, not inflated: 1 MB of gzip inflates to 1 GiB,
and inflating it held the event loop (health included) for seconds."""
LARGEST_BODIES_AT_ONCE = 8
"""Bodies in handlers at once, counted in --max-message-bytes: past it a request is refused 429 before its body
is read (a chunked body counts as the largest). Without it, a thousand connections sending 16 MiB each held
16 GB (memory for bodies grew with connections: 24 unfinished 16 MiB bodies, +263 MB)."""
LARGE_BODY_BYTES = 1 << 20
"""Bodies this large are parsed in a worker thread: counting a 16 MiB body's values and parsing it take ~100 ms
of C calls that hold the interpreter's lock, and from a thread the loop waits for one call at a time, not all."""
Parsed = TypeVar("Parsed")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RESERVED = "mrl.body_bytes"
"""The request's key for what its body counts against the bodies held at once (`LARGEST_BODIES_AT_ONCE`)."""
ErrorShape = Callable[[ErrorKind, str, str | None], tuple[int, dict[str, str], bytes]]
"""A door's error reply: (status, headers, body) for a failure of a kind, with the field at fault."""


def json_reply(status: int, headers: dict[str, str], body: bytes) -> web.Response:
    """A JSON response."""
    return web.Response(status=status, headers=headers, body=body, content_type="application/json")


def over_limit(limit: int) -> str:
    """What a body over the size limit is told."""
    return f"the body is over this server's limit of {limit} bytes: send fewer or shorter texts per request"


def request_timeout(value: str | None) -> float | None:
    """The X-Request-Timeout header in seconds (None: none given)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ProtocolError(f"{TIMEOUT_HEADER} must be a positive number of seconds like 5, not {shorten(value)}")
    return seconds


async def parse_body(parse: Callable[..., Parsed], body: bytes, **options: Any) -> Parsed:
    """`parse(body, **options)`, in a worker thread for a large body."""
    if len(body) < LARGE_BODY_BYTES:
        return parse(body, **options)
    return await asyncio.to_thread(parse, body, **options)


class SlowBodyError(Exception):
    """A request body that stopped arriving: answered 408 and the connection closed."""

    def response(self, shape: ErrorShape = error_reply) -> web.Response:
        """The 408, in OpenAI's error shape or the `shape` given (the door's)."""
        _, headers, body = shape(ErrorKind.INVALID_ARGUMENT, str(self), None)
        reply = json_reply(408, headers, body)
        reply.force_close()
        return reply


class HttpFrontEnd:
    """An aiohttp server over the core: OpenAI embeddings and models, health, optional metrics, auth, TLS."""

    name = TRANSPORT

    @staticmethod
    def wanted(config: ServerConfig) -> bool:
        """When an HTTP port is configured."""
        return config.http_port is not None

    def __init__(self, core: EmbedCore, config: ServerConfig) -> None:
        self._core = core
        self._config = config
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: HttpListener | None = None
        self._created = int(time.time())
        self._body_bytes = 0
        """Bytes of the bodies whose requests are being handled (their Content-Length, or the limit)."""

    def app(self) -> web.Application:
        """The aiohttp application: routes, auth and JSON errors for everything."""
        app = web.Application(client_max_size=self._config.limits.max_message_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post(COHERE_PATH, self.cohere_embed)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name}", self.model)
        app.router.add_get("/health", self.health)
        if self._config.http_metrics:
            app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer-token check, and JSON for routing errors (404, 405) too: Cohere's shape on its route,
        OpenAI's everywhere else."""
        reply = cohere.error_reply if request.path == COHERE_PATH else error_reply
        if not self._authorized(request):
            route = request.match_info.route.resource
            self._core.metrics.auth_denied.labels(route.canonical if route else "(unknown)").inc()
            message = "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"
            return json_reply(*reply(ErrorKind.UNAUTHENTICATED, message))
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in IDENTITY and request.match_info.http_exception is None:
            _, headers, body = reply(
                ErrorKind.INVALID_ARGUMENT,
                f"compressed request bodies are not accepted (Content-Encoding: {shorten(encoding)[1:-1]}): "
                "send the JSON uncompressed",
                "Content-Encoding",
            )
            response = json_reply(415, headers, body)
            response.force_close()  # the unread body is drained as is (never inflated), then the connection closes
            return response
        size = self._body_size(request)
        limit = self._config.limits.max_message_bytes
        if size > limit or self._body_bytes + size > LARGEST_BODIES_AT_ONCE * limit:
            too_large = size > limit
            _, headers, body = reply(
                ErrorKind.TOO_LARGE if too_large else ErrorKind.QUEUE_FULL,
                over_limit(limit)
                if too_large
                else "this server is reading as many large request bodies as it holds at once: retry shortly",
                None,
            )
            response = json_reply(413 if too_large else 429, headers, body)
            response.force_close()  # its body is not read: refused before a byte of it is held
            return response
        self._body_bytes += size
        request[RESERVED] = size
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as e:
            _, headers, body = error_reply(
                ErrorKind.INVALID_ARGUMENT, f"{request.method} is not allowed on {shorten(request.path)}: use {ROUTES}"
            )
            return json_reply(405, {**headers, "Allow": ",".join(sorted(e.allowed_methods))}, body)
        except web.HTTPNotFound:
            return json_reply(*error_reply(ErrorKind.NOT_FOUND, f"no route {shorten(request.path)}: use {ROUTES}"))
        finally:
            self._body_bytes -= request[RESERVED]

    def _body_size(self, request: web.Request) -> int:
        """What the request's body may hold: its Content-Length, the limit for a chunked one, 0 for none."""
        if request.content_length is not None:
            return request.content_length
        return self._config.limits.max_message_bytes if request.body_exists else 0

    def _authorized(self, request: web.Request) -> bool:
        token = self._config.auth_token
        if token is None or request.path in OPEN_PATHS:
            return True
        return token_matches((("authorization", request.headers.get("Authorization", "")),), token)

    async def _body(self, request: web.Request) -> tuple[bytes, float | None]:
        """The request's body and its timeout (X-Request-Timeout, in seconds; None: none)."""
        return await self.read_body(request), request_timeout(request.headers.get(TIMEOUT_HEADER))

    async def embeddings(self, request: web.Request) -> web.Response:
        """POST /v1/embeddings (OpenAI's API)."""
        try:
            body, timeout = await self._body(request)
            parsed = await parse_body(
                parse_embeddings_request,
                body,
                deadline=deadline_after(timeout),
                truncate_default=self._config.auto_truncate,
                max_inputs=self._config.limits.max_inputs_per_request,
            )
            model, result = await self._embed(parsed.query, timeout)
        except SlowBodyError as e:
            return e.response()
        except Exception as e:
            return json_reply(*error_response(e))
        body = embeddings_response(result, model.name, as_base64=parsed.base64, several=parsed.several)
        return json_reply(200, {}, body)

    async def cohere_embed(self, request: web.Request) -> web.Response:
        """POST /v2/embed (Cohere's API): every embedding type asked for from one forward pass."""
        try:
            body, timeout = await self._body(request)
            limit = self._config.limits.max_inputs_per_request
            parsed = await parse_body(cohere.parse_request, body, deadline=deadline_after(timeout), max_inputs=limit)
            prompts = self._core.resolve(parsed.query.model).embedder.manifest.prompts
            _, result = await self._embed(cohere.with_prompt(parsed, prompts), timeout)
        except SlowBodyError as e:
            return e.response(cohere.error_reply)
        except Exception as e:
            return json_reply(*cohere.error_response(e))
        return json_reply(200, {}, cohere.response_body(parsed, result))

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body, within the size limit and the idle timeout (a body that stops arriving would
        hold the connection and its handler for ever: the idle timeout applies only between requests)."""
        limit, patience = self._config.limits.max_message_bytes, self._config.idle_timeout_s
        try:
            body = await asyncio.wait_for(request.read(), patience)
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLargeError(over_limit(limit)) from None
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise SlowBodyError(
                f"the body did not arrive within {patience:g} s (--idle-timeout-s): send it whole, promptly"
            ) from None
        # A chunked body was counted at the limit until read: from now on it holds only its own size.
        self._body_bytes -= request[RESERVED] - len(body)
        request[RESERVED] = len(body)
        return body

    async def _embed(self, query: EmbedQuery, timeout: float | None) -> tuple[ServedModel, EmbedResult]:
        """The core's answer, bounded by the caller's timeout."""
        try:
            return await asyncio.wait_for(self._core.embed(query, TRANSPORT), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise RequestExpiredError(f"the request's {TIMEOUT_HEADER} passed before it was answered") from None

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        return json_reply(200, {}, models_response(self._core.model_infos(), self._created))

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/NAME."""
        try:
            info = self._core.resolve(request.match_info["name"]).info()
        except Exception as e:
            return json_reply(*error_response(e))
        return json_reply(200, {}, orjson.dumps(model_entry(info, self._created)))

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: 200 only while serving; 503 while warming up or draining."""
        ready = {name: m.ready for name, m in self._core.models.items()}
        body = orjson.dumps({"status": self._core.state.value, "models": ready})
        return json_reply(200 if self._core.serving else 503, {}, body)

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus text format."""
        body = generate_latest(self._core.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        """Listen on the configured host and HTTP port; returns the bound port."""
        config = self._config
        host, port = config.host, config.http_port
        # shutdown_timeout: what calls still running when the drain's grace ran out get before being cancelled.
        runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        context = None if config.tls is None else config.tls.ssl_context()
        # keepalive_timeout also closes a connection that never sends a request.
        options = {"access_log": None, "auto_decompress": False, "keepalive_timeout": config.idle_timeout_s}
        listener = HttpListener(runner, max_connections=config.max_connections, handler_options=options)
        try:
            self.port = await listener.start(host, port, context)
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot listen on {host}:{port} for HTTP ({e.strerror}): is the port in use?") from None
        self._runner, self._listener = runner, listener
        log.info("OpenAI-compatible HTTP on %s://%s:%d", "https" if context else "http", host, self.port)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop listening and close the connections (the server drains the core first: see EmbedServer.stop);
        handlers still running get aiohttp's `shutdown_timeout`, set at start, rather than `grace`."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
