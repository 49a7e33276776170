"""Serving's own errors and the one table that maps every toolkit error to a gRPC status code."""

from __future__ import annotations

import grpc

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


class RequestExpiredError(ServingError):
    """The caller's deadline passed while its request waited in the queue."""


class NotReadyError(ServingError):
    """The model is still warming up, or the server is shutting down."""


class UnsupportedError(InvalidInputError):
    """A request for something the contract names but this server does not do yet."""


# Checked in order: the first class the error is an instance of decides (subclasses before bases).
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (MrlError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an error; errors not our own become INTERNAL without details."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code, str(error)
    # An unexpected exception is a server bug: do not leak its text to callers (the log has it).
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
