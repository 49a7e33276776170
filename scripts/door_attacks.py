"""Attacks on `mrl-serve`'s doors, measured from outside (issue 20): compressed bodies, idle connections and
bodies of millions of tiny values.

`gzip`: sends about 1 MB of gzip that inflates to 1 GiB (Content-Encoding: gzip) to POST /v1/embeddings with
the token, without it, and to a route that takes no POST, while a probe in a process of its own GETs /health
every 10 ms (1 s timeout); prints each answer's status and the probe's latencies and failures.

`idle`: starts the server with a soft open-files limit (default 1,024), opens --connections idle connections
to each door, then checks that a new caller gets health on both doors and counts the log lines the server
wrote meanwhile.

`values`: sends 16 MiB bodies of tiny values (`{}` in `outputs`, `""` and `[]` in `input`, `""` in Cohere's
`texts`; over gRPC: empty OutputSpecs in `outputs`, empty strings in `inputs`) while the probe GETs /health
(both doors share one event loop); prints each answer and the probe's worst latency after it.

`huge`: texts of 1, 4 and 15 MiB, with spaces and without (one "word"), to each door with truncate on, for
--rounds rounds, while the probe GETs /health; prints the worst wait for health after each.

    python scripts/door_attacks.py artifacts/minilm gzip
    python scripts/door_attacks.py artifacts/minilm values --json values.json
    python scripts/door_attacks.py artifacts/minilm idle --connections 1100 --soft-limit 1024 --json idle.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

from mrl.proto import embedder_pb2

PROBE = """
import json, os, sys, time, urllib.request
url, seconds, until = sys.argv[1], float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
seen, failed, stop = [], [], time.monotonic() + seconds
print("probing", flush=True)
while time.monotonic() < stop and not (until and os.path.exists(until)):
    sent, start = time.time(), time.perf_counter()
    try:
        urllib.request.urlopen(url, timeout=1).read()
        seen.append((sent, time.perf_counter() - start))
    except Exception as e:
        failed.append((sent, repr(e)))
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


