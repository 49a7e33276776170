"""The OpenAI embeddings protocol as pure functions: a request body into an `EmbedQuery`, a result, the model
list and errors into OpenAI's JSON (and the one `ErrorKind` -> HTTP status table). No server code here:
`http_service.py` does the plumbing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from mrl.runtime.encodings import ENCODINGS, little_endian
from mrl.runtime.errors import ECHO_CHARS, shorten
from mrl.runtime.plan import EmbedOptions, OutputSpec
from mrl.serving.core import EmbedQuery
from mrl.serving.errors import ErrorKind, UnsupportedError, classify, public_message
from mrl.serving.model import EmbedResult, ModelInfo

FIELDS = (
    "input",
    "model",
    "dimensions",
    "encoding_format",
    "output_dtype",
    "user",
    "prompt_name",
    "truncate",
    "layers",
)
FORMATS = ("float", "base64", *(e for e in ENCODINGS if e != "float32"))
"""encoding_format: OpenAI's float and base64, and the encodings as JSON numbers."""
DTYPES = ("float", *ENCODINGS)
"""output_dtype: what base64 (or JSON numbers) hold; "float" is float32."""
PARAMS = {
    "dims": "dimensions",
    "layers": "layers",
    "encoding": "output_dtype",
    "prompt_name": "prompt_name",
    "inputs": "input",
    "model": "model",
}
"""The body's field for each `EmbedOptions` field an error names (`InvalidInputError.field`)."""
EXAMPLE = '{"input": ["a text"], "dimensions": 256}'
OWNER = "mrl-toolkit"

# OpenAI's error `type`s, with the statuses its client libraries retry correctly (429, 503, 504).
HTTP_STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error"),
    ErrorKind.TOO_LARGE: (413, "invalid_request_error"),
    ErrorKind.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorKind.CANCELLED: (499, "invalid_request_error"),  # the client left; nobody reads it
    ErrorKind.FAILED_PRECONDITION: (500, "server_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
    ErrorKind.UNAVAILABLE: (503, "server_error"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "server_error"),
}
RETRY_AFTER_S = 1
"""Sent as Retry-After with 429 (queue full) and 503 (warming up, draining)."""


class ProtocolError(UnsupportedError):
    """A body that is not a valid embeddings request; `param` names the field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, kw_only=True)
class EmbeddingsRequest:
    """A parsed POST /v1/embeddings: the core's query and how to write the vectors back."""

    query: EmbedQuery
    base64: bool
    """True: each embedding is base64 of its bytes; False: JSON numbers."""


