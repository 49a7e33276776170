"""`mrl-serve` as a subprocess: one-line errors, help, named artifacts, a light import."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from serving_helpers import SERVE, Served, assert_one_line_error, self_signed

from mrl.serving.cli import serve
from mrl.serving.client import AsyncEmbedClient
from mrl.serving.config import BatcherConfig, ModelSpec, ServerConfig
from mrl.serving.metrics import ServerMetrics
from mrl.serving.model import ServedModel


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_readable_line_with_exit_code_2(tiny_artifact, tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "missing")), "does not exist")
    assert_one_line_error(run_cli(str(tiny_artifact), "--tls-cert", str(tmp_path)), "--tls-key")
    (tmp_path / "empty-token").write_text("\n")
    assert_one_line_error(run_cli(str(tiny_artifact), "--auth-token-file", str(tmp_path / "empty-token")), "empty")
    assert_one_line_error(run_cli(str(tiny_artifact), "--auth-token-file", str(tmp_path / "nope")), "cannot read")
    assert_one_line_error(run_cli(str(tiny_artifact), "--max-batch-size", "0"), "max_batch_size")
    # Both were a traceback (exit 1): gRPC's size options are C ints, and an infinite timeout is no int.
    assert_one_line_error(run_cli(str(tiny_artifact), "--max-message-bytes", str(3 << 30)), "gRPC's limit")
    assert_one_line_error(run_cli(str(tiny_artifact), "--idle-timeout-s", "inf"), "idle_timeout_s", "inf")
    assert_one_line_error(run_cli(str(tiny_artifact), "--max-queue-delay-ms", "nan"), "max_queue_delay_ms")  # served
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


def edited_copy(artifact: Path, directory: Path, change) -> Path:
    """A copy of `artifact` whose manifest.json `change` edited."""
    copy = directory / "artifact"
    shutil.copytree(artifact, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # issue 20: max_length 0 spun at 93% CPU and ignored SIGTERM; -1 and inputs ["foo"] exited 1 with a
        # traceback; default_prompt naming no prompt served, then refused every request; a pad id outside the
        # vocabulary and a max length beyond the graph's positions gave INTERNAL per request.
        (lambda d: d["tokenizer"].update(max_length=0), "tokenizer.max_length must be at least 1, not 0"),
        (lambda d: d["tokenizer"].update(max_length=-1), "tokenizer.max_length must be at least 1, not -1"),
        (lambda d: d["tokenizer"].update(inputs=["foo"]), "tokenizer.inputs names 'foo'"),
        (lambda d: d.update(default_prompt="nope"), "default_prompt 'nope' names no prompt"),
        (lambda d: d["tokenizer"].update(pad_token_id=10**6), "tokenizer.pad_token_id 1000000 is outside"),
        (lambda d: d["tokenizer"].update(max_length=100000), "tokenizer.max_length (100000) is more than"),
    ],
)
def test_a_manifest_that_makes_no_sense_stops_mrl_serve_at_start_in_one_line(tiny_artifact, tmp_path, change, words):
    artifact = edited_copy(tiny_artifact, tmp_path, change)
    assert_one_line_error(run_cli(str(artifact), "--port", "0"), words)


def test_sigterm_ends_the_server_while_its_warm_up_is_stuck(tiny_artifact):
    """A warm-up that never ends (a hung GPU, a graph that loops) must not make SIGTERM wait for it."""
    model = ServedModel.load(ModelSpec(artifact_dir=tiny_artifact), BatcherConfig())
    entered, release = threading.Event(), threading.Event()
    model.embedder.warmup = lambda: (entered.set(), release.wait())
    backstop = threading.Timer(120, release.set)  # frees the thread whatever the server does
    backstop.start()

    async def scenario() -> bool:
        task = asyncio.ensure_future(serve([model], ServerConfig(port=0), ServerMetrics()))
        assert await asyncio.to_thread(entered.wait, 60)
        os.kill(os.getpid(), signal.SIGTERM)
        await task
        return release.is_set()

    try:
        released_first = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
    finally:
        release.set()
        backstop.cancel()
    assert not released_first, "the server waited for the stuck warm-up before it stopped"


STUCK = """
import sys, threading
from mrl.runtime import Embedder
from mrl.serving import cli
Embedder.warmup = lambda self: threading.Event().wait()  # a warm-up that never ends
sys.exit(cli.main(sys.argv[1:]))
"""


def test_mrl_serve_exits_on_sigterm_while_its_warm_up_is_stuck(tiny_artifact):
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(tiny_artifact), "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += proc.stderr.readlines()
    assert code == 0, "".join(lines)
    assert any("warm-up" in line and "not waiting" in line for line in lines), "".join(lines)


def encrypted_key(directory: Path) -> tuple[Path, Path]:
    """A certificate and its passphrase-protected key (PEM), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-passout", "pass:secret", "-days", "1", "-subj",
         "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_an_encrypted_tls_key_is_refused_in_one_line_naming_it(tiny_artifact, tmp_path):
    cert, key = encrypted_key(tmp_path)
    result = run_cli(str(tiny_artifact), "--tls-cert", str(cert), "--tls-key", str(key))
    assert_one_line_error(result, str(key), "encrypted", "openssl pkey")  # was "[Errno 22] Invalid argument"


def test_an_encrypted_tls_key_never_makes_mrl_serve_prompt_on_a_terminal(tiny_artifact, tmp_path):
    """On a terminal, OpenSSL asked "Enter PEM pass phrase:" and waited: a server must never prompt."""
    cert, key = encrypted_key(tmp_path)
    leader, follower = pty.openpty()

    def own_terminal() -> None:  # the child's controlling terminal, as under an interactive shell
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*SERVE, str(tiny_artifact), "--tls-cert", str(cert), "--tls-key", str(key)],
        stdin=follower, stdout=follower, stderr=follower, preexec_fn=own_terminal,
    )  # fmt: skip
    os.close(follower)
    seen = b""
    try:
        while proc.poll() is None or select.select([leader], [], [], 0)[0]:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break  # waiting for something: a prompt
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "pass phrase" not in text, text
    assert proc.returncode == 2 and "encrypted" in text, text
