"""Python clients of `mrl-serve`, sync and asyncio, returning numpy arrays. Errors surface as grpc.RpcError."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

import grpc
import numpy as np

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime.encodings import ENCODINGS, from_little_endian
from mrl.runtime.tokenize import DIRECTIONS
from mrl.serving.grpc_protocol import encoding_name, encoding_value

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncEmbedClient", "EmbedClient", "RequestOptions", "build_request", "to_array", "to_arrays"]

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
    outputs: Sequence[tuple[int | None, str]] = (),
    truncation_direction: str = "right",
) -> pb.EmbedRequest:
    """An EmbedRequest for `texts` (unset options take the server's defaults); `encoding` as in ENCODINGS.

    `outputs`, (dims, encoding) pairs such as `[(64, "ubinary"), (384, "int8")]`, asks for several outputs of
    every text from one forward pass, instead of `dims` and `encoding` (`to_arrays` reads them back).
    `truncation_direction` "left" makes `truncate` cut a long text's start instead of its end.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not one string: wrap it in a list")
    if outputs and (dims is not None or encoding != "float32"):
        raise ValueError("give either outputs or dims/encoding, not both")
    if truncation_direction not in DIRECTIONS:
        raise ValueError(f"truncation_direction must be one of {', '.join(DIRECTIONS)}, not {truncation_direction!r}")
    request = pb.EmbedRequest(
        model=model or "",
        inputs=list(texts),
        truncate=truncate,
        request_id=request_id,
        truncation_direction=pb.TruncationDirection.Value(f"TRUNCATION_DIRECTION_{truncation_direction.upper()}"),
    )
    for want, kind in outputs or ():
        request.outputs.append(_output_spec(want, kind))
    if not outputs:
        spec = _output_spec(dims, encoding)
        request.encoding = spec.encoding
        if spec.HasField("dimensions"):
            request.dimensions = spec.dimensions
    if layers is not None:
        request.layers = _count("layers", layers)
    if prompt_name is not None:
        request.prompt_name = prompt_name
    return request


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a whole number of at least 0 (the server refuses 0), not {value!r}")
    return int(value)


def _output_spec(dims: int | None, encoding: str) -> pb.OutputSpec:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    spec = pb.OutputSpec(encoding=encoding_value(encoding))
    if dims is not None:
        spec.dimensions = _count("dims", dims)
    return spec


def _array(embeddings: Sequence[pb.Embedding], encoding: int, dims: int) -> np.ndarray:
    if encoding in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_FLOAT32):
        out = np.empty((len(embeddings), dims), dtype=np.float32)
        for row, embedding in zip(out, embeddings, strict=True):
            row[:] = embedding.values
        return out
    return from_little_endian(b"".join(e.data for e in embeddings), encoding_name(encoding), len(embeddings))


def to_array(response: pb.EmbedResponse) -> np.ndarray:
    """The response's embeddings as numpy: float32 `[n, dims]`, or the encoding's dtype (binary: ceil(dims / 8))."""
    if response.outputs:
        raise ValueError("the response holds several outputs: read them with to_arrays")
    return _array(response.embeddings, response.encoding, response.dimensions)


def to_arrays(response: pb.EmbedResponse) -> list[np.ndarray]:
    """Each output's embeddings as numpy, in the order the request's `outputs` asked for them."""
    if not response.outputs:
        return [to_array(response)]
    return [_array(o.embeddings, o.encoding, o.dimensions) for o in response.outputs]


class RequestOptions(TypedDict, total=False):
    """What an embed call may set besides its texts: `build_request`'s keyword arguments."""

    dims: int | None
    layers: int | None
    model: str | None
    prompt_name: str | None
    truncate: bool
    request_id: str
    encoding: str
    outputs: Sequence[tuple[int | None, str]]
    truncation_direction: str


class _Client:
    """What the blocking and the asyncio client share: the channel, the stub, the call options."""

    def __init__(
        self,
        target: str,
        channels: ModuleType,
        *,
        token: str | None,
        root_certificates: bytes | None,
        timeout: float | None,
        load_balancing: str | None,
    ) -> None:
        # round_robin spreads calls over every address the target resolves to (a headless Service's pods).
        options = _CHANNEL_OPTIONS + ([("grpc.lb_policy_name", load_balancing)] if load_balancing else [])
        if root_certificates is None:
            self._channel = channels.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = channels.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = None if token is None else (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def _options(self, timeout: float | None) -> dict[str, Any]:
        """The keyword arguments of every call: its deadline (this call's, else the client's) and the token."""
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}


