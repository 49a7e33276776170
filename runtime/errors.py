"""The toolkit's one error tree; the CLIs and the gRPC server translate it at their boundary."""

from __future__ import annotations


class MrlError(Exception):
    """Base of every error the toolkit raises on purpose."""


class InvalidInputError(MrlError, ValueError):
    """The caller asked for something the model cannot do (bad dims, unknown prompt, ...)."""


class DimsError(InvalidInputError):
    """Requested dims outside what the model or artifact offers."""


class LayersError(InvalidInputError):
    """A requested depth (number of encoder layers) that no profile of the artifact runs."""


class UnknownPromptError(InvalidInputError):
    """A prompt name the model does not define."""


class InputTooLongError(InvalidInputError):
    """A text longer than the model's max length while truncation is off."""


class NotFoundError(MrlError, LookupError):
    """A named thing (model, profile) that does not exist."""


class ArtifactError(MrlError):
    """An artifact directory that is missing, unreadable or malformed."""


class IntegrityError(ArtifactError):
    """A file whose sha256 does not match the manifest (corrupt or tampered)."""


class SchemaVersionError(ArtifactError):
    """A manifest written by a newer toolkit than this one."""


class BackendUnavailableError(MrlError):
    """A backend whose libraries or hardware are not present here."""
