"""What `mrl-bench serve` sends requests to: a `Target` per kind of server, chosen by `KIND=ADDRESS`.

A target connects once, embeds one request at a time (many in flight on one event loop), and
closes. Adding a kind is one class with those three methods and one line in `TARGET_KINDS`; the
load generator, statistics and reports stay as they are.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mrl.runtime.encodings import ENCODINGS
from mrl.runtime.errors import InvalidInputError

if TYPE_CHECKING:
    import numpy as np

HTTP_ENCODING_FORMATS = ("base64", "float")
"""What an http target asks the embeddings for: base64 (the openai SDK's default) or JSON floats."""


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What one answered request reports: texts embedded, dims, and the server's own accounting where it gives any."""

    texts: int
    dims: int
    layers: int | None = None  # the depth that ran, where the server says
    tokens: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None


class TargetError(Exception):
    """A request the server refused or could not answer; `code` is the protocol's status name."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Target(Protocol):
    """One server under load."""

    label: str

    async def connect(self) -> None:
        """Open the channel and learn what the server serves."""
        ...

    async def embed(self, texts: list[str], dims: int | None, timeout: float, *, layers: int | None = None) -> Reply:
        """Embed one request's texts (dims, layers None: the server's default); raise TargetError on failure."""
        ...

    async def close(self) -> None:
        """Release the channel."""
        ...


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """Which server to load and how to reach it; plain data, so a worker process can rebuild the target."""

    kind: str = "mrl"
    address: str
    model: str | None = None  # triton: the repository's model name prefix (NAME in NAME_dDIMS)
    token: str | None = None  # mrl, http: bearer token
    root_certificates: bytes | None = None  # mrl, http: TLS roots (PEM); http then speaks https
    encoding_format: str = "base64"  # http: how the server writes the embeddings (HTTP_ENCODING_FORMATS)
    outputs: tuple[tuple[int | None, str], ...] = ()
    """mrl, http: every request asks for these (dims, encoding) outputs of one forward pass instead of one
    vector (`KIND=ADDRESS;outputs=64:ubinary,384:int8`); empty: one vector, of the dims mix's dims."""

    def __post_init__(self) -> None:
        if self.outputs and self.kind not in ("mrl", "http"):
            raise InvalidInputError(f"outputs are for mrl and http targets, not {self.kind}")
        for dims, encoding in self.outputs:
            if encoding not in ENCODINGS or (dims is not None and dims < 1):
                raise InvalidInputError(f"output {dims}:{encoding}: use DIMS:ENCODING, encoding one of {ENCODINGS}")
        if self.kind not in TARGET_KINDS:
            raise InvalidInputError(f"unknown target kind {self.kind!r}; choose from {', '.join(TARGET_KINDS)}")
        check_target(self.address)
        if self.kind == "triton" and not self.model:
            raise InvalidInputError("a triton target needs the model name prefix: --triton-model NAME (NAME_dDIMS)")
        if self.encoding_format not in HTTP_ENCODING_FORMATS:
            raise InvalidInputError(
                f"unknown http encoding format {self.encoding_format!r}; choose from {', '.join(HTTP_ENCODING_FORMATS)}"
            )

    @property
    def label(self) -> str:
        """How the target is named in tables and JSON (the same server asked for outputs is another target)."""
        outputs = ",".join(f"{'' if d is None else d}:{e}" for d, e in self.outputs)
        return f"{self.kind}={self.address}" + (f";outputs={outputs}" if outputs else "")


