"""Open connections (issue 20): many idle connections must not lock new callers out, fill the log, or run the
process out of file descriptors; past a cap per door a new connection gets a clear refusal."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import socket
import subprocess
import threading
import time
from contextlib import ExitStack

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import SERVE

IDLE = 1100


def start(*args: str, soft_files: int | None = None) -> tuple[subprocess.Popen, list[str], int, int]:
    """mrl-serve with both doors on free ports (optionally a soft open-files limit): the process, its log lines
    so far and later (a list filled by a reader thread), the gRPC and the HTTP port."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft_files, hard))) if soft_files else None
    proc = subprocess.Popen(
        [*SERVE, *args, "--port", "0", "--http-port", "0"], stderr=subprocess.PIPE, text=True, preexec_fn=limit
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " serving " in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(120) and proc.poll() is None, "".join(lines)
    text = "".join(lines)
    grpc_port = int(re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", text).group(1))
    http_port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", text).group(1))
    return proc, lines, grpc_port, http_port


def http_health(port: int, timeout: float = 10) -> tuple[int, dict]:
    """GET /health on a new connection: (status, parsed body); (0, {error}) when the connection fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except OSError as e:
        return 0, {"error": repr(e)}
    if not reply:
        return 0, {"error": "closed without a reply"}
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def grpc_health(port: int, timeout: float = 10) -> str:
    """Health Check over a connection of its own: the status name, or the error code's."""

    async def check() -> str:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a new connection, not one shared in this process
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError as e:
                return e.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    return asyncio.run(check())


def idle_connections(stack: ExitStack, port: int, n: int) -> list[socket.socket]:
    """`n` connections to `port` that send nothing."""
    return [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30)) for _ in range(n)]


def test_many_idle_connections_lock_no_one_out_under_a_soft_limit_of_1024(tiny_artifact):
    """With a soft limit of 1,024, 1,100 idle connections to each door locked new callers out of both and wrote
    ~25,000 log lines in 6 s: the server raises its soft limit to the hard one at start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * IDLE:
        pytest.skip(f"the hard open-files limit ({hard}) leaves no room above 1,024 to raise the soft one to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test's own 2,200 sockets
    proc, lines, grpc_port, http_port = start(str(tiny_artifact), soft_files=1024)
    try:
        with ExitStack() as stack:
            idle_connections(stack, http_port, IDLE)
            idle_connections(stack, grpc_port, IDLE)
            before = len(lines)
            time.sleep(3)
            http, grpc_status = http_health(http_port), grpc_health(grpc_port)
            time.sleep(3)
            written = lines[before:]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert http == (200, http[1]) and grpc_status == "SERVING", (http, grpc_status, "".join(written[-20:]))
    assert len(written) < 20, "".join(written[:20])
    assert any(f"open files: soft limit raised from 1024 to {hard}" in line for line in lines), "".join(lines[:20])


def test_past_the_cap_a_new_connection_gets_a_clear_refusal_and_one_log_line(tiny_artifact):
    proc, lines, grpc_port, http_port = start(str(tiny_artifact), "--max-connections", "20")
    try:
        with ExitStack() as stack:
            held_http = idle_connections(stack, http_port, 20)
            held_grpc = idle_connections(stack, grpc_port, 20)
            time.sleep(1)
            before = len(lines)
            refused = [http_health(http_port) for _ in range(50)]
            grpc_refused = grpc_health(grpc_port, timeout=5)
            time.sleep(1)
            written = lines[before:]
            for s in held_http[:5] + held_grpc[:5]:
                s.close()
            time.sleep(1)
            http_after, grpc_after = http_health(http_port), grpc_health(grpc_port)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    _, body = refused[0]
    assert {r[0] for r in refused} == {503}, refused[:3]
    assert "--max-connections" in body["error"]["message"] and body["error"]["code"] == "unavailable", body
    assert grpc_refused == "UNAVAILABLE"
    assert len(written) <= 10, "".join(written)  # 50 refusals: a few lines, then a count
    assert http_after[0] == 200 and grpc_after == "SERVING", (http_after, grpc_after)
