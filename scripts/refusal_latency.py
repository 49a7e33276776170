"""How fast `mrl-serve` refuses under full overload: the latency of RESOURCE_EXHAUSTED and INVALID_ARGUMENT.

Starts `mrl-serve` on an artifact with a small queue, overloads it with many clients sending
several texts each (so the queue stays full and most of their requests are refused; with
--backoff-ms a refused client waits before sending again, as retry policies do), and meanwhile
sends requests that must be refused: dims 0 (INVALID_ARGUMENT) and, from the load itself, those
the full queue turns away (RESOURCE_EXHAUSTED). Prints the latency percentiles of each, as the
client sees them.

    python scripts/refusal_latency.py artifacts/minilm
    python scripts/refusal_latency.py artifacts/minilm --clients 128 --seconds 20 --backoff-ms 100
    python scripts/refusal_latency.py artifacts/minilm -- --worker-niceness 0   # flags after -- go to mrl-serve
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

import grpc
from serve_process import start_server

from mrl.serving.client import AsyncEmbedClient

TEXT = "the quick brown fox jumps over a lazy dog while wizards judge every boxing match in the dark"
WORDS = TEXT.split()


def percentiles(seconds: list[float]) -> str:
    """p50/p90/p99 in ms, and the count."""
    if not seconds:
        return "none"
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"p50 {statistics.median(ms):.2f} ms, p90 {pick(0.9):.2f}, p99 {pick(0.99):.2f} (n={len(ms)})"


async def overload(port: int, clients: int, seconds: float, backoff: float) -> dict[str, list[float]]:
    """Load and probes for `seconds`; latencies by outcome."""
    seen: dict[str, list[float]] = {"ok": [], "RESOURCE_EXHAUSTED": [], "INVALID_ARGUMENT (probe)": []}
    stop = time.perf_counter() + seconds
    rng = random.Random(0)
    async with AsyncEmbedClient(f"127.0.0.1:{port}") as client:

        async def load() -> None:
            while time.perf_counter() < stop:
                texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(8)]
                start = time.perf_counter()
                try:
                    await client.embed(texts, timeout=60)
                    seen["ok"].append(time.perf_counter() - start)
                except grpc.RpcError as e:
                    seen.setdefault(e.code().name, []).append(time.perf_counter() - start)
                    await asyncio.sleep(backoff)  # as a retry policy would, before sending again

        async def probe() -> None:
            await asyncio.sleep(1.0)  # let the queue fill first
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    await client.embed(["refused: dims 0"], dims=0, timeout=60)
                except grpc.RpcError:
                    seen["INVALID_ARGUMENT (probe)"].append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(load() for _ in range(clients)), probe())
    return seen


def main() -> int:
    """Run the overload and print refusal latencies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("artifact", help="an artifact directory (mrl-export)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients of 8 texts each (default 64)")
    p.add_argument("--seconds", type=float, default=15.0, help="how long to overload (default 15)")
    p.add_argument("--queue-tokens", type=int, default=4096, help="the server's --max-queue-tokens (default 4096)")
    p.add_argument("--backoff-ms", type=float, default=0.0, help="clients wait this long after a refusal (default 0)")
    ours, _, serve_args = " ".join(sys.argv[1:]).partition(" -- ")  # what follows -- goes to mrl-serve
    args = p.parse_args(ours.split())
    args.serve_args = serve_args.split()
    queue = ["--max-queue-tokens", str(args.queue_tokens), "--max-batch-tokens", str(min(4096, args.queue_tokens))]
    extra = [*args.serve_args, *queue]
    proc, port = start_server(args.artifact, [*extra, "--no-verify"])
    try:
        seen = asyncio.run(overload(port, args.clients, args.seconds, args.backoff_ms / 1000))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    for outcome, seconds in seen.items():
        print(f"{outcome:<26} {percentiles(seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
