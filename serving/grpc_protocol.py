"""The gRPC protocol as pure functions: an `EmbedRequest` into the core's `EmbedQuery`, results, model
listings and errors into `mrl.v1` messages and status codes (the one `ErrorKind` -> status table). No server
code here: `grpc_service.py` does the plumbing, as `openai_protocol.py` is to `http_service.py`.
"""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from mrl.proto import embedder_pb2 as pb
from mrl.runtime.encodings import little_endian
from mrl.runtime.errors import InvalidInputError
from mrl.runtime.plan import MAX_OUTPUTS, EmbedOptions, OutputSpec
from mrl.serving.core import EmbedQuery, too_many_inputs
from mrl.serving.errors import ErrorKind, classify, public_message
from mrl.serving.model import EmbedResult, ModelInfo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an error; errors not our own become INTERNAL without details."""
    return STATUS[classify(error)], public_message(error)


def encoding_name(value: int) -> str:
    """The runtime's name of a proto Encoding (ENCODING_INT8 -> "int8"; unset means float32)."""
    if value == pb.ENCODING_UNSPECIFIED:
        return "float32"
    if value not in pb.Encoding.values():
        raise InvalidInputError(f"unknown encoding {value}: use one of {', '.join(pb.Encoding.keys()[1:])}")
    return pb.Encoding.Name(value).removeprefix("ENCODING_").lower()


def encoding_value(name: str) -> int:
    """The proto Encoding of a runtime encoding name ("int8" -> ENCODING_INT8)."""
    return pb.Encoding.Value(f"ENCODING_{name.upper()}")


DIRECTIONS = {
    pb.TRUNCATION_DIRECTION_UNSPECIFIED: "right",
    pb.TRUNCATION_DIRECTION_RIGHT: "right",
    pb.TRUNCATION_DIRECTION_LEFT: "left",
}


def output_spec(message: pb.EmbedRequest | pb.OutputSpec) -> OutputSpec:
    """The output a request (its `dimensions` and `encoding`) or one of its `outputs` asks for."""
    dims = message.dimensions if message.HasField("dimensions") else None
    return OutputSpec(dims=dims, encoding=encoding_name(message.encoding))


def to_query(
    request: pb.EmbedRequest, deadline: float | None, *, truncate_default: bool = False, max_inputs: int | None = None
) -> EmbedQuery:
    """The core's view of an EmbedRequest (unset optional fields: the model's defaults; `truncate_default`: the
    server's, which `truncate: true` cannot be told apart from, since a proto3 bool has no presence; more than
    `max_inputs` texts are refused)."""
    # Counted before any is read: 16 MiB holds 8 million empty outputs or inputs, and reading each into Python
    # took the door's event loop 16 s.
    if len(request.outputs) > MAX_OUTPUTS:
        raise InvalidInputError(f"ask for 1 to {MAX_OUTPUTS} outputs, not {len(request.outputs)}", "outputs")
    if message := too_many_inputs(len(request.inputs), max_inputs):
        raise InvalidInputError(message, "inputs")
    if request.outputs and (request.HasField("dimensions") or request.encoding != pb.ENCODING_UNSPECIFIED):
        raise InvalidInputError(
            "set either outputs or dimensions/encoding, not both: with outputs, give each output its own", "outputs"
        )
    if request.truncation_direction not in DIRECTIONS:
        raise InvalidInputError(
            f"unknown truncation_direction {request.truncation_direction}: use TRUNCATION_DIRECTION_RIGHT or "
            "TRUNCATION_DIRECTION_LEFT",
            "truncation_direction",
        )
    options = EmbedOptions(
        outputs=tuple(map(output_spec, request.outputs)) or (output_spec(request),),
        layers=request.layers if request.HasField("layers") else None,
        prompt_name=request.prompt_name if request.HasField("prompt_name") else None,
        truncate=request.truncate or truncate_default,
        truncation_direction=DIRECTIONS[request.truncation_direction],
    )
    # Copied out once: each read of a protobuf string field decodes it anew (milliseconds for a MiB).
    return EmbedQuery(texts=list(request.inputs), model=request.model, options=options, deadline=deadline)


def to_embeddings(vectors: np.ndarray, encoding: str) -> list[pb.Embedding]:
    """One Embedding per row: float32 in `values`, every other encoding as its little-endian bytes in `data`."""
    if encoding == "float32":
        return [pb.Embedding(values=row) for row in vectors.tolist()]
    return [pb.Embedding(data=row.tobytes()) for row in little_endian(vectors)]


def to_response(
    result: EmbedResult, model: str, request_id: str, total_seconds: float, *, several: bool = False
) -> pb.EmbedResponse:
    """An EmbedResponse holding the embeddings in input order: in `outputs` when the request asked for `several`
    (EmbedRequest.outputs), else in `embeddings` with their `dimensions` and `encoding`."""
    plan = result.plan
    response = pb.EmbedResponse(
        model=model,
        layers=plan.layers or 0,
        usage=pb.Usage(input_tokens=result.input_tokens),
        timing=pb.Timing(
            queue_ms=result.queue_seconds * 1000,
            inference_ms=result.inference_seconds * 1000,
            total_ms=total_seconds * 1000,
        ),
        request_id=request_id,
    )
    if several:
        response.outputs.extend(
            pb.Output(dimensions=o.dims, encoding=encoding_value(o.encoding), embeddings=to_embeddings(v, o.encoding))
            for o, v in zip(plan.outputs, result.vectors, strict=True)
        )
    else:
        (output,), (vectors,) = plan.outputs, result.vectors
        response.embeddings.extend(to_embeddings(vectors, output.encoding))
        response.dimensions, response.encoding = output.dims, encoding_value(output.encoding)
    return response


def error_response(code: grpc.StatusCode, message: str, request_id: str = "") -> pb.EmbedResponse:
    """A failed request's answer inside EmbedStream (unary calls use the call's status instead)."""
    return pb.EmbedResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=message))


def model_info(info: ModelInfo) -> pb.ModelInfo:
    """What GetModel and ListModels say about a served model (0 and "" stand for "not recorded")."""
    return pb.ModelInfo(
        name=info.name,
        full_dimensions=info.full_dims,
        profiles=[
            pb.Profile(name=p.name, dimensions=p.dims, precision=p.precision, layers=p.layers or 0)
            for p in info.profiles
        ],
        trained_dimensions=list(info.trained_dims),
        max_input_tokens=info.max_input_tokens,
        prompts=info.prompts,
        default_prompt=info.default_prompt or "",
        default_dimensions=info.default_dims,
        precision=info.precision,
        ready=info.ready,
        encodings=[encoding_value(e) for e in info.encodings],
        layers=list(info.layers),
        default_layers=info.default_layers or 0,
        total_layers=info.total_layers or 0,
        trained_layers=list(info.trained_layers),
    )
