"""`mrl-serve` settings from MRL_SERVE_* variables: one naming rule, flags win, bad values are one-line errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from serving_helpers import SERVE, Served, assert_one_line_error

from mrl.serving.cli import parse_args
from mrl.serving.client import AsyncEmbedClient

# One valid value per flag: (variable's text, the parsed value). A new flag must be added here.
SAMPLES = {
    "--host": ("0.0.0.0", "0.0.0.0"),
    "--port": ("50052", 50052),
    "--http-port": ("8081", 8081),
    "--http-metrics": ("true", True),
    "--metrics-port": ("9091", 9091),
    "--metrics-host": ("127.0.0.2", "127.0.0.2"),
    "--tls-cert": ("/run/tls/tls.crt", Path("/run/tls/tls.crt")),
    "--tls-key": ("/run/tls/tls.key", Path("/run/tls/tls.key")),
    "--auth-token-file": ("/run/token/token", Path("/run/token/token")),
    "--max-message-bytes": ("1048576", 1048576),
    "--max-inputs": ("64", 64),
    "--max-connections": ("512", 512),
    "--idle-timeout-s": ("30", 30.0),
    "--max-connection-age-s": ("300", 300.0),
    "--shutdown-grace-s": ("12.5", 12.5),
    "--precision": ("big=fp16, small=int8", ["big=fp16", "small=int8"]),
    "--model-alias": ("big=text-embedding-3-small", ["big=text-embedding-3-small"]),
    "--auto-truncate": ("on", True),
    "--backend": ("onnxruntime-cpu", "onnxruntime-cpu"),
    "--intra-op-threads": ("3", 3),
    "--lone-batch-threads": ("0", 0),
    "--intra-op-spinning": ("off", False),
    "--no-verify": ("1", True),
    "--serve-unverified": ("yes", True),
    "--max-batch-tokens": ("8192", 8192),
    "--max-batch-size": ("16", 16),
    "--max-padding": ("1", 1.0),
    "--max-queue-delay-ms": ("2.5", 2.5),
    "--max-queue-tokens": ("65536", 65536),
    "--batch-workers": ("1", 1),
    "--worker-niceness": ("0", 0),
    "--log-level": ("DEBUG", "DEBUG"),
}


def variable(flag: str) -> str:
    """The documented rule, written out independently of the code: MRL_SERVE_ + the flag in capitals, '-' as '_'."""
    return "MRL_SERVE_" + flag[2:].upper().replace("-", "_")


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MRL_SERVE_")}
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120, env={**clean, **env})


def test_every_flag_in_help_reads_its_variable_by_one_rule():
    helped = set(re.findall(r"(?m)^\s+(--[a-z][a-z-]+)", run("--help", env={}).stdout)) - {"--help"}
    helped -= {"--no-intra-op-spinning"}  # the negative spelling of --intra-op-spinning
    assert helped == set(SAMPLES), "add the new flag to SAMPLES"
    environ = {variable(flag): text for flag, (text, _) in SAMPLES.items()} | {"MRL_SERVE_ARTIFACTS": "a=/m/a b=/m/b"}
    args = parse_args([], environ=environ)
    for flag, (_, expected) in SAMPLES.items():
        assert getattr(args, flag[2:].replace("-", "_")) == expected, flag
    assert args.artifacts == ["a=/m/a", "b=/m/b"]
    assert set(args.environment.values()) == {f"{k}={v}" for k, v in environ.items()}


def test_flags_win_over_the_environment_and_empty_variables_count_as_unset():
    environ = {
        "MRL_SERVE_ARTIFACTS": "/from/env",
        "MRL_SERVE_PORT": "50052",
        "MRL_SERVE_HTTP_PORT": "8081",
        "MRL_SERVE_PRECISION": "fp16",
        "MRL_SERVE_INTRA_OP_SPINNING": "true",
        "MRL_SERVE_METRICS_PORT": "",
        "MRL_SERVE_MAX_BATCH_SIZE": "  ",
    }
    flags = ["/from/flag", "--port", "50053", "--precision", "int8", "--no-intra-op-spinning"]
    args = parse_args(flags, environ=environ)
    assert args.artifacts == ["/from/flag"] and args.port == 50053 and args.precision == ["int8"]
    assert args.intra_op_spinning is False
    assert args.http_port == 8081  # no flag: the environment's
    assert args.metrics_port is None and args.max_batch_size == 32  # empty: the default
    assert args.environment == {"http_port": "MRL_SERVE_HTTP_PORT=8081"}


def test_the_environment_is_read_when_parsing_not_before(monkeypatch):
    monkeypatch.setenv("MRL_SERVE_PORT", "50099")
    assert parse_args(["/a"]).port == 50099
    monkeypatch.setenv("MRL_SERVE_PORT", "50098")
    assert parse_args(["/a"]).port == 50098
    assert parse_args(["/a"], environ={}).port == 50051


def test_bad_values_are_one_line_errors_naming_the_variable(tiny_artifact, tmp_path):
    art = str(tiny_artifact)
    cases = [
        ({"MRL_SERVE_HTTP_PORT": "eighty"}, "MRL_SERVE_HTTP_PORT='eighty'", "--http-port"),
        ({"MRL_SERVE_NO_VERIFY": "maybe"}, "MRL_SERVE_NO_VERIFY='maybe'", "true"),
        ({"MRL_SERVE_LOG_LEVEL": "LOUD"}, "MRL_SERVE_LOG_LEVEL='LOUD'", "DEBUG"),
        ({"MRL_SERVE_PORT": "tcp://10.0.0.7:50051"}, "MRL_SERVE_PORT", "enableServiceLinks: false"),
        ({"MRL_SERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size", "MRL_SERVE_MAX_BATCH_SIZE=0"),
        ({"MRL_SERVE_BATCH_WORKERS": "0"}, "workers", "MRL_SERVE_BATCH_WORKERS=0"),
        ({"MRL_SERVE_MAX_INPUTS": "-1"}, "max_inputs_per_request", "MRL_SERVE_MAX_INPUTS=-1"),
        ({"MRL_SERVE_METRICS_PORT": "70000"}, "metrics_port", "MRL_SERVE_METRICS_PORT=70000"),
        ({"MRL_SERVE_INTRA_OP_THREADS": "-2"}, "intra_op_threads", "MRL_SERVE_INTRA_OP_THREADS=-2"),
        ({"MRL_SERVE_TLS_CERT": str(tmp_path / "c.pem")}, "--tls-key", "MRL_SERVE_TLS_CERT="),
        ({"MRL_SERVE_AUTH_TOKEN_FILE": str(tmp_path / "nope")}, "cannot read", "MRL_SERVE_AUTH_TOKEN_FILE="),
    ]
    for env, *words in cases:
        assert_one_line_error(run(art, env=env), *words)
    missing = str(tmp_path / "missing")
    assert_one_line_error(run(env={"MRL_SERVE_ARTIFACTS": missing}), "does not exist", f"MRL_SERVE_ARTIFACTS={missing}")
    assert_one_line_error(run(env={}), "MRL_SERVE_ARTIFACTS")
    # A flag given on the command line is not blamed on a variable that set something else.
    result = run(art, "--max-batch-size", "0", env={"MRL_SERVE_HTTP_PORT": "8081"})
    assert_one_line_error(result, "max_batch_size")
    assert "from the environment" not in result.stderr.splitlines()[-1]


def test_unknown_variables_are_warned_about_not_fatal():
    result = run("--help", env={"MRL_SERVE_HTTP_PRT": "8080"})
    assert result.returncode == 0
    assert "MRL_SERVE_HTTP_PRT is set but no flag reads it" in result.stderr


def test_a_server_configured_only_by_the_environment_serves(tiny_artifact, monkeypatch):
    for name in [k for k in os.environ if k.startswith("MRL_SERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MRL_SERVE_ARTIFACTS", f"tiny={tiny_artifact}")
    monkeypatch.setenv("MRL_SERVE_PORT", "0")
    monkeypatch.setenv("MRL_SERVE_MAX_INPUTS", "2")
    served = Served()
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)

        async def scenario():
            async with AsyncEmbedClient(f"127.0.0.1:{served.port}") as c:
                vectors = await c.embed(["from the environment"], model="tiny", timeout=30)
                try:
                    await c.embed(["a", "b", "c"], model="tiny", timeout=30)
                except grpc.RpcError as e:  # over the limit the environment set
                    return vectors, e.code()
                return vectors, None

        vectors, refused = asyncio.run(scenario())
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0
    finally:
        served.stop()
    assert vectors.shape == (1, 32)
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    assert any("from the environment: MRL_SERVE_ARTIFACTS=" in line for line in served.lines)


@pytest.mark.parametrize("value", ["1", "TRUE", "yes", "On"])
def test_switches_take_the_usual_spellings_of_true(value):
    assert parse_args(["/a"], environ={"MRL_SERVE_HTTP_METRICS": value}).http_metrics is True
