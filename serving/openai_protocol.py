"""The OpenAI embeddings protocol as pure functions: a request body into an `EmbedQuery`, a result, the model
list and errors into OpenAI's JSON (statuses from `http_errors`). No server code here: `http_service.py` does
the plumbing.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from mrl.runtime.encodings import ENCODINGS, little_endian
from mrl.runtime.errors import ECHO_CHARS, shorten
from mrl.runtime.plan import MAX_OUTPUTS, EmbedOptions, OutputSpec
from mrl.serving.core import EmbedQuery, too_many_inputs
from mrl.serving.errors import ErrorKind, UnsupportedError, classify, public_message
from mrl.serving.http_errors import status_and_headers
from mrl.serving.json_values import too_many_values
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
    "raw_bytes",
    "outputs",
    "truncation_direction",
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
    "outputs": "outputs",
    "truncation_direction": "truncation_direction",
}
"""The body's field for each `EmbedOptions` field an error names (`InvalidInputError.field`)."""
EXAMPLE = '{"input": ["a text"], "dimensions": 256}'
OWNER = "mrl-toolkit"

# OpenAI's error `type`s, with the statuses its client libraries retry correctly (429, 503, 504).
ERROR_TYPES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_ARGUMENT: "invalid_request_error",
    ErrorKind.UNAUTHENTICATED: "authentication_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.TOO_LARGE: "invalid_request_error",
    ErrorKind.QUEUE_FULL: "rate_limit_error",
    ErrorKind.CANCELLED: "invalid_request_error",
    ErrorKind.FAILED_PRECONDITION: "server_error",
    ErrorKind.INTERNAL: "server_error",
    ErrorKind.UNAVAILABLE: "server_error",
    ErrorKind.DEADLINE_EXCEEDED: "server_error",
}
"""OpenAI's error `type` of each failure (the status comes from `http_errors`)."""


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
    several: bool = False
    """The request asked for `outputs`: the response lists each item's `embeddings`."""


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


def _truncate(data: Mapping[str, Any], default: bool) -> bool:
    """The body's `truncate`, or `default` where it says nothing (null counts as nothing)."""
    value = _optional(data, "truncate", bool, "true or false")
    return default if value is None else value


def parse_input(value: Any, max_inputs: int | None = None) -> list[str]:
    """OpenAI's `input`: a string or a list of at most `max_inputs` strings (token-id arrays are refused)."""
    if value is None:
        raise ProtocolError(f"input is missing: send a string or a list of strings, like {EXAMPLE}", "input")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ProtocolError(f"input must be a string or a list of strings, not {_type_name(value)}", "input")
    if not value:
        raise ProtocolError("input is empty: send at least one text", "input")
    if message := too_many_inputs(len(value), max_inputs):
        raise ProtocolError(message, "input")
    ids = all(isinstance(t, int) and not isinstance(t, bool) for t in value) or all(isinstance(t, list) for t in value)
    if ids:
        raise ProtocolError(
            "token-id arrays are not supported: send the texts as strings (LangChain's OpenAIEmbeddings sends "
            "tiktoken ids, which are not this model's, unless you set check_embedding_ctx_length=False)",
            "input",
        )
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


def output_encoding(encoding_format: str | None, output_dtype: str | None, raw_bytes: bool = False) -> tuple[str, bool]:
    """(the runtime encoding, base64 or not) that `encoding_format` and `output_dtype` ask for; base64 of any
    dtype but float32 only with `raw_bytes` (the openai SDK decodes base64 as float32)."""
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
        if dtype != "float32" and not raw_bytes:
            raise ProtocolError(
                f"output_dtype {dtype} with encoding_format base64 would be misread: the openai SDK asks for base64 "
                f"unless told otherwise and decodes it as float32. For {dtype} numbers set encoding_format to "
                f'{dtype} (SDK: extra_body={{"encoding_format": "{dtype}"}}); for its raw bytes in base64, which you '
                'decode yourself, also send "raw_bytes": true',
                "output_dtype",
            )
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


def parse_outputs(value: Any) -> tuple[OutputSpec, ...]:
    """Our `outputs`: a list of {"dimensions", "output_dtype"} objects, every one from the same forward pass."""
    example = '[{"dimensions": 64, "output_dtype": "ubinary"}, {"output_dtype": "int8"}]'
    if not isinstance(value, list) or not value:
        raise ProtocolError(f"outputs must be a non-empty list like {example}, not {_type_name(value)}", "outputs")
    if len(value) > MAX_OUTPUTS:  # before reading each: millions of {} fit in a body
        raise ProtocolError(f"ask for 1 to {MAX_OUTPUTS} outputs, not {len(value)}", "outputs")
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"dimensions", "output_dtype"}:
            raise ProtocolError(
                f"outputs[{i}] must be an object with dimensions and output_dtype, like {example}", "outputs"
            )
        encoding, _ = output_encoding(None, _optional(item, "output_dtype", str, "a string"))
        specs.append(OutputSpec(dims=parse_count(item.get("dimensions"), "dimensions", 64), encoding=encoding))
    return tuple(specs)


