"""Helpers for the Triton tests: the Triton environment (.venv-triton), a real tritonserver, a tritonclient process.

Triton and tritonclient cannot share the project's environment (numpy<2, protobuf<7), so the tests
drive them from outside: the server as a subprocess, clients as a subprocess of .venv-triton's
Python that reads calls as JSON on stdin (`triton_client.py`), health over plain HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MRL_TRITON_VENV", ROOT / ".venv-triton"))
PYTHON = VENV / "bin" / "python"
SERVER = VENV / "bin" / "mrl-tritonserver"
CLIENT = Path(__file__).with_name("triton_client.py")


def require_triton() -> None:
    """Skip where scripts/setup_triton.sh has not run; fail instead where the run says Triton must be there (CI)."""
    if SERVER.is_file() and PYTHON.is_file():
        return
    message = f"no Triton environment at {VENV}: run `bash scripts/setup_triton.sh`"
    if os.environ.get("MRL_REQUIRE_TRITON") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Triton:
    """A running tritonserver's addresses and log file."""

    http: str
    grpc: str
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:]


def _ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _command(repository: Path, http: int, grpc: int, *args: str) -> list[str]:
    """The tritonserver command line serving `repository` on loopback ports."""
    return [
        str(SERVER),
        f"--model-repository={repository}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={free_port()}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        *args,
    ]


NOBODY = 65534
"""The unprivileged uid and gid Triton images and Kubernetes pods often run as."""


def _private_ancestor(path: Path) -> Path | None:
    """The first directory on the way to `path` that other users cannot search (None: all can)."""
    for directory in (*reversed(path.parents), path):
        if directory.exists() and not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def as_nobody() -> list[str]:
    """A command prefix that runs tritonserver as uid/gid 65534 with no groups; skips where this process cannot
    switch, or where that user could not reach the Triton environment or the Python it was made from."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    config = dict(line.split(" = ", 1) for line in (VENV / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    for path in (VENV, Path(config.get("home", "/"))):
        private = _private_ancestor(path.resolve())
        if private is not None:
            pytest.skip(
                f"{private} is private, so uid {NOBODY} cannot run the Triton environment: make one from a Python "
                "other users can read (MRL_TRITON_VENV=DIR PATH=/usr/bin:$PATH bash scripts/setup_triton.sh)"
            )
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@contextlib.contextmanager
def tritonserver(
    repository: Path, log: Path, *args: str, wait: bool = True, prefix: Sequence[str] = ()
) -> Iterator[Triton]:
    """tritonserver on loopback ports serving `repository` (`prefix`: e.g. `as_nobody()`); stopped (SIGTERM,
    then SIGKILL) on exit."""
    http, grpc = free_port(), free_port()
    cmd = [*prefix, *_command(repository, http, grpc, "--exit-timeout-secs=5", *args)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = Triton(http=f"127.0.0.1:{http}", grpc=f"127.0.0.1:{grpc}", log=log)
    try:
        deadline = time.monotonic() + 120
        while wait and not _ready(server.http):
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver was not ready within 120 s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_exit(repository: Path, log: Path, *args: str, timeout: float = 120) -> tuple[int, str]:
    """Run tritonserver until it exits by itself (it does when a model fails under strict settings)."""
    cmd = _command(repository, free_port(), free_port(), *args)
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return done.returncode, log.read_text(errors="replace")


def call(calls: Sequence[dict], timeout: float = 300) -> list[dict]:
    """Run tritonclient calls in .venv-triton (see triton_client.py for the call format); one result per call."""
    done = subprocess.run(
        [str(PYTHON), str(CLIENT)],
        input=json.dumps(list(calls)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def in_triton_env(code: str, *args: str, timeout: float = 120) -> str:
    """Run Python code in .venv-triton and return its stdout."""
    done = subprocess.run([str(PYTHON), "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
