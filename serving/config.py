"""Configuration of the batcher and the server: frozen dataclasses, validated when built."""

from __future__ import annotations

import math
import ssl
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

GRPC_MAX_INT = 2**31 - 1
"""gRPC's options are C ints: a larger --max-message-bytes failed at start with a traceback."""


def _positive(name: str, value: float, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:  # NaN too
        raise ValueError(f"{name} must be a positive number, not {value!r}: {hint}")


def _not_negative(name: str, value: float, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:  # NaN too
        raise ValueError(f"{name} must be 0 or more, not {value!r}: {hint}")


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    """How the dynamic batcher forms batches and how much it may hold."""

    max_batch_tokens: int = 16384
    """Padded tokens per batch (texts x longest text); a single longer text still runs alone."""
    max_batch_size: int = 32
    """Texts per batch."""
    max_padding: float = 0.1
    """Share of a batch's padded tokens that may be padding. On CPUs padding is wasted compute and batches
    of 8 similar-length texts run as fast per text as batches of 32, so keep it low; GPUs gain from larger
    batches: raise it (1.0: no limit)."""
    max_queue_delay_ms: float = 5.0
    """How long the oldest waiting text may wait for a batch to fill."""
    max_queue_tokens: int = 262144
    """Tokens that may wait in the queue; beyond it requests get RESOURCE_EXHAUSTED at once."""
    workers: int = 2
    """Batches that may run at once, each in its own thread."""
    worker_niceness: int = 10
    """Nice value of the inference threads (Linux): the event loop, which parses requests, answers health
    and refuses at once what it must, then gets the CPU first however busy the model is (0: as the loop)."""

    def __post_init__(self) -> None:
        _positive("max_batch_tokens", self.max_batch_tokens, "try 16384")
        _positive("max_batch_size", self.max_batch_size, "try 32")
        _positive("max_queue_tokens", self.max_queue_tokens, "try 262144")
        _positive("workers", self.workers, "try 1, or 2 with intra_op_threads=1 on a small CPU")
        if isinstance(self.worker_niceness, bool) or not isinstance(self.worker_niceness, int):
            raise ValueError(f"worker_niceness must be a whole number in 0..19, not {self.worker_niceness!r}")
        if not 0 <= self.worker_niceness <= 19:
            raise ValueError(f"worker_niceness must be in 0..19 (Unix nice values), not {self.worker_niceness}")
        _not_negative("max_queue_delay_ms", self.max_queue_delay_ms, "try 5")
        if isinstance(self.max_padding, bool) or not isinstance(self.max_padding, (int, float)):
            raise ValueError(f"max_padding must be a number in 0..1, not {self.max_padding!r}: try 0.1")
        if not 0 <= self.max_padding <= 1:
            raise ValueError(f"max_padding must be in 0..1 (a share of the batch), not {self.max_padding}: try 0.1")
        if self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError(
                f"max_queue_tokens ({self.max_queue_tokens}) is below max_batch_tokens ({self.max_batch_tokens}): "
                "the queue must hold at least one full batch; raise max_queue_tokens"
            )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One artifact to serve, under a name (None: the manifest's name)."""

    artifact_dir: Path
    name: str | None = None
    precision: str | None = None
    backend: str = "auto"
    verify: bool = True
    """Check every file's sha256 against the manifest when loading."""
    serve_unverified: bool = False
    """Serve even where the artifact's acceptance test fails on this machine (a WARNING and mrl_model_verified 0)."""
    intra_op_threads: int | None = None
    """Threads per inference (0: ONNX Runtime's default, one per core; None: the cores shared out among the
    batches that run at once, cores // workers, at least 1)."""
    spinning: bool | None = None
    """Whether ONNX Runtime's idle threads spin for work (None: only when one batch runs at a time, since
    spinning threads take the cores from the batches beside them)."""
    lone_batch_threads: int | None = None
    """Threads for a batch that has the machine to itself (a session of its own, on the graph of the batch's
    depth, spinning while it runs); 0: lone batches run like any other; None: every core."""

    def __post_init__(self) -> None:
        if self.name is not None and (not self.name or any(c.isspace() for c in self.name)):
            raise ValueError(f"model name {self.name!r} must be non-empty and without spaces, like 'minilm'")
        for name, off in (("intra_op_threads", "ONNX Runtime's default"), ("lone_batch_threads", "off")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, not {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be 0 ({off}) or more, not {value}")

    def with_defaults(self, workers: int, cores: int) -> ModelSpec:
        """This spec with every thread setting it leaves unset decided for `workers` batches on `cores` cores."""
        shared = max(1, cores // max(1, workers))
        return replace(
            self,
            intra_op_threads=shared if self.intra_op_threads is None else self.intra_op_threads,
            spinning=workers == 1 if self.spinning is None else self.spinning,
            lone_batch_threads=cores if self.lone_batch_threads is None else self.lone_batch_threads,
        )


ENCRYPTED_KEY = (
    "the TLS key is encrypted and a server cannot ask for its passphrase (gRPC takes no passphrase either): "
    "write it unencrypted with `openssl pkey -in KEY -out KEY.plain`, readable by the server's user only"
)


def _no_passphrase() -> bytes:
    raise ValueError(ENCRYPTED_KEY)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """A PEM certificate chain and private key for the server's TLS port."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if b"-----BEGIN" not in self.certificate_chain:
            raise ValueError("the TLS certificate is not PEM: pass a file holding '-----BEGIN CERTIFICATE-----'")
        if b"-----BEGIN" not in self.private_key or b"PRIVATE KEY" not in self.private_key:
            raise ValueError(
                "the TLS key is not a PEM private key: pass a file holding '-----BEGIN ... PRIVATE KEY-----'"
            )
        if b"ENCRYPTED" in self.private_key:  # PKCS#8 "ENCRYPTED PRIVATE KEY", or the older "Proc-Type: 4,ENCRYPTED"
            raise ValueError(ENCRYPTED_KEY)
        try:
            self.ssl_context()  # gRPC would only say it cannot listen; OpenSSL says why
        except ssl.SSLError as e:
            raise ValueError(
                f"the TLS certificate and key do not work together ({e.reason or e}): pass the private key "
                "that belongs to the certificate"
            ) from None

    def ssl_context(self) -> ssl.SSLContext:
        """A server TLS context (the ssl module reads keys only from files: a private temporary directory)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="mrl-tls-") as directory:  # mode 0700: only we read the key
            cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
            cert.write_bytes(self.certificate_chain)
            key.write_bytes(self.private_key)
            # Never let OpenSSL ask for a passphrase on the terminal: a server has nobody to answer it.
            context.load_cert_chain(cert, key, password=_no_passphrase)
        return context


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What one request may hold: the same limits on every transport."""

    max_inputs_per_request: int = 2048
    """OpenAI's own limit: LangChain sends 1,000 texts a request by default (the batcher splits them into
    batches by the token budget)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest request body the server reads (a gRPC message, an HTTP body)."""

    def __post_init__(self) -> None:
        _positive("max_inputs_per_request", self.max_inputs_per_request, "try 2048")
        _positive("max_message_bytes", self.max_message_bytes, "try 16777216 (16 MiB)")
        if self.max_message_bytes > GRPC_MAX_INT:
            raise ValueError(
                f"max_message_bytes must be at most {GRPC_MAX_INT} (gRPC's limit), not {self.max_message_bytes}"
            )


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Where the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 50051
    """0 picks a free port (the server reports the one it bound)."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint (None: off; 0: a free port)."""
    metrics_host: str | None = None
    """Address of the metrics endpoint (None: same as `host`)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (None: off; 0: a free port); same host, TLS and token as gRPC."""
    http_metrics: bool = False
    """Also serve Prometheus /metrics on the HTTP port."""
    tls: TlsConfig | None = None
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every call but the health check must carry (None: no auth)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long calls in flight may take to finish before they are cancelled."""
    stream_window: int = 32
    """Requests of one EmbedStream that may be in progress at once (more wait unread: flow control)."""
    max_connections: int = 4096
    """Open connections per door (gRPC, HTTP); past it a new one is refused (HTTP: 503 in JSON)."""
    idle_timeout_s: float = 75.0
    """A connection with no call in progress for this long is closed (gRPC clients reconnect by themselves)."""
    max_connection_age_s: float | None = None
    """A gRPC connection older than this is asked to close once its calls finish (None: never), so that
    long-lived clients re-resolve DNS and reach pods the autoscaler added."""
    model_aliases: dict[str, str] = field(default_factory=dict)
    """Other names a served model answers to (alias -> model name), such as the OpenAI names gateways send."""
    auto_truncate: bool = False
    """Cut texts over the model's max length in requests that do not say (HTTP `truncate` absent; gRPC
    `truncate` false, which proto3 cannot tell from absent), instead of refusing them."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must be an address like 127.0.0.1 or 0.0.0.0 (all interfaces)")
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is None and name != "port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name} must be an integer in 0..65535 (0: a free port), not {value!r}")
        if self.http_port is not None and self.http_port != 0 and self.http_port == self.port:
            raise ValueError(f"http_port and port are both {self.port}: give HTTP and gRPC different ports")
        if self.http_metrics and self.http_port is None:
            raise ValueError("http_metrics serves /metrics on the HTTP port: set http_port too")
        if self.auth_token is not None and (not self.auth_token or any(c.isspace() for c in self.auth_token)):
            raise ValueError("the auth token must be non-empty and hold no whitespace: write one token to the file")
        _positive("stream_window", self.stream_window, "try 32")
        _positive("max_connections", self.max_connections, "try 4096")
        _positive("idle_timeout_s", self.idle_timeout_s, "try 75")
        if self.max_connection_age_s is not None:
            _positive("max_connection_age_s", self.max_connection_age_s, "try 300, or leave it unset")
        # gRPC takes these as C ints (times in ms): larger ones failed at start with a traceback.
        age_ms = (self.max_connection_age_s or 0) * 1000
        if age_ms > GRPC_MAX_INT:
            raise ValueError(f"max_connection_age_s must be at most {GRPC_MAX_INT // 1000} (gRPC's limit)")
        if self.max_connections > GRPC_MAX_INT or self.idle_timeout_s * 1000 > GRPC_MAX_INT:
            raise ValueError(
                f"max_connections must be at most {GRPC_MAX_INT} and idle_timeout_s at most "
                f"{GRPC_MAX_INT // 1000} (gRPC's limits), not {self.max_connections} and {self.idle_timeout_s:g}"
            )
        _not_negative("shutdown_grace_s", self.shutdown_grace_s, "try 30")
