"""The `mrl.v1.Embedder` gRPC service: turns requests into ServedModel calls and errors into status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping

import grpc

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime.errors import InvalidInputError, NotFoundError
from mrl.serving.config import ServerConfig
from mrl.serving.errors import UnsupportedError, status_for
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import EmbedResult, ServedModel

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
_SUPPORTED_ENCODINGS = (pb.ENCODING_UNSPECIFIED, pb.ENCODING_FLOAT32)
_UNKNOWN_MODEL = "(unknown)"  # metrics label for names we do not serve: callers must not grow label sets


def model_info(model: ServedModel) -> pb.ModelInfo:
    """What GetModel and ListModels say about a served model."""
    embedder, manifest = model.embedder, model.embedder.manifest
    return pb.ModelInfo(
        name=model.name,
        full_dimensions=manifest.full_dims,
        profiles=[pb.Profile(name=p.name, dimensions=p.dims, precision=p.precision) for p in embedder.profiles],
        trained_dimensions=list(manifest.trained_dims or ()),
        max_input_tokens=embedder.tokenizer.max_length,
        prompts=dict(manifest.prompts),
        default_prompt=manifest.default_prompt or "",
        default_dimensions=embedder.default_dims,
        precision=embedder.precision,
        ready=model.ready,
    )


def check_encoding(value: int) -> None:
    """Refuse encodings this server does not write, saying which one to use."""
    if value in _SUPPORTED_ENCODINGS:
        return
    if value in pb.Encoding.values():
        raise UnsupportedError(f"encoding {pb.Encoding.Name(value)} is not supported yet: use ENCODING_FLOAT32")
    raise InvalidInputError(f"unknown encoding {value}: use ENCODING_FLOAT32 ({pb.ENCODING_FLOAT32})")


def to_response(result: EmbedResult, model: str, request_id: str, total_seconds: float) -> pb.EmbedResponse:
    """An EmbedResponse holding float32 embeddings in input order."""
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=row) for row in result.vectors.tolist()],
        model=model,
        dimensions=result.dims,
        encoding=pb.ENCODING_FLOAT32,
        usage=pb.Usage(input_tokens=result.input_tokens),
        timing=pb.Timing(
            queue_ms=result.queue_seconds * 1000,
            inference_ms=result.inference_seconds * 1000,
            total_ms=total_seconds * 1000,
        ),
        request_id=request_id,
    )


class EmbedderService(pb_grpc.EmbedderServicer):
    """Handles Embed, EmbedStream, ListModels and GetModel over a fixed set of served models."""

    def __init__(self, models: Mapping[str, ServedModel], config: ServerConfig, metrics: ServerMetrics) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self._models = dict(models)
        self._config = config
        self._metrics = metrics

    def resolve(self, name: str) -> ServedModel:
        """The model called `name`; an empty name means the only one, when one is served."""
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise InvalidInputError(f"this server serves several models ({', '.join(self._models)}): set model")
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"no model named {name!r}; this server serves: {', '.join(self._models)}")
        return model

    async def _embed(self, request: pb.EmbedRequest, model: ServedModel, deadline: float | None) -> pb.EmbedResponse:
        start = time.perf_counter()
        check_encoding(request.encoding)
        limit = self._config.max_inputs_per_request
        if len(request.inputs) > limit:
            raise InvalidInputError(
                f"{len(request.inputs)} inputs in one request; this server takes at most {limit}: split the request"
            )
        result = await model.embed(
            request.inputs,
            dims=request.dimensions if request.HasField("dimensions") else None,
            prompt=request.prompt_name if request.HasField("prompt_name") else None,
            truncate=request.truncate,
            deadline=deadline,
        )
        return to_response(result, model.name, request.request_id, time.perf_counter() - start)

    async def _handle(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, method: str
    ) -> tuple[pb.EmbedResponse | None, grpc.StatusCode, str]:
        """Run one request; returns the response, or None with the status code and message to send."""
        start = time.perf_counter()
        label = _UNKNOWN_MODEL
        code, message, response = grpc.StatusCode.OK, "", None
        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        try:
            model = self.resolve(request.model)
            label = model.name
            self._metrics.in_flight.labels(label).inc()
            try:
                response = await self._embed(request, model, deadline)
            finally:
                self._metrics.in_flight.labels(label).dec()
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller goes away or its deadline passes.
            expired = deadline is not None and asyncio.get_running_loop().time() >= deadline
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s on model %s failed", method, label)
        finally:
            self._metrics.requests.labels(label, method, code.name).inc()
            if code == grpc.StatusCode.OK:
                self._metrics.latency.labels(label).observe(time.perf_counter() - start)
        return response, code, message

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Embed a list of texts."""
        response, code, message = await self._handle(request, context, "Embed")
        if response is None:
            await context.abort(code, message)
        return response

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Embed each streamed request as it arrives (several at once), answering in request order."""
        window = asyncio.Semaphore(self._config.stream_window)
        pending: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()

        async def one(request: pb.EmbedRequest) -> pb.EmbedResponse:
            response, code, message = await self._handle(request, context, "EmbedStream")
            if response is not None:
                return response
            return pb.EmbedResponse(request_id=request.request_id, error=pb.Error(code=code.value[0], message=message))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    # Unread requests stay in gRPC's flow control: a fast sender cannot queue without bound.
                    await window.acquire()
                    await pending.put(asyncio.ensure_future(one(request)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                response = await task
                window.release()
                yield response
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every served model."""
        return pb.ListModelsResponse(models=[model_info(m) for m in self._models.values()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """One served model by name."""
        try:
            model = self.resolve(request.name)
        except Exception as e:
            code, message = status_for(e)
            await context.abort(code, message)
        return model_info(model)
