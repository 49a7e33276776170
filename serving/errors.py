"""Serving's own errors, and what kind of failure each toolkit error is, for every transport to translate.

The core classifies an error once (`classify`); each front end's protocol module owns one small table from
`ErrorKind` to its own status (gRPC codes in `grpc_protocol.py`, HTTP statuses in `openai_protocol.py`).
"""

from __future__ import annotations

import enum

from mrl.runtime.errors import (
    ArtifactError,
    BackendUnavailableError,
    InvalidInputError,
    MrlError,
    NotFoundError,
)


class ServingError(MrlError):
    """Base of the errors the server raises itself."""


class QueueFullError(ServingError):
    """The batch queue holds as many tokens as it may: the caller should back off and retry."""


class RequestTooLargeError(ServingError):
    """A request larger than the server ever takes (bytes or tokens): retrying will not help, splitting will."""


class RequestExpiredError(ServingError):
    """The caller's deadline passed before its request was computed."""


class NotReadyError(ServingError):
    """The model is still warming up, or the server is shutting down."""


class UnsupportedError(InvalidInputError):
    """A request for something the contract names but this server does not do."""


class ErrorKind(enum.Enum):
    """What went wrong, independent of the wire; also the `outcome` label of the request metrics."""

    OK = "ok"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"


# Checked in order: the first class the error is an instance of decides (subclasses before bases).
_KINDS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (InvalidInputError, ErrorKind.INVALID_ARGUMENT),
    (NotFoundError, ErrorKind.NOT_FOUND),
    (QueueFullError, ErrorKind.QUEUE_FULL),
    (RequestTooLargeError, ErrorKind.TOO_LARGE),
    (RequestExpiredError, ErrorKind.DEADLINE_EXCEEDED),
    (NotReadyError, ErrorKind.UNAVAILABLE),
    (BackendUnavailableError, ErrorKind.UNAVAILABLE),
    (ArtifactError, ErrorKind.FAILED_PRECONDITION),
    (MrlError, ErrorKind.INTERNAL),
)


def classify(error: BaseException) -> ErrorKind:
    """The kind of failure `error` is; anything not raised on purpose is INTERNAL."""
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return kind
    return ErrorKind.INTERNAL


def public_message(error: BaseException) -> str:
    """What a caller may read about `error`: ours in full; an unexpected one only by type (the log has it)."""
    if isinstance(error, MrlError):
        return str(error)
    return f"internal error ({type(error).__name__}); see the server log"
