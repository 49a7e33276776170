"""Two attacks on `mrl-serve`'s doors, measured from outside (issue 20): compressed bodies and idle connections.

`gzip`: sends about 1 MB of gzip that inflates to 1 GiB (Content-Encoding: gzip) to POST /v1/embeddings with
the token, without it, and to a route that takes no POST, while a probe in a process of its own GETs /health
every 10 ms (1 s timeout); prints each answer's status and the probe's latencies and failures.

`idle`: starts the server with a soft open-files limit (default 1,024), opens --connections idle connections
to each door, then checks that a new caller gets health on both doors and counts the log lines the server
wrote meanwhile.

    python scripts/door_attacks.py artifacts/minilm gzip
    python scripts/door_attacks.py artifacts/minilm idle --connections 1100 --soft-limit 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import ExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import start_doors

PROBE = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
seen, failed, stop = [], [], time.monotonic() + seconds
print("probing", flush=True)
while time.monotonic() < stop:
    start = time.perf_counter()
    try:
        urllib.request.urlopen(url, timeout=1).read()
        seen.append(time.perf_counter() - start)
    except Exception as e:
        failed.append(repr(e))
    time.sleep(0.01)
print(json.dumps({"seen": seen, "failed": failed}))
"""


def gzip_bomb(inflated: int = 1 << 30) -> bytes:
    """About 1 MB of gzip that inflates to `inflated` bytes of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(inflated >> 20)) + packer.flush()


def send(port: int, data: bytes) -> str:
    """Send raw bytes; the status line of the answer (or what went wrong)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(data)
            return s.recv(65536).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as e:
        return repr(e)


def gzip_attack(artifact: str) -> None:
    """Bombs to three routes while another process probes /health."""
    bomb = gzip_bomb()
    with tempfile.TemporaryDirectory() as directory:
        token = Path(directory, "token")
        token.write_text("secret\n")
        proc, ports = start_doors(artifact, ["--http-port", "0", "--auth-token-file", str(token), "--no-verify"])
        try:
            port = ports["http"]
            url = f"http://127.0.0.1:{port}/health"
            probe = subprocess.Popen([sys.executable, "-c", PROBE, url, "12"], stdout=subprocess.PIPE, text=True)
            probe.stdout.readline()
            time.sleep(1)
            tail = b"Content-Encoding: gzip\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(bomb)
            auth = b"Authorization: Bearer secret\r\n"
            for name, head in (
                ("POST /v1/embeddings with the token", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + auth),
                ("POST /v1/embeddings without it", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"),
                ("POST /v1/models", b"POST /v1/models HTTP/1.1\r\nHost: x\r\n" + auth),
            ):  # fmt: skip
                start = time.perf_counter()
                status = send(port, head + tail + bomb)
                print(f"{name:<36} {status}  ({(time.perf_counter() - start) * 1000:.0f} ms)")
                time.sleep(2.5)
            probed = json.loads(probe.communicate(timeout=60)[0])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ms = sorted(s * 1000 for s in probed["seen"])
    print(
        f"probe GET /health: p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)}), "
        f"{len(probed['failed'])} failed (1 s timeout)"
    )


def grpc_health(port: int) -> str:
    async def check() -> str:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as e:
                return e.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    return asyncio.run(check())


def http_health(port: int) -> str:
    status = send(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return status or "no answer"


def idle_attack(artifact: str, connections: int, soft_limit: int) -> None:
    """Idle connections to both doors under a soft open-files limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process's own sockets
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, hard))  # noqa: E731
    lines: list[str] = []
    proc, ports = start_doors(artifact, ["--http-port", "0", "--no-verify"], lines, limit)
    try:
        with ExitStack() as stack:
            for door in ("http", "grpc"):
                for _ in range(connections):
                    stack.enter_context(socket.create_connection(("127.0.0.1", ports[door]), timeout=30))
            before = len(lines)
            time.sleep(3)
            http, grpc_status = http_health(ports["http"]), grpc_health(ports["grpc"])
            time.sleep(3)
            written = lines[before:]
    finally:
        proc.kill()
        proc.wait(timeout=60)
    print(f"{connections} idle connections per door, soft limit {soft_limit} (hard {hard}):")
    print(f"  new caller: HTTP /health -> {http}; gRPC Check -> {grpc_status}")
    print(f"  log lines written in 6 s: {len(written)}")
    for line in lines:
        if "soft limit" in line or "max-connections" in line:
            print("  " + line.strip())


def main() -> int:
    """Run one attack and print what it saw."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", help="an artifact directory (mrl-export)")
    p.add_argument("attack", choices=["gzip", "idle"])
    p.add_argument("--connections", type=int, default=1100, help="idle connections per door (default 1100)")
    p.add_argument("--soft-limit", type=int, default=1024, help="the server's soft open-files limit (default 1024)")
    args = p.parse_args()
    if args.attack == "gzip":
        gzip_attack(args.artifact)
    else:
        idle_attack(args.artifact, args.connections, args.soft_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
