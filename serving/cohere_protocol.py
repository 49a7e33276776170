"""Cohere's embed API (`POST /v2/embed`) as pure functions: a request body into the core's query, a result into
Cohere's `embeddings_by_type` response, errors into its `{"id", "message"}` shape. No server code here:
`http_service.py` does the plumbing, as for OpenAI's API.

Every `embedding_types` entry is an output of the same forward pass, at `output_dimension`. `input_type` picks
the model's prompt by `prompt_for`'s rule. `truncate` NONE refuses texts over the model's length, END cuts
their end (Cohere's default), START their start.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from mrl.runtime.encodings import little_endian
from mrl.runtime.errors import shorten
from mrl.runtime.plan import EmbedOptions, OutputSpec
from mrl.serving.core import EmbedQuery, too_many_inputs
from mrl.serving.errors import ErrorKind, UnsupportedError, classify, public_message
from mrl.serving.http_errors import status_and_headers
from mrl.serving.json_values import too_many_values
from mrl.serving.model import EmbedResult

FIELDS = (
    "texts",
    "model",
    "input_type",
    "embedding_types",
    "output_dimension",
    "truncate",
    "max_tokens",
    "images",
    "inputs",
    "priority",
)
EMBEDDING_TYPES = {
    "float": "float32",
    "int8": "int8",
    "uint8": "uint8",
    "binary": "binary",
    "ubinary": "ubinary",
    "base64": "float32",  # float32 bytes, base64 (Cohere's meaning)
}
TRUNCATE = {"NONE": (False, "right"), "END": (True, "right"), "START": (True, "left")}
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "doc"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
"""Each input_type's prompt names, in the order `prompt_for` tries them against the model's prompts."""
EXAMPLE = '{"model": "minilm", "texts": ["a text"], "input_type": "search_document", "embedding_types": ["float"]}'


class CohereError(UnsupportedError):
    """A body that is not a valid embed request."""


@dataclass(frozen=True, kw_only=True)
class EmbedRequest:
    """A parsed POST /v2/embed: the core's query (its prompt not yet chosen) and how to write the answer."""

    query: EmbedQuery
    input_type: str
    types: tuple[str, ...]
    """The embedding_types asked for, in order: one output each."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CohereError(message)


def _texts(value: Any, max_inputs: int | None) -> list[str]:
    _check(isinstance(value, list) and len(value) > 0, f"texts must be a non-empty list of strings, like {EXAMPLE}")
    message = too_many_inputs(len(value), max_inputs)
    _check(message is None, message or "")
    for i, text in enumerate(value):
        _check(isinstance(text, str), f"texts[{i}] must be a string, not {shorten(text)}")
    return value


def parse_request(body: bytes, *, deadline: float | None = None, max_inputs: int | None = None) -> EmbedRequest:
    """A POST /v2/embed body as the core's query (`max_inputs`: the most texts taken); CohereError says what to
    fix."""
    if max_inputs is not None and (message := too_many_values(body, max_inputs)):
        raise CohereError(message)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise CohereError(f"the body is not valid JSON ({e}): send an object like {EXAMPLE}") from None
    _check(isinstance(data, dict), f"the body must be a JSON object like {EXAMPLE}")
    unknown = next((name for name in data if name not in FIELDS), None)  # the first: a body may hold millions
    _check(unknown is None, f"unknown field {shorten(unknown)}; this endpoint takes {', '.join(FIELDS)}")
    _check(data.get("images") is None and data.get("inputs") is None, "this server embeds texts only: send texts")
    _check(data.get("max_tokens") is None, "max_tokens is not supported: the model's max length applies (truncate)")
    texts = _texts(data.get("texts"), max_inputs)
    model = data.get("model") or ""
    _check(isinstance(model, str), "model must be a string")
    input_type = data.get("input_type") or "search_document"
    _check(
        isinstance(input_type, str) and input_type in INPUT_TYPES,
        f"input_type must be one of {', '.join(INPUT_TYPES)}, not {shorten(input_type)} (this server embeds texts)",
    )
    types = data.get("embedding_types") or ["float"]
    _check(isinstance(types, list), f'embedding_types must be a list, like ["float", "int8"], not {shorten(types)}')
    _check(len(types) <= len(EMBEDDING_TYPES), f"embedding_types lists each type once: {len(types)} is too many")
    for kind in types:
        _check(
            isinstance(kind, str) and kind in EMBEDDING_TYPES,
            f"unknown embedding type {shorten(kind)}; choose from {', '.join(EMBEDDING_TYPES)}",
        )
    dims = data.get("output_dimension")
    _check(dims is None or (isinstance(dims, int) and not isinstance(dims, bool)), "output_dimension must be a number")
    truncate = data.get("truncate") or "END"
    _check(
        isinstance(truncate, str) and truncate in TRUNCATE,
        f"truncate must be NONE, START or END, not {shorten(truncate)}",
    )
    unique = tuple(dict.fromkeys(types))
    cut, direction = TRUNCATE[truncate]
    options = EmbedOptions(
        outputs=tuple(OutputSpec(dims=dims, encoding=EMBEDDING_TYPES[k]) for k in unique),
        truncate=cut,
        truncation_direction=direction,
    )
    query = EmbedQuery(texts=texts, model=model, options=options, deadline=deadline)
    return EmbedRequest(query=query, input_type=input_type, types=unique)


def prompt_for(input_type: str, prompts: Mapping[str, str]) -> str | None:
    """The model's prompt for an input_type: the first of INPUT_TYPES[input_type] it defines; None (no prompt)
    for a model without prompts; CohereError for a model whose prompts fit none (naming them)."""
    if not prompts:
        return None
    for name in INPUT_TYPES[input_type]:
        if name in prompts:
            return name
    tried = ", ".join(INPUT_TYPES[input_type])
    raise CohereError(
        f"input_type {input_type} has no prompt in this model (looked for {tried}; it has {', '.join(sorted(prompts))})"
    )


def with_prompt(request: EmbedRequest, prompts: Mapping[str, str]) -> EmbedQuery:
    """The request's query with the prompt its input_type maps to (none for a model without prompts)."""
    options = replace(request.query.options, prompt_name=prompt_for(request.input_type, prompts))
    return replace(request.query, options=options)


def response_body(request: EmbedRequest, result: EmbedResult) -> bytes:
    """Cohere's `embeddings_by_type` response: each type's vectors, the texts, the tokens billed."""
    embeddings: dict[str, Any] = {}
    for kind, rows in zip(request.types, result.vectors, strict=True):
        if kind == "base64":
            embeddings[kind] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian(rows)]
        else:
            embeddings[kind] = list(rows)  # numpy rows: orjson writes them as numbers
    body = {
        "id": str(uuid.uuid4()),
        "embeddings": embeddings,
        "texts": list(request.query.texts),
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": result.input_tokens}},
        "response_type": "embeddings_by_type",
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_reply(kind: ErrorKind, message: str, param: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for a failure of `kind`, in Cohere's error shape (which names no `param`)."""
    status, headers = status_and_headers(kind)
    return status, headers, orjson.dumps({"id": str(uuid.uuid4()), "message": message})


def error_response(error: BaseException) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an error raised while handling a request."""
    return error_reply(classify(error), public_message(error))
