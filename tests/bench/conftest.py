"""A real `mrl-serve` on 127.0.0.1 for the load-generator tests."""

import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_artifact):
    """`mrl-serve` on the tiny artifact, on a free loopback port; stopped after the session."""
    pytest.importorskip("mrl.serving.client")
    from mrl.serving.client import EmbedClient

    port = _free_port()
    cmd = [sys.executable, "-m", "mrl.serving.cli", str(tiny_artifact), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        with EmbedClient(target, timeout=2) as client:
            for _ in range(120):  # bounded: at most about a minute
                if proc.poll() is not None:
                    pytest.fail(f"mrl-serve exited: {proc.stderr.read()[-2000:]}")
                try:
                    if all(m.ready for m in client.list_models()):
                        break
                except Exception:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("mrl-serve did not become ready within a minute")
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on right now, on the loopback interface."""
    return _free_port()
