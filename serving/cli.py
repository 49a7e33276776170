"""`mrl-serve`: serve exported artifacts over gRPC and OpenAI-compatible HTTP. The only module that reads flags,
the environment and files for the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from mrl.cli import OneLineParser
from mrl.runtime.errors import MrlError
from mrl.serving.config import BatcherConfig, ModelSpec, RequestLimits, ServerConfig, TlsConfig
from mrl.serving.core import check_names
from mrl.serving.logs import limit_repeats
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import ServedModel
from mrl.serving.process import connections_that_fit, raise_open_files_limit, return_freed_memory_to_the_os
from mrl.serving.server import EmbedServer

log = logging.getLogger("mrl.serving")

EXAMPLES = """\
examples:
  mrl-serve artifacts/minilm --port 50051 --metrics-port 9090
  mrl-serve small=artifacts/minilm big=artifacts/gemma --precision big=fp16
  mrl-serve artifacts/minilm --host 0.0.0.0 --tls-cert server.crt --tls-key server.key \\
      --auth-token-file token.txt
  mrl-serve artifacts/minilm --http-port 8080 --http-metrics   # also OpenAI-compatible HTTP, /metrics on it

call it (grpcurl uses the server's reflection; -plaintext without TLS):
  grpcurl -plaintext -d '{"inputs": ["hello world"], "dimensions": 128}' \\
      127.0.0.1:50051 mrl.v1.Embedder/Embed
  grpcurl -plaintext -H "authorization: Bearer $(cat token.txt)" 127.0.0.1:50051 mrl.v1.Embedder/ListModels
  grpcurl -plaintext -d '{"service": "minilm"}' 127.0.0.1:50051 grpc.health.v1.Health/Check

from Python (numpy arrays; float32 unless encoding= says int8, uint8, binary, ubinary, float16):
  from mrl.serving.client import EmbedClient
  with EmbedClient("127.0.0.1:50051") as client:
      vectors = client.embed(["hello world"], dims=128, prompt_name="query")

over HTTP (with --http-port 8080; add -H "Authorization: Bearer $(cat token.txt)" with a token):
  curl -s 127.0.0.1:8080/v1/embeddings -d '{"input": ["hello world"], "dimensions": 128}'
  curl -s 127.0.0.1:8080/v1/embeddings -d '{"input": "hello", "encoding_format": "int8"}'
  curl -s 127.0.0.1:8080/v1/models
  curl -s 127.0.0.1:8080/health
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused-without-a-token")
  client.embeddings.create(model="minilm", input=["hello world"], dimensions=128)
  # int8 numbers through the SDK: extra_body={"encoding_format": "int8"} (base64 with output_dtype is refused)
  from langchain_openai import OpenAIEmbeddings   # texts, not tiktoken ids:
  OpenAIEmbeddings(model="minilm", base_url="http://127.0.0.1:8080/v1", api_key="unused",
                   check_embedding_ctx_length=False)
  mrl-serve artifacts/minilm --http-port 8080 --model-alias text-embedding-3-small   # the name gateways send

from the environment (containers): every flag also reads MRL_SERVE_<FLAG>, the flag's name in capitals with
'-' as '_' (--http-port: MRL_SERVE_HTTP_PORT; switches: 1/true/yes/on or 0/false/no/off; --precision: values
separated by spaces or commas); MRL_SERVE_ARTIFACTS holds the artifact arguments, separated by spaces. A flag
on the command line wins over its variable; an empty variable counts as unset.
  MRL_SERVE_ARTIFACTS=/models/minilm MRL_SERVE_HTTP_PORT=8080 mrl-serve --max-batch-size 64
"""
ENV_PREFIX = "MRL_SERVE_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Config fields whose names differ from their flag's, so an error about one can name the variable that set it.
_FIELD_OF = {"batch_workers": "workers", "max_inputs": "max_inputs_per_request"}


def parse_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, parsed, over the MRL_SERVE_* variables of `environ` (default: os.environ).

    `args.environment` maps each setting taken from the environment to its variable."""
    p = OneLineParser(
        prog="mrl-serve",
        description="Serve exported Matryoshka embedding artifacts over gRPC (mrl.v1.Embedder) and, with "
        "--http-port, the OpenAI-compatible HTTP API (POST /v1/embeddings).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "artifacts",
        nargs="*",
        metavar="[NAME=]ARTIFACT_DIR",
        help="artifact directories (mrl-export); at least one, here or in MRL_SERVE_ARTIFACTS",
    )
    server, limits = ServerConfig(), RequestLimits()
    net = p.add_argument_group("network")
    net.add_argument("--host", default=server.host, help="address to listen on (0.0.0.0: all; default %(default)s)")
    net.add_argument("--port", type=int, default=server.port, help="gRPC port (0: a free one; default %(default)s)")
    net.add_argument(
        "--http-port", type=int, help="also serve OpenAI-compatible HTTP on this port (0: a free one; default: off)"
    )
    net.add_argument("--http-metrics", action="store_true", help="serve Prometheus /metrics on --http-port too")
    net.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: off)")
    net.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")
    net.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (with --tls-key)")
    net.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    net.add_argument("--auth-token-file", type=Path, help="file holding a bearer token every call must carry")
    net.add_argument(
        "--max-message-bytes",
        type=int,
        default=limits.max_message_bytes,
        help="largest request (default %(default)s)",
    )
    net.add_argument(
        "--max-inputs",
        type=int,
        default=limits.max_inputs_per_request,
        help="texts per request at most (default %(default)s)",
    )
    net.add_argument(
        "--max-connections",
        type=int,
        default=server.max_connections,
        help="open connections per door (gRPC, HTTP); beyond, new ones are refused (default %(default)s, "
        "lowered to fit the open-files limit)",
    )
    net.add_argument(
        "--idle-timeout-s",
        type=float,
        default=server.idle_timeout_s,
        help="close a connection with no call in progress for this long (default %(default)s)",
    )
    net.add_argument(
        "--max-connection-age-s",
        type=float,
        default=server.max_connection_age_s,
        help="ask a gRPC connection older than this to close once its calls finish, so that clients reconnect "
        "and reach pods added since (default: never; Kubernetes: 300)",
    )
    net.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=server.shutdown_grace_s,
        help="on SIGTERM, time for calls in flight (default %(default)s)",
    )
    model = p.add_argument_group("models")
    model.add_argument(
        "--precision",
        action="append",
        default=[],
        metavar="[NAME=]PRECISION",
        help="precision to serve, for all models or one (repeatable; default: each manifest's first)",
    )
    model.add_argument(
        "--model-alias",
        action="append",
        default=[],
        metavar="[NAME=]ALIAS",
        help="another name a model answers to, such as text-embedding-3-small for gateways (repeatable; without "
        "NAME: the only model)",
    )
    model.add_argument(
        "--auto-truncate",
        action="store_true",
        help="cut texts over the model's max length instead of refusing them, in requests that do not say "
        "(an HTTP request's truncate wins; default: refuse, as OpenAI's API does)",
    )
    model.add_argument("--backend", default="auto", help="runtime backend (default %(default)s)")
    model.add_argument(
        "--intra-op-threads", type=int, help="ONNX Runtime threads per batch (default: CPU cores / --batch-workers)"
    )
    model.add_argument(
        "--lone-batch-threads",
        type=int,
        help="threads for a batch that has the machine to itself, in a session of its own "
        "(default: all CPU cores when --batch-workers > 1; 0: no such session)",
    )
    model.add_argument(
        "--intra-op-spinning",
        action=argparse.BooleanOptionalAction,
        help="let ONNX Runtime's idle threads spin for work (default: only with one batch worker)",
    )
    model.add_argument("--no-verify", action="store_true", help="skip the sha256 check of artifact files at start")
    model.add_argument(
        "--serve-unverified",
        action="store_true",
        help="serve a model even where its artifact's acceptance test fails on this machine (logged as a WARNING, "
        "mrl_model_verified 0)",
    )
    batch = p.add_argument_group("batching")
    defaults = BatcherConfig()
    batch.add_argument(
        "--max-batch-tokens",
        type=int,
        default=defaults.max_batch_tokens,
        help="padded tokens per batch (default %(default)s)",
    )
    batch.add_argument(
        "--max-batch-size", type=int, default=defaults.max_batch_size, help="texts per batch (default %(default)s)"
    )
    batch.add_argument(
        "--max-padding",
        type=float,
        default=defaults.max_padding,
        help="share of a batch that may be padding (default %(default)s; GPUs: 1)",
    )
    batch.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=defaults.max_queue_delay_ms,
        help="wait this long to fill a batch (default %(default)s)",
    )
    batch.add_argument(
        "--max-queue-tokens",
        type=int,
        default=defaults.max_queue_tokens,
        help="tokens that may wait; beyond: RESOURCE_EXHAUSTED (default %(default)s)",
    )
    batch.add_argument(
        "--batch-workers",
        type=int,
        default=defaults.workers,
        help="batches run at once per model, each in its own thread (default %(default)s)",
    )
    batch.add_argument(
        "--worker-niceness",
        type=int,
        default=defaults.worker_niceness,
        help="nice value of inference threads, so the event loop gets the CPU first (default %(default)s)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    environment = environment_defaults(p, os.environ if environ is None else environ)
    lists = {dest: value for dest, (_, value) in environment.items() if isinstance(value, list)}
    p.set_defaults(**{dest: value for dest, (_, value) in environment.items() if dest not in lists})
    args = p.parse_args(argv)
    for dest, value in lists.items():  # argparse would append the flags' values to a list default
        if not getattr(args, dest):
            setattr(args, dest, value)
    # What the environment set and no flag replaced (argparse keeps a default's very object).
    args.environment = {dest: text for dest, (text, value) in environment.items() if getattr(args, dest) is value}
    if not args.artifacts:
        p.error("give at least one [NAME=]ARTIFACT_DIR, as an argument or in MRL_SERVE_ARTIFACTS")
    return args


def environment_name(flag: str) -> str:
    """The variable that sets a flag: --http-port -> MRL_SERVE_HTTP_PORT."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def environment_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict[str, tuple[str, object]]:
    """The settings MRL_SERVE_* variables give, as dest -> ("NAME=VALUE", value), each checked as its flag would be
    (a bad value is a usage error naming the variable); unknown MRL_SERVE_* variables are warned about."""
    found: dict[str, tuple[str, object]] = {}
    known = set()
    for action in parser._actions:  # argparse has no public list of its arguments
        if action.default == argparse.SUPPRESS:  # --help
            continue
        name = environment_name(action.option_strings[0] if action.option_strings else action.dest)
        known.add(name)
        raw = environ.get(name, "").strip()
        if raw:
            found[action.dest] = (f"{name}={raw}", _environment_value(parser, action, name, raw))
    for name in sorted(set(environ) - known):
        if name.startswith(ENV_PREFIX):
            print(f"{parser.prog}: warning: {name} is set but no flag reads it; ignored", file=sys.stderr)
    return found


def _environment_value(parser: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str) -> object:
    """One variable's value, converted and checked as the flag's would be; a usage error (exit 2) if bad."""
    flag = action.option_strings[0] if action.option_strings else action.metavar
    if action.nargs == 0:  # a switch
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        parser.error(f"{name}={raw!r} (for {flag}) must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
    if isinstance(action.default, list) or action.nargs == "*":  # --precision (repeatable), the artifacts
        return re.split(r"[\s,]+" if action.option_strings else r"\s+", raw)
    try:
        value = raw if action.type is None else action.type(raw)
    except (TypeError, ValueError):
        hint = ""
        if raw.startswith("tcp://"):  # Kubernetes puts each Service in a pod's environment as NAME_PORT=tcp://...
            hint = ": a Kubernetes Service link? Set enableServiceLinks: false in the pod spec, or rename the Service"
        parser.error(f"{name}={raw!r} (for {flag}) is not a valid {getattr(action.type, '__name__', 'value')}{hint}")
    if action.choices is not None and value not in action.choices:
        parser.error(f"{name}={raw!r} (for {flag}) must be one of {', '.join(map(str, action.choices))}")
    return value


def naming_the_environment(message: str, environment: Mapping[str, str]) -> str:
    """An error `message` with the MRL_SERVE_* variables it is about appended (`environment`: dest -> NAME=VALUE)."""
    named = []
    for dest, setting in environment.items():
        words = {dest, _FIELD_OF.get(dest, dest), "--" + dest.replace("_", "-")}
        value = setting.partition("=")[2]
        mentioned = any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", message) for w in words)
        if mentioned or (len(value) > 3 and value in message):
            named.append(setting)
    return f"{message} (from the environment: {', '.join(named)})" if named else message


def split_named(value: str) -> tuple[str | None, str]:
    """`NAME=VALUE` -> (NAME, VALUE); a plain value -> (None, value)."""
    name, sep, rest = value.partition("=")
    return (name, rest) if sep and name and "/" not in name else (None, value)


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """One ModelSpec per artifact argument, with its precision."""
    precisions = dict(split_named(v) for v in args.precision)
    specs = []
    for value in args.artifacts:
        name, directory = split_named(value)
        precision = precisions.get(name) if name in precisions else precisions.get(None)
        specs.append(
            ModelSpec(
                artifact_dir=Path(directory),
                name=name,
                precision=precision,
                backend=args.backend,
                intra_op_threads=args.intra_op_threads,  # unset flags: the library's defaults (ModelSpec)
                spinning=args.intra_op_spinning,
                lone_batch_threads=args.lone_batch_threads,
                verify=not args.no_verify,
                serve_unverified=args.serve_unverified,
            )
        )
    named = {s.name for s in specs}
    unknown = [n for n in precisions if n is not None and n not in named]
    if unknown:
        raise ValueError(f"--precision names {', '.join(unknown)}, which no NAME=ARTIFACT_DIR argument gives")
    return specs


def model_aliases(values: list[str], names: list[str]) -> dict[str, str]:
    """`--model-alias [NAME=]ALIAS` values as alias -> model name (no NAME: the only model)."""
    aliases: dict[str, str] = {}
    for value in values:
        name, alias = split_named(value)
        if name is None and len(names) != 1:
            raise ValueError(f"--model-alias {value}: several models are served; say which as NAME=ALIAS")
        if not alias or any(c.isspace() for c in alias):
            raise ValueError(f"--model-alias {value}: the alias must be non-empty and without spaces")
        aliases[alias] = names[0] if name is None else name
    return aliases


def read_file(path: Path, what: str) -> bytes:
    """A file's bytes, or an error that names the flag."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the flags describe (reads the TLS and token files)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    tls = None
    if args.tls_cert is not None:
        cert, key = read_file(args.tls_cert, "--tls-cert"), read_file(args.tls_key, "--tls-key")
        try:
            tls = TlsConfig(certificate_chain=cert, private_key=key)
        except ValueError as e:
            raise ValueError(f"--tls-cert {args.tls_cert} and --tls-key {args.tls_key}: {e}") from None
    token = None
    if args.auth_token_file is not None:
        token = read_file(args.auth_token_file, "--auth-token-file").decode("utf-8", "replace").strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty: write a token into it")
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        http_metrics=args.http_metrics,
        tls=tls,
        auth_token=token,
        limits=RequestLimits(max_inputs_per_request=args.max_inputs, max_message_bytes=args.max_message_bytes),
        shutdown_grace_s=args.shutdown_grace_s,
        max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout_s,
        max_connection_age_s=args.max_connection_age_s,
        auto_truncate=args.auto_truncate,
        batcher=BatcherConfig(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_size=args.max_batch_size,
            max_padding=args.max_padding,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_tokens=args.max_queue_tokens,
            workers=args.batch_workers,
            worker_niceness=args.worker_niceness,
        ),
    )