def parse_embeddings_request(
    body: bytes, *, deadline: float | None = None, truncate_default: bool = False, max_inputs: int | None = None
) -> EmbeddingsRequest:
    """A POST /v1/embeddings body as the core's query (`truncate_default`: what a body without `truncate`
    gets; `max_inputs`: the most texts taken); ProtocolError says what to fix."""
    if max_inputs is not None and (message := too_many_values(body, max_inputs)):
        raise ProtocolError(message, "input")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"the body is not valid JSON ({e}): send an object like {EXAMPLE}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the body must be a JSON object like {EXAMPLE}, not {_type_name(data)}")
    unknown = next((name for name in data if name not in FIELDS), None)  # the first: a body may hold millions
    if unknown is not None:
        raise ProtocolError(
            f"unknown field {shorten(unknown)}; this endpoint takes {', '.join(FIELDS)}", unknown[:ECHO_CHARS]
        )
    texts = parse_input(data.get("input"), max_inputs)
    encoding_format = _optional(data, "encoding_format", str, "a string")
    raw_bytes = bool(_optional(data, "raw_bytes", bool, "true or false"))
    if raw_bytes and encoding_format != "base64":
        raise ProtocolError("raw_bytes asks for the bytes in base64: set encoding_format to base64 too", "raw_bytes")
    if data.get("outputs") is not None:
        if data.get("dimensions") is not None or data.get("output_dtype") is not None:
            raise ProtocolError(
                "give either outputs or dimensions/output_dtype, not both: with outputs, each output has its own",
                "outputs",
            )
        if encoding_format not in (None, "float", "base64"):
            raise ProtocolError(
                "with outputs, encoding_format is float (JSON numbers) or base64 (each output's bytes); "
                "give each output its output_dtype",
                "encoding_format",
            )
        outputs, as_base64 = parse_outputs(data["outputs"]), encoding_format == "base64"
    else:
        encoding, as_base64 = output_encoding(
            encoding_format, _optional(data, "output_dtype", str, "a string"), raw_bytes
        )
        outputs = (OutputSpec(dims=parse_count(data.get("dimensions"), "dimensions", 256), encoding=encoding),)
    _optional(data, "user", str, "a string")  # accepted and ignored, as OpenAI's end-user id
    options = EmbedOptions(
        outputs=outputs,
        layers=parse_count(data.get("layers"), "layers", 3),
        prompt_name=_optional(data, "prompt_name", str, "a string"),
        truncate=_truncate(data, truncate_default),
        truncation_direction=truncation_direction(data.get("truncation_direction")),
    )
    query = EmbedQuery(
        texts=texts, model=_optional(data, "model", str, "a string") or "", options=options, deadline=deadline
    )
    return EmbeddingsRequest(query=query, base64=as_base64, several=data.get("outputs") is not None)


def truncation_direction(value: Any) -> str:
    """Our `truncation_direction`: "right" (cut the end, the default) or "left" (cut the start), any case (TEI
    sends "Left" and "Right")."""
    if value is None:
        return "right"
    if not isinstance(value, str) or value.lower() not in ("left", "right"):
        raise ProtocolError(
            f"truncation_direction must be left (cut a text's start) or right (cut its end), not {shorten(value)}",
            "truncation_direction",
        )
    return value.lower()


def _values(rows: Any, as_base64: bool) -> Sequence[Any]:
    if as_base64:
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian(rows)]
    return list(rows)  # numpy rows: orjson writes them without a Python float per value


def embeddings_response(result: EmbedResult, model: str, *, as_base64: bool, several: bool = False) -> bytes:
    """OpenAI's embeddings response as JSON bytes, with the dims, layers and output_dtype used as extra fields.

    With `several` outputs (our `outputs` field) each item holds `embeddings`, one per output in the order
    asked, described by the top-level `outputs`; it has no `embedding`, so a client that expects one float
    vector fails loudly instead of misreading the bytes of another encoding.
    """
    plan = result.plan
    body: dict[str, Any] = {"object": "list", "model": model}
    body["usage"] = {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens}
    body["layers"] = plan.layers
    if several:
        columns = [_values(rows, as_base64) for rows in result.vectors]
        body["data"] = [
            {"object": "embedding", "index": i, "embeddings": list(row)}
            for i, row in enumerate(zip(*columns, strict=True))
        ]
        body["outputs"] = [{"dimensions": o.dims, "output_dtype": o.encoding} for o in plan.outputs]
    else:
        (output,), (rows,) = plan.outputs, result.vectors
        values = _values(rows, as_base64)
        body["data"] = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
        body["dimensions"], body["output_dtype"] = output.dims, output.encoding
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
    error_type = ERROR_TYPES[kind]
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": kind.value}})


def error_reply(kind: ErrorKind, message: str, param: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for a failure of `kind`."""
    status, headers = status_and_headers(kind)
    return status, headers, error_body(message, kind, param)


def error_response(error: BaseException) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an error raised while handling a request; `param` names the body's field at
    fault, whether the protocol or the model's plan found it."""
    param = getattr(error, "param", None) or PARAMS.get(getattr(error, "field", None) or "")
    return error_reply(classify(error), public_message(error), param)
