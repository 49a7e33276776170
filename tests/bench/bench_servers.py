"""Real `mrl-serve` processes on 127.0.0.1 (gRPC and OpenAI-compatible HTTP on free ports) for the bench tests."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_loopback_port() -> int:
    """A port nothing listens on right now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running `mrl-serve`: its gRPC and HTTP addresses (HOST:PORT) and its log so far."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    grpc: str = ""
    http: str = ""
    ready: threading.Event = field(default_factory=threading.Event)

    def read_log(self) -> None:
        """Collect stderr (so the pipe never fills) and learn the ports and readiness from it."""
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := re.search(r"gRPC listening on (127\.0\.0\.1:\d+)", line):
                self.grpc = m.group(1)
            if m := re.search(r"HTTP on https?://(127\.0\.0\.1:\d+)", line):
                self.http = m.group(1)
            if " serving " in line:
                self.ready.set()
        self.ready.set()  # exited: the waiter sees it


@contextlib.contextmanager
def serve(artifact: Path, *flags: str) -> Iterator[Served]:
    """`mrl-serve ARTIFACT --port 0 --http-port 0 FLAGS` until the block ends; fails the test if not ready in 2 min."""
    pytest.importorskip("mrl.serving.client")
    cmd = [sys.executable, "-m", "mrl.serving.cli", str(artifact), "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--http-port", "0", *flags]
    served = Served(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    threading.Thread(target=served.read_log, daemon=True).start()
    try:
        if not served.ready.wait(timeout=120) or served.proc.poll() is not None:
            pytest.fail(f"mrl-serve did not become ready: {''.join(served.lines)[-2000:]}")
        assert served.grpc and served.http, "".join(served.lines)
        yield served
    finally:
        served.proc.terminate()
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
