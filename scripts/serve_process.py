"""`mrl-serve` in a child process, for the measurement scripts beside this file (imported as `serve_process`)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable

PORT_LINES = {"grpc": r"gRPC listening on [^:]+:(\d+)", "http": r"HTTP on https?://[^:]+:(\d+)"}


def start_doors(
    artifact: str, extra: list[str], lines: list[str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> tuple[subprocess.Popen, dict[str, int]]:
    """`mrl-serve` on free ports (add `--http-port 0` to `extra` for HTTP); returns the process and the port of
    each door ("grpc", "http") once it serves. `lines`, when given, receives every line it logs, then and later."""
    command = [sys.executable, "-m", "mrl.serving.cli", artifact, "--port", "0", *extra]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    found: dict[str, int] = {}
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            if lines is not None:
                lines.append(line)
            for door, pattern in PORT_LINES.items():
                if m := re.search(pattern, line):
                    found[door] = int(m.group(1))
            if " serving " in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None or "grpc" not in found:
        proc.kill()
        raise SystemExit("mrl-serve did not start")
    return proc, found