def exit_now(signum: int) -> None:
    """A second SIGTERM or SIGINT while shutting down: stop at once, without draining."""
    log.warning("second %s: exiting without draining", signal.Signals(signum).name)
    logging.shutdown()
    os._exit(128 + signum)


def fit_open_files(config: ServerConfig) -> ServerConfig:
    """Raise the soft open-files limit to the hard one, and lower `max_connections` to what fits under it."""
    before, after = raise_open_files_limit()
    if after != before:
        log.info("open files: soft limit raised from %d to %d", before, after)
    doors = 2 if config.http_port is not None else 1
    fits = connections_that_fit(config.max_connections, after, doors)
    if fits < config.max_connections:
        log.warning(
            "--max-connections %d per door does not fit %d open files: %d per door (raise the hard limit: ulimit -Hn)",
            config.max_connections,
            after,
            fits,
        )
        config = dataclasses.replace(config, max_connections=fits)
    return config


async def serve(models: list[ServedModel], config: ServerConfig, metrics: ServerMetrics) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully (a second signal: at once)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        stop.set()
        loop.add_signal_handler(signum, exit_now, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    server = EmbedServer(models, config, metrics)
    try:
        await server.start()
        warmup = asyncio.ensure_future(server.warmup())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait({warmup, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if warmup.done():
            warmup.result()  # a failed warm-up ends the server with its error
            await signalled
            log.info("signal received")
        else:
            log.info("signal received during warm-up")
            warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warmup
    finally:
        await server.stop()


def leave_busy_threads() -> None:
    """Exit now if threads still run after shutdown (a warm-up that never ended): the interpreter would wait
    for them forever."""
    busy = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if busy:
        log.warning("exiting without waiting for %s (still running)", ", ".join(busy))
        logging.shutdown()
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mrl-serve`; returns the exit code."""
    args = parse_args(argv)
    return_freed_memory_to_the_os()
    # tokenizers' batch encoding hands texts to a thread pool created by the first caller: a niced inference
    # thread (warm-up), so the event loop, tokenising a small request inline, waited on threads that the
    # scheduler starves (measured: 81% of the loop's time under a storm of refusals).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_repeats()
    if args.environment:
        log.info("from the environment: %s", ", ".join(sorted(args.environment.values())))
    try:
        config = fit_open_files(server_config(args))
        metrics = ServerMetrics()
        specs = model_specs(args)
        models = [ServedModel.load(spec, config.batcher) for spec in specs]
        check_names(models)
        config = dataclasses.replace(config, model_aliases=model_aliases(args.model_alias, [m.name for m in models]))
        asyncio.run(serve(models, config, metrics))
        leave_busy_threads()
    except (MrlError, ValueError, OSError) as e:
        print(f"mrl-serve: error: {naming_the_environment(str(e), args.environment)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