def _type_name(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _optional(data: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    """Field `name` if present and not null, checked to be of `kind`."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ProtocolError(f"{name} must be {what}, not {_type_name(value)}", name)
    return value


def parse_input(value: Any) -> list[str]:
    """OpenAI's `input`: a string or a list of strings (token-id arrays are refused)."""
    if value is None:
        raise ProtocolError(f"input is missing: send a string or a list of strings, like {EXAMPLE}", "input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ProtocolError(f"input must be a string or a list of strings, not {_type_name(value)}", "input")
    if not value:
        raise ProtocolError("input is empty: send at least one text", "input")
    ids = all(isinstance(t, int) and not isinstance(t, bool) for t in value) or all(isinstance(t, list) for t in value)
    if ids:
        raise ProtocolError("token-id arrays are not supported: send the texts as strings", "input")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ProtocolError(f"input[{i}] must be a string, not {_type_name(text)}", "input")
    return value


def parse_count(value: Any, name: str, example: int) -> int | None:
    """A whole number (OpenAI's `dimensions`, our `layers`), or absent; the model's plan checks its range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name} must be a whole number like {example}, not {shorten(value)}", name)
    return value


def output_encoding(encoding_format: str | None, output_dtype: str | None) -> tuple[str, bool]:
    """(the runtime encoding, base64 or not) that `encoding_format` and `output_dtype` ask for."""
    if encoding_format is not None and encoding_format not in FORMATS:
        raise ProtocolError(
            f"unknown encoding_format {shorten(encoding_format)}; choose from {', '.join(FORMATS)}", "encoding_format"
        )
    if output_dtype is not None and output_dtype not in DTYPES:
        raise ProtocolError(
            f"unknown output_dtype {shorten(output_dtype)}; choose from {', '.join(DTYPES)}", "output_dtype"
        )
    dtype = "float32" if output_dtype in (None, "float") else output_dtype
    if encoding_format == "base64":
        return dtype, True
    if encoding_format in (None, "float"):
        if encoding_format == "float" and dtype != "float32":
            raise ProtocolError(
                f"encoding_format float means float32 numbers: for {dtype} numbers set encoding_format to {dtype}, "
                f"for its bytes set encoding_format to base64",
                "output_dtype",
            )
        return dtype, False
    if output_dtype is not None and dtype != encoding_format:
        raise ProtocolError(
            f"encoding_format {encoding_format} and output_dtype {dtype} disagree: give one of them", "output_dtype"
        )
    return encoding_format, False


def parse_embeddings_request(body: bytes, *, deadline: float | None = None) -> EmbeddingsRequest:
    """A POST /v1/embeddings body as the core's query; ProtocolError says what to fix."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"the body is not valid JSON ({e}): send an object like {EXAMPLE}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the body must be a JSON object like {EXAMPLE}, not {_type_name(data)}")
    unknown = [name for name in data if name not in FIELDS]
    if unknown:
        raise ProtocolError(
            f"unknown field {shorten(unknown[0])}; this endpoint takes {', '.join(FIELDS)}", unknown[0][:ECHO_CHARS]
        )
    texts = parse_input(data.get("input"))
    encoding, as_base64 = output_encoding(
        _optional(data, "encoding_format", str, "a string"), _optional(data, "output_dtype", str, "a string")
    )
    _optional(data, "user", str, "a string")  # accepted and ignored, as OpenAI's end-user id
    options = EmbedOptions(
        outputs=(OutputSpec(dims=parse_count(data.get("dimensions"), "dimensions", 256), encoding=encoding),),
        layers=parse_count(data.get("layers"), "layers", 3),
        prompt_name=_optional(data, "prompt_name", str, "a string"),
        truncate=bool(_optional(data, "truncate", bool, "true or false")),
    )
    query = EmbedQuery(
        texts=texts, model=_optional(data, "model", str, "a string") or "", options=options, deadline=deadline
    )
    return EmbeddingsRequest(query=query, base64=as_base64)


def embeddings_response(result: EmbedResult, model: str, *, as_base64: bool) -> bytes:
    """OpenAI's embeddings response as JSON bytes, with the dims, layers and output_dtype used as extra fields."""
    (output,), (rows,) = result.plan.outputs, result.vectors
    if as_base64:
        values: Sequence[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian(rows)]
    else:
        values = list(rows)  # numpy rows: orjson writes them without a Python float per value
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens},
        "dimensions": output.dims,
        "layers": result.plan.layers,
        "output_dtype": output.encoding,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_entry(info: ModelInfo, created: int) -> dict[str, Any]:
    """One model in OpenAI's shape, with what the gRPC ModelInfo says as extra fields."""
    return {
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "full_dimensions": info.full_dims,
        "default_dimensions": info.default_dims,
        "trained_dimensions": list(info.trained_dims),
        "layers": list(info.layers),
        "default_layers": info.default_layers,
        "total_layers": info.total_layers,
        "trained_layers": list(info.trained_layers),
        "profiles": [
            {"name": p.name, "dimensions": p.dims, "precision": p.precision, "layers": p.layers} for p in info.profiles
        ],
        "max_input_tokens": info.max_input_tokens,
        "prompts": info.prompts,
        "default_prompt": info.default_prompt,
        "precision": info.precision,
        "encodings": list(info.encodings),
        "ready": info.ready,
    }


def models_response(infos: Sequence[ModelInfo], created: int) -> bytes:
    """GET /v1/models: OpenAI's list shape."""
    return orjson.dumps({"object": "list", "data": [model_entry(i, created) for i in infos]})


def error_body(message: str, kind: ErrorKind, param: str | None = None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}; `code` is our outcome name."""
    _, error_type = HTTP_STATUS[kind]
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": kind.value}})


def error_reply(kind: ErrorKind, message: str, param: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for a failure of `kind`."""
    status, _ = HTTP_STATUS[kind]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if kind in (ErrorKind.QUEUE_FULL, ErrorKind.UNAVAILABLE) else {}
    if kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return status, headers, error_body(message, kind, param)


def error_response(error: BaseException) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an error raised while handling a request; `param` names the body's field at
    fault, whether the protocol or the model's plan found it."""
    param = getattr(error, "param", None) or PARAMS.get(getattr(error, "field", None) or "")
    return error_reply(classify(error), public_message(error), param)
