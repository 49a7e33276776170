"""The toolkit's one error tree; the CLIs and the gRPC server translate it at their boundary."""

from __future__ import annotations

ECHO_CHARS = 100
"""The most of a caller's string an error message repeats: a 100 KB name must not make a 100 KB error."""


def shorten(value: object, limit: int = ECHO_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length said, for echoing in errors."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else "cut"
    return f"{text[:limit]}... ({size})"


class MrlError(Exception):
    """Base of every error the toolkit raises on purpose."""


class InvalidInputError(MrlError, ValueError):
    """The caller asked for something the model cannot do (bad dims, unknown prompt, ...)."""

    field: str | None = None
    """The request option at fault, by its `EmbedOptions` name (front ends map it to their own field names)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class DimsError(InvalidInputError):
    """Requested dims outside what the model or artifact offers."""

    field = "dims"


class LayersError(InvalidInputError):
    """A requested depth (number of encoder layers) that no profile of the artifact runs."""

    field = "layers"


class UnknownPromptError(InvalidInputError):
    """A prompt name the model does not define."""

    field = "prompt_name"


class InputTooLongError(InvalidInputError):
    """A text longer than the model's max length while truncation is off."""

    field = "inputs"


class EncodingError(InvalidInputError):
    """An output encoding that is unknown, or that this artifact cannot produce (int8 without calibration)."""

    field = "encoding"


class NotFoundError(MrlError, LookupError):
    """A named thing (model, profile) that does not exist."""


class ArtifactError(MrlError):
    """An artifact directory that is missing, unreadable or malformed."""


class IntegrityError(ArtifactError):
    """A file whose sha256 does not match the manifest (corrupt or tampered)."""


class SchemaVersionError(ArtifactError):
    """A manifest written by a newer toolkit than this one."""


class AcceptanceError(MrlError):
    """An artifact whose acceptance test fails on this machine: its backend computes other vectors than the
    export checked (another CPU's int8 kernels, a GPU, another onnxruntime)."""


class BackendUnavailableError(MrlError):
    """A backend whose libraries or hardware are not present here."""
