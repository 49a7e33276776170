"""`mrl-serve` in a child process, for the measurement scripts beside this file (imported as `serve_process`)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading


def start_server(artifact: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    """`mrl-serve` on a free port; returns the process and its port once it serves."""
    command = [sys.executable, "-m", "mrl.serving.cli", artifact, "--port", "0", *extra]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    found: dict[str, int] = {}
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            if m := re.search(r"listening on [^:]+:(\d+)", line):
                found["port"] = int(m.group(1))
            if " serving " in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None or "port" not in found:
        proc.kill()
        raise SystemExit("mrl-serve did not start")
    return proc, found["port"]