class EmbedClient(_Client):
    """A blocking client: `EmbedClient("localhost:50051").embed(["a text"], dims=256)`; in Kubernetes,
    `EmbedClient("dns:///mrl-embed-grpc.NS.svc.cluster.local:50051", load_balancing="round_robin")` spreads
    calls over every pod of the headless Service."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        load_balancing: str | None = None,
    ) -> None:
        super().__init__(
            target,
            grpc,
            token=token,
            root_certificates=root_certificates,
            timeout=timeout,
            load_balancing=load_balancing,
        )

    def embed_response(
        self, texts: Sequence[str], *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> pb.EmbedResponse:
        """The raw EmbedResponse for `texts` (usage, timing, dims and layers used); options as `build_request`."""
        return self._stub.Embed(build_request(texts, **options), **self._options(timeout))

    def embed(
        self, texts: Sequence[str], *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> np.ndarray:
        """Embed `texts`: `[len(texts), dims]` unit-norm rows in input order, float32 unless `encoding` says;
        options as `build_request` (`dims`, `layers`, `model`, `prompt_name`, `truncate`, `encoding`)."""
        return to_array(self.embed_response(texts, timeout=timeout, **options))

    def embed_outputs(
        self,
        texts: Sequence[str],
        outputs: Sequence[tuple[int | None, str]],
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[np.ndarray]:
        """Several outputs of `texts` from one forward pass, one array each: `outputs` as (dims, encoding) pairs,
        e.g. `[(64, "ubinary"), (None, "int8")]` (None: the widest)."""
        return to_arrays(self.embed_response(texts, timeout=timeout, outputs=outputs, **options))

    def embed_stream(
        self, requests: Iterable[pb.EmbedRequest], *, timeout: float | None = None
    ) -> Iterator[pb.EmbedResponse]:
        """Send requests over one EmbedStream; responses come in request order (failures carry `error`)."""
        return self._stub.EmbedStream(iter(requests), **self._options(timeout))

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model the server serves."""
        return list(self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout)).models)

    def get_model(self, name: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One model by name (empty: the only one)."""
        return self._stub.GetModel(pb.GetModelRequest(name=name), **self._options(timeout))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncEmbedClient(_Client):
    """An asyncio client: `await AsyncEmbedClient("localhost:50051").embed(["a text"])`."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        load_balancing: str | None = None,
    ) -> None:
        super().__init__(
            target,
            grpc.aio,
            token=token,
            root_certificates=root_certificates,
            timeout=timeout,
            load_balancing=load_balancing,
        )

    async def embed_response(
        self, texts: Sequence[str], *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> pb.EmbedResponse:
        """The raw EmbedResponse for `texts` (usage, timing, dims and layers used); options as `build_request`."""
        return await self._stub.Embed(build_request(texts, **options), **self._options(timeout))

    async def embed(
        self, texts: Sequence[str], *, timeout: float | None = None, **options: Unpack[RequestOptions]
    ) -> np.ndarray:
        """Embed `texts`: `[len(texts), dims]` unit-norm rows in input order, float32 unless `encoding` says;
        options as `build_request` (`dims`, `layers`, `model`, `prompt_name`, `truncate`, `encoding`)."""
        return to_array(await self.embed_response(texts, timeout=timeout, **options))

    async def embed_outputs(
        self,
        texts: Sequence[str],
        outputs: Sequence[tuple[int | None, str]],
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> list[np.ndarray]:
        """Several outputs of `texts` from one forward pass, one array each: `outputs` as (dims, encoding) pairs,
        e.g. `[(64, "ubinary"), (None, "int8")]` (None: the widest)."""
        return to_arrays(await self.embed_response(texts, timeout=timeout, outputs=outputs, **options))

    async def embed_stream(
        self, requests: AsyncIterable[pb.EmbedRequest] | Iterable[pb.EmbedRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.EmbedResponse]:
        """Send requests over one EmbedStream; yields responses in request order (failures carry `error`)."""
        async for response in self._stub.EmbedStream(requests, **self._options(timeout)):
            yield response

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Every model the server serves."""
        return list((await self._stub.ListModels(pb.ListModelsRequest(), **self._options(timeout))).models)

    async def get_model(self, name: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        """One model by name (empty: the only one)."""
        return await self._stub.GetModel(pb.GetModelRequest(name=name), **self._options(timeout))

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
