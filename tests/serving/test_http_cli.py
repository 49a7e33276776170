"""`mrl-serve --http-port` as a subprocess: HTTP beside gRPC, metrics on the HTTP port, one-line errors, help."""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.request

from serving_helpers import Served
from test_cli import assert_one_line_error, run_cli


def test_http_port_serves_openai_embeddings_and_metrics_beside_grpc(tiny_artifact):
    served = Served(str(tiny_artifact), "--port", "0", "--http-port", "0", "--http-metrics")
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
        (port,) = [int(m.group(1)) for line in served.lines if (m := re.search(r"HTTP on http://[^:]+:(\d+)", line))]
        assert port != served.port
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings", data=b'{"input": ["hello"], "dimensions": 8}'
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=60) == 0, "".join(served.lines)
    finally:
        served.stop()
    assert len(reply["data"][0]["embedding"]) == 8
    assert 'outcome="ok",transport="http"} 1.0' in metrics


def test_http_flag_errors_are_one_line(tiny_artifact):
    assert_one_line_error(run_cli(str(tiny_artifact), "--http-metrics"), "set http_port too")
    assert_one_line_error(run_cli(str(tiny_artifact), "--port", "5000", "--http-port", "5000"), "different ports")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(
            run_cli(str(tiny_artifact), "--port", "0", "--http-port", str(port)), "for HTTP", str(port)
        )


def test_help_shows_curl_and_openai_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("--http-port", "--http-metrics", "curl -s 127.0.0.1:8080/v1/embeddings", "OpenAI(base_url="):
        assert text in result.stdout


def test_model_alias_and_connection_flag_errors_are_one_line(tiny_artifact):
    both = (f"a={tiny_artifact}", f"b={tiny_artifact}")
    assert_one_line_error(run_cli(*both, "--model-alias", "text-embedding-3-small"), "say which as NAME=ALIAS")
    assert_one_line_error(run_cli(*both, "--model-alias", "c=x"), "alias 'x' names no served model 'c'")
    assert_one_line_error(run_cli(*both, "--model-alias", "a=b"), "alias 'b' is already a served model's name")
    assert_one_line_error(run_cli(str(tiny_artifact), "--max-connections", "0"), "max_connections")
    assert_one_line_error(run_cli(str(tiny_artifact), "--idle-timeout-s", "-1"), "idle_timeout_s")


def test_a_model_alias_and_auto_truncate_from_the_command_line(tiny_artifact):
    served = Served(
        str(tiny_artifact), "--port", "0", "--http-port", "0", "--model-alias", "text-embedding-3-small",
        "--auto-truncate",
    )  # fmt: skip
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)
        (port,) = [int(m.group(1)) for line in served.lines if (m := re.search(r"HTTP on http://[^:]+:(\d+)", line))]
        body = json.dumps({"input": ["word " * 200], "model": "text-embedding-3-small"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body)
        reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
    finally:
        served.stop()
    assert reply["model"] == "tiny-bert" and reply["usage"]["prompt_tokens"] == 48  # cut to the max length
