"""Python clients of `mrl-serve`, sync and asyncio, returning numpy arrays. Errors surface as grpc.RpcError."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType

import grpc
import numpy as np

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime.encodings import ENCODINGS, dtype_of

__all__ = ["AsyncEmbedClient", "EmbedClient", "build_request", "to_array"]

_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def build_request(
    texts: Sequence[str],
    *,
    dims: int | None = None,
    layers: int | None = None,
    model: str | None = None,
    prompt_name: str | None = None,
    truncate: bool = False,
    request_id: str = "",
    encoding: str = "float32",
) -> pb.EmbedRequest:
    """An EmbedRequest for `texts` (unset options take the server's defaults); `encoding` as in ENCODINGS."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not one string: wrap it in a list")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    request = pb.EmbedRequest(
        model=model or "",
        inputs=list(texts),
        truncate=truncate,
        encoding=pb.Encoding.Value(f"ENCODING_{encoding.upper()}"),
        request_id=request_id,
    )
    for name, value in (("dims", dims), ("layers", layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be a whole number of at least 0 (the server refuses 0), not {value!r}")
    if dims is not None:
        request.dimensions = int(dims)
    if layers is not None:
        request.layers = int(layers)
    if prompt_name is not None:
        request.prompt_name = prompt_name
    return request


def to_array(response: pb.EmbedResponse) -> np.ndarray:
    """The response's embeddings as numpy: float32 `[n, dims]`, or the encoding's dtype (binary: ceil(dims / 8))."""
    if response.encoding in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_FLOAT32):
        out = np.empty((len(response.embeddings), response.dimensions), dtype=np.float32)
        for row, embedding in zip(out, response.embeddings, strict=True):
            row[:] = embedding.values
        return out
    dtype = dtype_of(pb.Encoding.Name(response.encoding).removeprefix("ENCODING_").lower()).newbyteorder("<")
    data = b"".join(e.data for e in response.embeddings)
    return np.frombuffer(data, dtype=dtype).reshape(len(response.embeddings), -1).astype(dtype.newbyteorder("="))


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else (("authorization", f"Bearer {token}"),)


def _credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    return None if root_certificates is None else grpc.ssl_channel_credentials(root_certificates=root_certificates)


class EmbedClient:
    """A blocking client: `EmbedClient("localhost:50051").embed(["a text"], dims=256)`."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        credentials = _credentials(root_certificates)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = _metadata(token)
        self._timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def embed_response(
        self,
        texts: Sequence[str],
        *,
        dims: int | None = None,
        layers: int | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = False,
        timeout: float | None = None,
        encoding: str = "float32",
    ) -> pb.EmbedResponse:
        """The raw EmbedResponse for `texts` (usage, timing, dims and layers used)."""
        request = build_request(
            texts, dims=dims, layers=layers, model=model, prompt_name=prompt_name, truncate=truncate, encoding=encoding
        )
        return self._stub.Embed(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def embed(
        self,
        texts: Sequence[str],
        *,
        dims: int | None = None,
        layers: int | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = False,
        timeout: float | None = None,
        encoding: str = "float32",
    ) -> np.ndarray:
        """Embed `texts`: `[len(texts), dims]` unit-norm rows in input order, float32 unless `encoding` says;
        `layers` runs a profile that keeps only that many encoder layers (None: the model's default depth)."""
        return to_array(
            self.embed_response(
                texts,
                dims=dims,
                layers=layers,
                model=model,
                prompt_name=prompt_name,
                truncate=truncate,
                timeout=timeout,
                encoding=encoding,
            )
        )

    def embed_stream(
        self, requests: Iterable[pb.EmbedRequest], *, timeout: float | None = None
    ) -> Iterator[pb.EmbedResponse]:
        """Send requests over one EmbedStream; responses come in request order (failures carry `error`)."""
        return self._stub.EmbedStream(iter(requests), timeout=self._deadline(timeout), metadata=self._metadata)

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model the server serves."""
        reply = self._stub.ListModels(pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        return list(reply.models)

    def get_model(self, name: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One model by name (empty: the only one)."""
        request = pb.GetModelRequest(name=name)
        return self._stub.GetModel(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEmbedClient:
    """An asyncio client: `await AsyncEmbedClient("localhost:50051").embed(["a text"])`."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        credentials = _credentials(root_certificates)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = _metadata(token)
        self._timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def embed_response(
        self,
        texts: Sequence[str],
        *,
        dims: int | None = None,
        layers: int | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = False,
        timeout: float | None = None,
        encoding: str = "float32",
    ) -> pb.EmbedResponse:
        """The raw EmbedResponse for `texts` (usage, timing, dims and layers used)."""
        request = build_request(
            texts, dims=dims, layers=layers, model=model, prompt_name=prompt_name, truncate=truncate, encoding=encoding
        )
        return await self._stub.Embed(request, timeout=self._deadline(timeout), metadata=self._metadata)

    async def embed(
        self,
        texts: Sequence[str],
        *,
        dims: int | None = None,
        layers: int | None = None,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = False,
        timeout: float | None = None,
        encoding: str = "float32",
    ) -> np.ndarray:
        """Embed `texts`: `[len(texts), dims]` unit-norm rows in input order, float32 unless `encoding` says;
        `layers` runs a profile that keeps only that many encoder layers (None: the model's default depth)."""
        response = await self.embed_response(
            texts,
            dims=dims,
            layers=layers,
            model=model,
            prompt_name=prompt_name,
            truncate=truncate,
            timeout=timeout,
            encoding=encoding,
        )
        return to_array(response)

    async def embed_stream(
        self, requests: AsyncIterable[pb.EmbedRequest] | Iterable[pb.EmbedRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Send requests over one EmbedStream; yields responses in request order (failures carry `error`)."""
        call = self._stub.EmbedStream(requests, timeout=self._deadline(timeout), metadata=self._metadata)
        async for response in call:
            yield response

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model the server serves."""
        reply = await self._stub.ListModels(
            pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return list(reply.models)

    async def get_model(self, name: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One model by name (empty: the only one)."""
        request = pb.GetModelRequest(name=name)
        return await self._stub.GetModel(request, timeout=self._deadline(timeout), metadata=self._metadata)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
