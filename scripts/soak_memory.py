"""Memory soak of `mrl-serve`: does RSS come back to its steady level after huge requests, and do they stall others?

Starts `mrl-serve` on an artifact, brings it to its steady level with ordinary and max-length batches,
then sends texts of 1, 4 and 15 MiB (and eight 1 MiB texts in one request), goes back to ordinary load,
and compares RSS. Meanwhile a probe calls health Check every 10 ms and embeds one short text every 50 ms,
and its latencies are printed for a quiet stretch before the huge requests and while they run. With --http
each round sends its huge requests over gRPC and then over the OpenAI-compatible HTTP door, and the probe
also gets HTTP /health every 10 ms. Exit code 0 when the RSS after the huge requests is within --slack-mb
of the steady level, 1 when not.

    python scripts/soak_memory.py artifacts/minilm
    python scripts/soak_memory.py artifacts/minilm --rounds 5 --slack-mb 16 -- --batch-workers 1
    python scripts/soak_memory.py artifacts/minilm --rounds 4 --http   # both doors
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import start_doors

from mrl.serving.client import AsyncEmbedClient

TEXT = "the quick brown fox jumps over a lazy dog while wizards judge every boxing match"
WORDS = TEXT.split()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def sentences(n: int, seed: int, low: int, high: int) -> list[str]:
    """`n` reproducible texts of `low`..`high` words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


async def ordinary_load(client: AsyncEmbedClient, seed: int) -> None:
    """300 one-text requests, 32 at a time."""
    texts = sentences(300, seed, 5, 30)
    for start in range(0, len(texts), 32):
        await asyncio.gather(*(client.embed([t], timeout=120) for t in texts[start : start + 32]))


async def max_length_load(client: AsyncEmbedClient) -> None:
    """Twenty requests of eight texts as long as the model reads (cut with truncate): the largest batches."""
    texts = [" ".join(sentences(60, seed=i, low=5, high=30)) for i in range(8)]
    for _ in range(20):
        await client.embed(texts, truncate=True, timeout=120)


async def _probe(ports: dict[str, int], stop: threading.Event, samples: list[tuple[float, str, float]]) -> None:
    """Health Check (and HTTP /health) every 10 ms and one short Embed every 50 ms until `stop`; (sent at, kind,
    ms) samples."""
    target = f"127.0.0.1:{ports['grpc']}"
    async with (
        grpc.aio.insecure_channel(target) as channel,
        AsyncEmbedClient(target) as client,
        aiohttp.ClientSession() as session,
    ):
        stub = health_pb2_grpc.HealthStub(channel)

        async def http_health() -> None:
            async with session.get(f"http://127.0.0.1:{ports['http']}/health", timeout=aiohttp.ClientTimeout(30)) as r:
                await r.read()
                r.raise_for_status()

        async def every(period: float, kind: str, call) -> None:
            while not stop.is_set():
                sent = time.time()
                start = time.perf_counter()
                try:
                    await call()
                except grpc.RpcError as e:  # counted, not fatal: a failed probe is what this looks for
                    kind_seen = f"{kind} failed ({e.code().name})"
                except aiohttp.ClientError as e:
                    kind_seen = f"{kind} failed ({type(e).__name__})"
                else:
                    kind_seen = kind
                samples.append((sent, kind_seen, (time.perf_counter() - start) * 1000))
                await asyncio.sleep(period)

        probes = [
            every(0.01, "health Check", lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=30)),
            every(0.05, "short Embed", lambda: client.embed(["a short text while others are huge"], timeout=30)),
        ]
        if "http" in ports:
            probes.append(every(0.01, "HTTP /health", http_health))
        await asyncio.gather(*probes)


def probe_process(ports: dict[str, int], conn) -> None:
    """The probe in a process of its own (the huge requests' client would stall it here); sends its samples."""
    stop = threading.Event()
    threading.Thread(target=lambda: (conn.recv(), stop.set()), daemon=True).start()
    samples: list[tuple[float, str, float]] = []
    asyncio.run(_probe(ports, stop, samples))
    conn.send(samples)


