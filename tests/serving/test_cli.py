"""`mrl-serve` as a subprocess: one-line errors, help, named artifacts, a light import."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serving_helpers import SERVE, Served, self_signed

from mrl.serving.client import AsyncEmbedClient


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mrl-serve: error: "), result.stderr
    for word in words:
        assert word in last, last


def test_cli_errors_are_one_readable_line_with_exit_code_2(tiny_artifact, tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "missing")), "does not exist")
    assert_one_line_error(run_cli(str(tiny_artifact), "--tls-cert", str(tmp_path)), "--tls-key")
    (tmp_path / "empty-token").write_text("\n")
    assert_one_line_error(run_cli(str(tiny_artifact), "--auth-token-file", str(tmp_path / "empty-token")), "empty")
    assert_one_line_error(run_cli(str(tiny_artifact), "--auth-token-file", str(tmp_path / "nope")), "cannot read")
    assert_one_line_error(run_cli(str(tiny_artifact), "--max-batch-size", "0"), "max_batch_size")
    assert_one_line_error(
        run_cli(str(tiny_artifact), "--max-queue-tokens", "10", "--max-batch-tokens", "100"), "raise max_queue_tokens"
    )
    assert_one_line_error(run_cli(str(tiny_artifact), "--precision", "int8"), "no int8 profiles")
    assert_one_line_error(run_cli(str(tiny_artifact), str(tiny_artifact)), "both named", "NAME=ARTIFACT_DIR")
    assert_one_line_error(run_cli(f"a={tiny_artifact}", "--precision", "b=fp32"), "--precision names b")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "cert.pem").write_bytes(self_signed(a)[0])
    self_signed(b)  # another key
    assert_one_line_error(
        run_cli(str(tiny_artifact), "--tls-cert", str(a / "cert.pem"), "--tls-key", str(b / "key.pem")),
        "do not work together",
        "KEY_VALUES_MISMATCH",
        str(b / "key.pem"),
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_cli(str(tiny_artifact), "--port", str(port)), "cannot listen", str(port))


def test_help_shows_grpcurl_and_python_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("grpcurl", "mrl.v1.Embedder/Embed", "EmbedClient", "--max-batch-tokens", "--auth-token-file"):
        assert text in result.stdout


def test_named_artifacts_and_per_model_precision(tiny_artifact):
    served = Served(f"small={tiny_artifact}", "--precision", "small=fp32", "--port", "0")
    try:
        assert served.ready.wait(timeout=120) and served.proc.poll() is None, "".join(served.lines)

        async def scenario():
            async with AsyncEmbedClient(f"127.0.0.1:{served.port}") as c:
                return await c.list_models(timeout=30), await c.embed(["named"], model="small", timeout=30)

        (info,), vectors = asyncio.run(scenario())
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=60) == 0
    finally:
        served.stop()
    assert info.name == "small" and info.precision == "fp32" and vectors.shape == (1, 32)


@pytest.mark.parametrize("module", ["mrl.serving", "mrl.serving.client", "mrl.serving.cli", "mrl.serving.http_service"])
def test_serving_never_imports_torch_or_transformers(module):
    code = (
        f"import sys, {module}, mrl.serving.server\n"
        "roots = {'torch', 'transformers', 'sentence_transformers'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path.home())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
