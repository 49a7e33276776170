"""What every HTTP API of the server (OpenAI's, Cohere's) answers for each kind of failure: the status and the
headers that tell a client when to retry. Each API writes its own error body around them."""

from __future__ import annotations

from mrl.serving.errors import ErrorKind

STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.CANCELLED: 499,  # the client left; nobody reads it
    ErrorKind.FAILED_PRECONDITION: 500,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
}
"""The statuses client libraries retry correctly (429, 503, 504)."""
RETRY_AFTER_S = 1
"""Sent as Retry-After with 429 (queue full) and 503 (warming up, draining)."""


def status_and_headers(kind: ErrorKind) -> tuple[int, dict[str, str]]:
    """The HTTP status of a failure of `kind`, and its Retry-After or WWW-Authenticate header."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if kind in (ErrorKind.QUEUE_FULL, ErrorKind.UNAVAILABLE) else {}
    if kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return STATUS[kind], headers