def summary(samples: list[tuple[float, str, float]], start: float, stop: float) -> str:
    """Latency percentiles of each kind of probe call sent within [start, stop)."""
    parts = []
    for kind in ("health Check", "HTTP /health", "short Embed"):
        values = [ms for sent, k, ms in samples if k == kind and start <= sent < stop]
        if values:
            cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
            parts.append(f"{kind} p50 {cuts[49]:.1f} / p99 {cuts[98]:.1f} / max {max(values):.1f} ms (n={len(values)})")
    failed = [k for sent, k, _ in samples if "failed" in k and start <= sent < stop]
    if failed:
        parts.append(f"FAILED: {len(failed)} ({', '.join(sorted(set(failed)))})")
    return "; ".join(parts)


def huge_senders(client: AsyncEmbedClient, session: aiohttp.ClientSession, ports: dict[str, int]):
    """(door, send(texts)) for each door the huge requests go through."""

    async def over_grpc(texts: list[str]) -> None:
        await client.embed(texts, truncate=True, timeout=600)

    async def over_http(texts: list[str]) -> None:
        url = f"http://127.0.0.1:{ports['http']}/v1/embeddings"
        async with session.post(url, json={"input": texts, "truncate": True}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status} for {len(texts)} huge texts")

    return [("gRPC", over_grpc), *([("HTTP", over_http)] if "http" in ports else [])]


async def soak(ports: dict[str, int], pid: int, rounds: int) -> tuple[list[tuple[str, float]], list[tuple[str, str]]]:
    """Steady load, then huge requests, then steady load again; RSS after each phase, probe latencies."""
    seen: list[tuple[str, float]] = []
    async with AsyncEmbedClient(f"127.0.0.1:{ports['grpc']}") as client, aiohttp.ClientSession() as session:
        await ordinary_load(client, 1)
        await max_length_load(client)
        await ordinary_load(client, 2)
        seen.append(("steady: ordinary and max-length batches", rss_mb(pid)))
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        probe = multiprocessing.get_context("spawn").Process(target=probe_process, args=(ports, theirs))
        probe.start()
        await asyncio.sleep(5)  # the probe process starts, then a quiet stretch
        quiet = time.time() - 3
        huge = time.time()
        for r in range(rounds):
            for door, send in huge_senders(client, session, ports):
                for mib in (1, 4, 15):
                    await send(["ten chars " * ((mib << 20) // 10)])
                    seen.append((f"round {r + 1}, {door}: after one {mib} MiB text", rss_mb(pid)))
                await send(["ten chars " * ((1 << 20) // 10)] * 8)
                seen.append((f"round {r + 1}, {door}: after eight 1 MiB texts in one request", rss_mb(pid)))
        done = time.time()
        ours.send("stop")
        samples = ours.recv()
        probe.join(timeout=30)
        stalls = [
            ("quiet (no other requests)", summary(samples, quiet, huge)),
            (f"while the huge requests ran ({done - huge:.1f} s)", summary(samples, huge, done)),
        ]
        await ordinary_load(client, 3)
        time.sleep(1)
        seen.append(("after ordinary load again", rss_mb(pid)))
    return seen, stalls


def main() -> int:
    """Run the soak and print RSS per phase; exit 1 if memory did not come back."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", help="an artifact directory (mrl-export)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of huge requests (default 2)")
    p.add_argument("--slack-mb", type=float, default=32.0, help="allowed RSS above steady (default 32)")
    p.add_argument("--http", action="store_true", help="send the huge requests over HTTP too, and probe /health")
    ours, _, serve_args = " ".join(sys.argv[1:]).partition(" -- ")  # what follows -- goes to mrl-serve
    args = p.parse_args(ours.split())
    args.serve_args = serve_args.split()
    proc, ports = start_doors(args.artifact, [*args.serve_args, *(["--http-port", "0"] if args.http else [])])
    try:
        seen, stalls = asyncio.run(soak(ports, proc.pid, args.rounds))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    for phase, text in stalls:
        print(f"probe, {phase}: {text}")
    steady, final = seen[0][1], seen[-1][1]
    for phase, mb in seen:
        print(f"{phase:<48} {mb:8.1f} MB  ({mb - steady:+.1f})")
    ok = final <= steady + args.slack_mb
    print(f"{'PASS' if ok else 'FAIL'}: {final - steady:+.1f} MB after the huge requests (slack {args.slack_mb} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