def check_target(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets), refusing anything else: schemes, paths, lists, bad ports."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in address or "," in address or " " in address:
        raise InvalidInputError(f"target must be HOST:PORT, such as 127.0.0.1:50051, not {address!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidInputError(f"an IPv6 target needs brackets: [::1]:50051, not {address!r}")
    elif ":" in host:
        raise InvalidInputError(f"an IPv6 target needs brackets: [::1]:50051, not {address!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"target port must be within 1..65535, not {port!r}")
    return host, int(port)


def split_target(text: str) -> tuple[str, str]:
    """`KIND=ADDRESS` (or a bare ADDRESS, which is an mrl-serve target) as (kind, address); a `;outputs=...`
    suffix stays on the address (`target_outputs` reads it)."""
    kind, sep, address = text.partition("=")
    return (kind, address) if sep else ("mrl", text)


def target_outputs(address: str) -> tuple[str, tuple[tuple[int | None, str], ...]]:
    """`ADDRESS;outputs=64:ubinary,:int8` as (ADDRESS, ((64, "ubinary"), (None, "int8"))); no suffix: no outputs."""
    address, sep, option = address.partition(";")
    if not sep:
        return address, ()
    name, _, value = option.partition("=")
    if name != "outputs" or not value:
        raise InvalidInputError(f"after ';' a target takes outputs=DIMS:ENCODING,..., not {option!r}")
    outputs = []
    for item in value.split(","):
        dims, colon, encoding = item.partition(":")
        if not colon or (dims and not dims.isdigit()):
            raise InvalidInputError(f"output {item!r}: use DIMS:ENCODING such as 64:ubinary (no DIMS: the widest)")
        outputs.append((int(dims) if dims else None, encoding))
    return address, tuple(outputs)


def target_specs(
    texts: Sequence[str],
    *,
    triton_model: str | None,
    token: str | None,
    root_certificates: bytes | None,
    http_encoding_format: str = "base64",
) -> tuple[TargetSpec, ...]:
    """Specs from `--target [KIND=]ADDRESS` values; the token and TLS roots go to mrl and http targets, the model
    to triton's, the encoding format to http's."""
    specs = []
    for text in texts:
        kind, address = split_target(text)
        address, outputs = target_outputs(address)
        if kind == "mrl":
            specs.append(
                TargetSpec(
                    kind=kind, address=address, token=token, root_certificates=root_certificates, outputs=outputs
                )
            )
        elif kind == "http":
            specs.append(
                TargetSpec(
                    kind=kind,
                    address=address,
                    token=token,
                    root_certificates=root_certificates,
                    encoding_format=http_encoding_format,
                    outputs=outputs,
                )
            )
        else:
            specs.append(TargetSpec(kind=kind, address=address, model=triton_model))
    return tuple(specs)


def client_pythons(texts: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`--client-python [KIND=]PYTHON` values as (kind, python) pairs; a bare PYTHON is for triton targets."""
    pairs = []
    for text in texts:
        kind, sep, python = text.partition("=")
        pairs.append((kind, python) if sep else ("triton", text))
    return tuple(pairs)


class MrlTarget:
    """`mrl-serve` over gRPC (`mrl.v1.Embedder/Embed`), through the project's async client."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.label = spec.label
        self._client = None

    async def connect(self) -> None:
        """Open the channel (it connects on the first call)."""
        from mrl.serving.client import AsyncEmbedClient

        self._client = AsyncEmbedClient(
            self.spec.address, token=self.spec.token, root_certificates=self.spec.root_certificates
        )

    async def embed(self, texts: list[str], dims: int | None, timeout: float, *, layers: int | None = None) -> Reply:
        """One Embed call."""
        import grpc

        shape = {"outputs": self.spec.outputs} if self.spec.outputs else {"dims": dims}
        try:
            response = await self._client.embed_response(texts, layers=layers, timeout=timeout, **shape)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            code = e.code().name if callable(getattr(e, "code", None)) else "UNKNOWN"
            raise TargetError(code) from None
        rows = {len(o.embeddings) for o in response.outputs} or {len(response.embeddings)}
        if len(rows) != 1:
            raise TargetError("BAD_RESPONSE", f"outputs of different lengths {sorted(rows)}")
        return Reply(
            texts=rows.pop(),
            dims=response.outputs[-1].dimensions if response.outputs else response.dimensions,
            layers=response.layers or None,
            tokens=response.usage.input_tokens,
            queue_ms=response.timing.queue_ms,
            inference_ms=response.timing.inference_ms,
        )

    async def close(self) -> None:
        """Close the channel."""
        if self._client is not None:
            await self._client.close()


def default_triton_dims(model_names: Sequence[str], prefix: str) -> list[int]:
    """The dims a repository written by `mrl-export triton` serves, from its model names (PREFIX_dDIMS)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_d(\d+)$")
    return sorted(int(m.group(1)) for name in model_names if (m := pattern.match(name)))


class TritonTarget:
    """Triton Inference Server over KServe v2 gRPC (`ModelInfer` on the ensemble PREFIX_dDIMS), through tritonclient."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.label = spec.label
        self._client = None
        self._default_dims = 0

    async def connect(self) -> None:
        """Open the channel and find the ensembles; requests without dims go to the largest, as in mrl-serve."""
        try:
            import tritonclient.grpc.aio as triton
        except ImportError as e:
            raise InvalidInputError(
                f"the triton target needs tritonclient[grpc] ({e}): pass --client-python with the Python of an "
                "environment that has it (scripts/setup_triton.sh makes .venv-triton)"
            ) from None
        self._client = triton.InferenceServerClient(self.spec.address)
        index = await self._client.get_model_repository_index(as_json=True)
        names = [m["name"] for m in index.get("models", []) if m.get("state", "READY") == "READY"]
        dims = default_triton_dims(names, self.spec.model)
        if not dims:
            raise InvalidInputError(f"{self.spec.address} serves no ready {self.spec.model}_dDIMS model: {names}")
        self._default_dims = dims[-1]

    async def embed(self, texts: list[str], dims: int | None, timeout: float, *, layers: int | None = None) -> Reply:
        """One ModelInfer call: TEXT (BYTES [n, 1]) in, EMBEDDING (FP32 [n, dims]) out (full depth only)."""
        if layers is not None:
            raise TargetError("INVALID_ARGUMENT", "Triton serves each depth as models of its own (NAME_lLAYERS_dDIMS)")
        import numpy as np
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        want = dims or self._default_dims
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        text = triton.InferInput("TEXT", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        try:
            result = await self._client.infer(f"{self.spec.model}_d{want}", [text], client_timeout=timeout)
        except InferenceServerException as e:
            status = str(e.status() or "UNKNOWN")
            raise TargetError(status.removeprefix("StatusCode."), e.message() or "") from None
        rows = result.as_numpy("EMBEDDING")
        return Reply(texts=int(rows.shape[0]), dims=int(rows.shape[1]))

    async def close(self) -> None:
        """Close the channel."""
        if self._client is not None:
            await self._client.close()


def openai_vectors(payload: bytes, encoding_format: str) -> tuple[np.ndarray, int | None, int | None]:
    """An OpenAI embeddings response body as (float32 [n, dims] in index order, prompt tokens, layers run).

    Tokens and layers (mrl-serve's extra field) are None where the body has none. TargetError BAD_RESPONSE
    when it is not such a body (not JSON, indices out of order, rows of different lengths).
    """
    import numpy as np
    import orjson

    try:
        reply = orjson.loads(payload)
        data = reply["data"]
        if [d["index"] for d in data] != list(range(len(data))):
            raise ValueError("data[].index is not 0, 1, 2, ...")
        if encoding_format == "base64":
            raw = [base64.b64decode(d["embedding"], validate=True) for d in data]
            if len({len(r) for r in raw}) > 1 or any(len(r) % 4 for r in raw):
                raise ValueError("base64 rows of different lengths, or not float32")
            rows = np.frombuffer(b"".join(raw), dtype="<f4").reshape(len(raw), -1)
        else:
            rows = np.array([d["embedding"] for d in data], dtype=np.float32)  # ragged rows raise
        if rows.ndim != 2:
            raise ValueError(f"embeddings of shape {rows.shape}")
        tokens = (reply.get("usage") or {}).get("prompt_tokens")
        layers = reply.get("layers")
    except (ValueError, KeyError, TypeError) as e:  # orjson.JSONDecodeError and binascii.Error are ValueErrors
        raise TargetError("BAD_RESPONSE", str(e)[:200]) from None
    return rows, tokens if isinstance(tokens, int) else None, layers if isinstance(layers, int) and layers else None


def several_outputs(payload: bytes) -> Reply:
    """What an embeddings response with several outputs (mrl-serve's `outputs`) reports; TargetError
    BAD_RESPONSE when items lack an output or outputs are missing."""
    import orjson

    try:
        reply = orjson.loads(payload)
        described, data = reply["outputs"], reply["data"]
        if any(len(item["embeddings"]) != len(described) for item in data):
            raise ValueError("an item without one embedding per output")
        tokens, layers = (reply.get("usage") or {}).get("prompt_tokens"), reply.get("layers")
        dims = int(described[-1]["dimensions"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise TargetError("BAD_RESPONSE", str(e)[:200]) from None
    return Reply(
        texts=len(data),
        dims=dims,
        tokens=tokens if isinstance(tokens, int) else None,
        layers=layers if isinstance(layers, int) and layers else None,
    )


def error_message(payload: bytes) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}}), or the body's start."""
    import orjson

    try:
        return str(orjson.loads(payload)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return payload[:200].decode(errors="replace")


class HttpTarget:
    """An OpenAI-compatible embeddings API (`POST /v1/embeddings`, as `mrl-serve --http-port` serves it), through
    aiohttp: one pool of keep-alive connections, the body the openai SDK sends, each response decoded."""

    def __init__(self, spec: TargetSpec) -> None:
        from mrl.serving.http_service import TIMEOUT_HEADER

        self.spec = spec
        self.label = spec.label
        self._session = None
        self._url = f"{'http' if spec.root_certificates is None else 'https'}://{spec.address}/v1/embeddings"
        self._timeout_header = TIMEOUT_HEADER

    async def connect(self) -> None:
        """Open the connection pool (connections open on first use and stay open)."""
        import aiohttp

        context = True  # aiohttp's default verification, used only for https
        if self.spec.root_certificates is not None:
            context = ssl.create_default_context(cadata=self.spec.root_certificates.decode("ascii"))
        headers = {"Content-Type": "application/json"}
        if self.spec.token is not None:
            headers["Authorization"] = f"Bearer {self.spec.token}"
        # limit=0: no cap on connections, so each closed-loop client keeps its own instead of queueing for one
        # inside the client (gRPC multiplexes every call over one HTTP/2 connection; HTTP/1.1 cannot).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=context),
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def embed(self, texts: list[str], dims: int | None, timeout: float, *, layers: int | None = None) -> Reply:
        """One POST /v1/embeddings; the timeout also goes to the server, as gRPC sends its deadline."""
        import aiohttp
        import orjson

        body: dict[str, object] = {"input": texts, "encoding_format": self.spec.encoding_format}
        if self.spec.outputs:
            body["outputs"] = [
                {"output_dtype": e, **({} if d is None else {"dimensions": d})} for d, e in self.spec.outputs
            ]
        elif dims is not None:
            body["dimensions"] = dims
        if layers is not None:
            body["layers"] = layers  # mrl-serve's extra field, as `prompt_name` is
        if self.spec.model:
            body["model"] = self.spec.model
        try:
            async with self._session.post(
                self._url,
                data=orjson.dumps(body),
                headers={self._timeout_header: f"{timeout:g}"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                payload = await response.read()
                status = response.status
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise TargetError("TIMEOUT", f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as e:  # refused, reset, TLS failures
            raise TargetError("CONNECTION_ERROR", str(e) or type(e).__name__) from None
        if status != 200:
            raise TargetError(f"HTTP_{status}", error_message(payload))
        if self.spec.outputs:
            return several_outputs(payload)
        rows, tokens, layers_run = openai_vectors(payload, self.spec.encoding_format)
        return Reply(texts=int(rows.shape[0]), dims=int(rows.shape[1]), tokens=tokens, layers=layers_run)

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()


TARGET_KINDS: dict[str, type[Target]] = {"mrl": MrlTarget, "triton": TritonTarget, "http": HttpTarget}
"""Every kind of server `mrl-bench serve` can load, by the name `--target KIND=ADDRESS` uses."""


def open_target(spec: TargetSpec) -> Target:
    """The Target for a spec (not yet connected)."""
    return TARGET_KINDS[spec.kind](spec)