def gzip_attack(artifact: str) -> dict:
    """Bombs to three routes while another process probes /health; what each got and the probe saw after it."""
    bomb = gzip_bomb()
    with tempfile.TemporaryDirectory() as directory:
        token = Path(directory, "token")
        token.write_text("secret\n")
        proc, ports = start_doors(artifact, ["--http-port", "0", "--auth-token-file", str(token), "--no-verify"])
        try:
            port = ports["http"]
            url = f"http://127.0.0.1:{port}/health"
            probe = subprocess.Popen([sys.executable, "-c", PROBE, url, "20"], stdout=subprocess.PIPE, text=True)
            probe.stdout.readline()
            time.sleep(1)
            sends: list[tuple[str, str, float, float]] = []
            tail = b"Content-Encoding: gzip\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(bomb)
            auth = b"Authorization: Bearer secret\r\n"
            for name, head in (
                ("POST /v1/embeddings with the token", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + auth),
                ("POST /v1/embeddings without it", b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"),
                ("POST /v1/models", b"POST /v1/models HTTP/1.1\r\nHost: x\r\n" + auth),
            ):  # fmt: skip
                start, began = time.perf_counter(), time.time()
                status = send(port, head + tail + bomb)
                sends.append((name, status, (time.perf_counter() - start) * 1000, began))
                time.sleep(2.5)
            probed = json.loads(probe.communicate(timeout=60)[0])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return after_each(sends, probed)


def tiny_values(mib: int = 16) -> list[tuple[str, str, bytes]]:
    """(door, route, body) of `mib` MiB each, holding millions of tiny values."""
    n = (mib << 20) // 3 - 16
    return [
        ("http", "/v1/embeddings", b'{"input": "a", "outputs": [' + b"{}," * n + b"{}]}"),
        ("http", "/v1/embeddings", b'{"input": [' + b'"",' * n + b'""]}'),
        ("http", "/v1/embeddings", b'{"input": [' + b"[]," * n + b"[]]}"),
        ("http", "/v2/embed", b'{"texts": [' + b'"",' * n + b'""]}'),
        ("grpc", "outputs", b"\x0a\x01a" + b"\x4a\x00" * (n * 3 // 2)),  # field 9 (outputs): empty OutputSpecs
        ("grpc", "inputs", b"\x12\x00" * (n * 3 // 2)),  # field 2 (inputs): empty strings
    ]


def grpc_raw(port: int, message: bytes) -> str:
    """Send a serialised EmbedRequest to Embed; the status code's name."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        try:
            channel.unary_unary("/mrl.v1.Embedder/Embed")(message, timeout=120)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()[:80]}"
        return "OK"


def values_attack(artifact: str) -> dict:
    """16 MiB of tiny values to each door while another process probes /health; what each got, the probe after it."""
    proc, ports = start_doors(artifact, ["--http-port", "0", "--no-verify"])
    try:
        with tempfile.TemporaryDirectory() as directory:
            done = Path(directory, "done")
            url = f"http://127.0.0.1:{ports['http']}/health"
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, url, "600", str(done)], stdout=subprocess.PIPE, text=True
            )
            probe.stdout.readline()
            time.sleep(1)
            sends = []
            for door, route, body in tiny_values():
                start, began = time.perf_counter(), time.time()
                if door == "http":
                    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % route.encode()
                    status = send(ports["http"], head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                else:
                    status = grpc_raw(ports["grpc"], body)
                name = f"{door} {route}: {body[-6:-4].decode() if door == 'http' else 'empty'}"
                sends.append((name, status, (time.perf_counter() - start) * 1000, began))
                time.sleep(2)
            done.touch()
            probed = json.loads(probe.communicate(timeout=60)[0])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return after_each(sends, probed)


def worst_wait(probed: dict, since: float, until: float) -> float:
    """The longest a probe sent in [since, until) waited for health, in ms: a run of timed-out probes counts
    from the first one's start to the answer of the next that got one."""
    answered = [(sent, latency) for sent, latency in probed["seen"]]
    events = sorted(answered + [(sent, None) for sent, _ in probed["failed"]], key=lambda event: event[0])
    worst, stalled = 0.0, None
    for sent, latency in events:
        if latency is None:
            stalled = sent if stalled is None else stalled
            continue
        start = sent if stalled is None else stalled
        if since <= start < until:
            worst = max(worst, (sent + latency - start) * 1000)
        stalled = None
    return worst


def huge_attack(artifact: str, rounds: int) -> dict:
    """Huge texts, with and without spaces, to each door while another process probes /health."""
    proc, ports = start_doors(artifact, ["--http-port", "0", "--no-verify"])
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=options)
    embed = channel.unary_unary(
        "/mrl.v1.Embedder/Embed", request_serializer=embedder_pb2.EmbedRequest.SerializeToString
    )  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as directory:
            done = Path(directory, "done")
            url = f"http://127.0.0.1:{ports['http']}/health"
            command = [sys.executable, "-c", PROBE, url, "900", str(done)]
            probe = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            probe.stdout.readline()
            time.sleep(1)
            sends = []
            for r, door, mib, unit in itertools.product(
                range(rounds), ("grpc", "http"), (1, 4, 15), ("ten chars ", "x")
            ):
                text = unit * ((mib << 20) // len(unit))
                start, began = time.perf_counter(), time.time()
                if door == "http":
                    body = json.dumps({"input": [text], "truncate": True}).encode()
                    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    status = send(ports["http"], head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                else:
                    try:
                        embed(embedder_pb2.EmbedRequest(inputs=[text], truncate=True), timeout=120)
                        status = "OK"
                    except grpc.RpcError as e:
                        status = e.code().name
                spaces = "with spaces" if unit != "x" else "no spaces"
                sends.append(
                    (f"round {r + 1} {door} {mib} MiB {spaces}", status, (time.perf_counter() - start) * 1000, began)
                )
                time.sleep(0.5)
            done.touch()
            probed = json.loads(probe.communicate(timeout=60)[0])
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=60)
    return after_each(sends, probed)


def after_each(sends: list[tuple[str, str, float, float]], probed: dict) -> dict:
    """The probe's latencies overall and after each send (until the next), printed and returned."""
    ms = sorted(latency * 1000 for _, latency in probed["seen"])
    quiet = [latency * 1000 for sent, latency in probed["seen"] if sent < sends[0][3]]
    result = {"probe_p50_ms": statistics.median(ms), "probe_max_ms": ms[-1], "probes": len(ms),
              "quiet_max_ms": max(quiet, default=None), "failed": len(probed["failed"]), "sends": []}  # fmt: skip
    for i, (name, status, took, began) in enumerate(sends):
        until = sends[i + 1][3] if i + 1 < len(sends) else float("inf")
        window = [latency * 1000 for sent, latency in probed["seen"] if began <= sent < until]
        failed = sum(began <= sent < until for sent, _ in probed["failed"])
        worst = worst_wait(probed, began, until)
        result["sends"].append({"what": name, "status": status, "answer_ms": took, "failed": failed,
                                "probe_max_ms": max(window, default=None), "probes": len(window),
                                "worst_wait_ms": worst})  # fmt: skip
        print(f"{name:<36} {status}  ({took:.0f} ms); probe after it: max {max(window, default=0):.0f} ms, "
              f"{failed} failed, longest wait for health {worst:.0f} ms")  # fmt: skip
    print(
        f"probe GET /health: p50 {result['probe_p50_ms']:.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)}), "
        f"{len(probed['failed'])} failed (1 s timeout)"
    )
    result["probe"] = probed  # (sent at, seconds) of each answer; (sent at, error) of each timeout
    return result


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


def idle_attack(artifact: str, connections: int, soft_limit: int) -> dict:
    """Idle connections to both doors under a soft open-files limit; what a new caller got, the lines logged."""
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
    noted = [line.strip() for line in lines if "soft limit" in line or "max-connections" in line]
    for line in noted:
        print("  " + line)
    return {"connections": connections, "soft_limit": soft_limit, "hard_limit": hard, "http_health": http,
            "grpc_health": grpc_status, "log_lines_6s": len(written), "noted": noted}  # fmt: skip


def main() -> int:
    """Run one attack and print what it saw."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", help="an artifact directory (mrl-export)")
    p.add_argument("attack", choices=["gzip", "idle", "values", "huge"])
    p.add_argument("--rounds", type=int, default=2, help="rounds of huge texts (default 2)")
    p.add_argument("--connections", type=int, default=1100, help="idle connections per door (default 1100)")
    p.add_argument("--soft-limit", type=int, default=1024, help="the server's soft open-files limit (default 1024)")
    p.add_argument("--json", help="also write what it saw to this file")
    args = p.parse_args()
    if args.attack == "gzip":
        result = gzip_attack(args.artifact)
    elif args.attack == "values":
        result = values_attack(args.artifact)
    elif args.attack == "huge":
        result = huge_attack(args.artifact, args.rounds)
    else:
        result = idle_attack(args.artifact, args.connections, args.soft_limit)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
