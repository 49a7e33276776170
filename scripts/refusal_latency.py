"""How fast `mrl-serve` refuses under full overload: the latency of each refusal, per door, in one storm.

Starts `mrl-serve` on an artifact with a small queue, overloads it with many closed-loop clients sending
several texts each (so the queue stays full and most of their requests are refused; with --backoff-ms a
refused client waits before sending again, as retry policies do), and meanwhile sends requests that must be
refused: dims 0 (INVALID_ARGUMENT / 400). With --http, half the clients and a second probe use the
OpenAI-compatible HTTP door at the same time, so both doors' refusals are measured in the same storm. Prints
the latency percentiles of each outcome as the client sees it. With --clients-process each door's clients run
in a process of their own (so one door's client library does not delay the other's measurements). With
--grpc-channels N the gRPC clients are spread over N channels of their own connection each (to tell whether one
channel, or one client process, limits the gRPC side).

    python scripts/refusal_latency.py artifacts/minilm
    python scripts/refusal_latency.py artifacts/minilm --clients 128 --queue-tokens 2000 --http
    python scripts/refusal_latency.py artifacts/minilm --clients 128 --seconds 20 --backoff-ms 100
    python scripts/refusal_latency.py artifacts/minilm --clients 128 --queue-tokens 2000 --http --grpc-channels 8
    python scripts/refusal_latency.py artifacts/minilm -- --worker-niceness 0   # flags after -- go to mrl-serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time

import aiohttp
import grpc
from serve_process import start_doors

from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.serving.client import AsyncEmbedClient, build_request

TEXT = "the quick brown fox jumps over a lazy dog while wizards judge every boxing match in the dark"
WORDS = TEXT.split()


def percentiles(seconds: list[float]) -> str:
    """p50/p90/p99/max in ms, and the count."""
    if not seconds:
        return "none"
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    median = statistics.median(ms)
    return f"p50 {median:.2f} ms, p90 {pick(0.9):.2f}, p99 {pick(0.99):.2f}, max {ms[-1]:.1f} (n={len(ms)})"


def texts(rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(8)]


async def grpc_door(
    port: int, clients: int, stop: float, backoff: float, seen: dict[str, list[float]], channels: int = 0
) -> None:
    """`clients` closed-loop gRPC clients and a dims-0 probe until `stop`; all on one AsyncEmbedClient, or
    spread over `channels` channels, each with a connection of its own (gRPC shares one among like channels)."""
    rng = random.Random(0)
    own = [("grpc.use_local_subchannel_pool", 1)]
    spread = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) for _ in range(channels)]
    stubs = [pb_grpc.EmbedderStub(c) for c in spread]
    async with AsyncEmbedClient(f"127.0.0.1:{port}") as client:

        async def load(i: int) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    if stubs:
                        await stubs[i % len(stubs)].Embed(build_request(texts(rng)), timeout=60)
                    else:
                        await client.embed(texts(rng), timeout=60)
                    seen.setdefault("grpc OK", []).append(time.perf_counter() - start)
                except grpc.RpcError as e:
                    seen.setdefault(f"grpc {e.code().name}", []).append(time.perf_counter() - start)
                    await asyncio.sleep(backoff)  # as a retry policy would, before sending again

        async def probe() -> None:
            await asyncio.sleep(1.0)  # let the queue fill first
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    await client.embed(["refused: dims 0"], dims=0, timeout=60)
                except grpc.RpcError as e:
                    seen.setdefault(f"grpc {e.code().name} (dims 0 probe)", []).append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(load(i) for i in range(clients)), probe())
    for channel in spread:
        await channel.close()


async def http_door(
    port: int, clients: int, stop: float, backoff: float, seen: dict[str, list[float]], channels: int = 0
) -> None:
    """`clients` closed-loop HTTP clients (one connection each) and a dims-0 probe until `stop`; `channels` is
    gRPC's."""
    rng = random.Random(1)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def post(body: dict) -> int:
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
                await r.read()
                return r.status

        async def load() -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                status = await post({"input": texts(rng)})
                seen.setdefault(f"http {status}", []).append(time.perf_counter() - start)
                if status != 200:
                    await asyncio.sleep(backoff)

        async def probe() -> None:
            await asyncio.sleep(1.0)
            while time.perf_counter() < stop:
                start = time.perf_counter()
                status = await post({"input": ["refused: dims 0"], "dimensions": 0})
                seen.setdefault(f"http {status} (dims 0 probe)", []).append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(load() for _ in range(clients)), probe())


DOORS = {"grpc": grpc_door, "http": http_door}


def door_process(door: str, port: int, clients: int, seconds: float, backoff: float, channels: int, conn) -> None:
    """One door's storm in a process of its own; sends its latencies back."""
    seen: dict[str, list[float]] = {}
    asyncio.run(DOORS[door](port, clients, time.perf_counter() + seconds, backoff, seen, channels))
    conn.send(seen)


def storm(
    ports: dict[str, int], clients: int, seconds: float, backoff: float, own_process: bool, channels: int
) -> dict:
    """Every door in `ports` stormed at once, `clients` shared among them; latencies by outcome."""
    per_door = clients // len(ports)
    if own_process:
        spawn = multiprocessing.get_context("spawn")
        pipes, procs = [], []
        for door, port in ports.items():
            ours, theirs = spawn.Pipe()
            proc = spawn.Process(target=door_process, args=(door, port, per_door, seconds, backoff, channels, theirs))
            proc.start()
            pipes.append(ours)
            procs.append(proc)
        seen: dict[str, list[float]] = {}
        for pipe, proc in zip(pipes, procs, strict=True):
            seen.update(pipe.recv())
            proc.join()
        return seen

    async def together() -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {}
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(DOORS[d](p, per_door, stop, backoff, seen, channels) for d, p in ports.items()))
        return seen

    return asyncio.run(together())


def main() -> int:
    """Run the overload and print refusal latencies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", help="an artifact directory (mrl-export)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients of 8 texts each (default 64)")
    p.add_argument("--seconds", type=float, default=15.0, help="how long to overload (default 15)")
    p.add_argument("--queue-tokens", type=int, default=4096, help="the server's --max-queue-tokens (default 4096)")
    p.add_argument("--backoff-ms", type=float, default=0.0, help="clients wait this long after a refusal (default 0)")
    p.add_argument("--http", action="store_true", help="storm the HTTP door too: half the clients on each")
    p.add_argument("--clients-process", action="store_true", help="each door's clients in a process of their own")
    p.add_argument("--grpc-channels", type=int, default=0, help="spread gRPC clients over this many connections")
    p.add_argument("--json", help="also write the latencies (seconds, by outcome) to this file")
    ours, _, serve_args = " ".join(sys.argv[1:]).partition(" -- ")  # what follows -- goes to mrl-serve
    args = p.parse_args(ours.split())
    queue = ["--max-queue-tokens", str(args.queue_tokens), "--max-batch-tokens", str(min(4096, args.queue_tokens))]
    proc, ports = start_doors(args.artifact, [*serve_args.split(), *queue, "--no-verify", "--http-port", "0"])
    if not args.http:
        del ports["http"]
    try:
        seen = storm(
            ports, args.clients, args.seconds, args.backoff_ms / 1000, args.clients_process, args.grpc_channels
        )
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    for outcome in sorted(seen):
        print(f"{outcome:<40} {percentiles(seen[outcome])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(seen, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
