"""What each front end of mrl-serve costs per request in CPU, client and server apart: gRPC, HTTP with base64, HTTP
with JSON floats, through the same `mrl-bench serve` targets, on one server.

Usage: python scripts/transport_cpu.py ARTIFACT --texts FILE [--words 8] [--requests 3000] [--concurrency 1,64]
                                       [--out bench/results/transport-cpu.json]

Starts `mrl-serve ARTIFACT --port 0 --http-port 0`, then per concurrency level runs each transport for
`--requests` requests in ABBA order, and records requests/s, this process's CPU per request (the client) and the
server process's CPU per request (from /proc, 10 ms ticks: use a few thousand requests). With a tiny model the
model's share is small and what differs between rows is the front ends' own cost. Texts are cut to `--words`
words so they fit a tiny model's length limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mrl.bench.load import ServeConfig, run_level
from mrl.bench.targets import TargetSpec, open_target
from mrl.bench.texts import read_lines


def _server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(artifact: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "mrl.serving.cli", str(artifact), "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    grpc = http = ""
    for line in proc.stderr:
        grpc = m.group(1) if (m := re.search(r"gRPC listening on (\S+:\d+)", line)) else grpc
        http = m.group(1) if (m := re.search(r"HTTP on https?://(\S+:\d+)", line)) else http
        if " serving " in line:
            break
    if not (grpc and http) or proc.poll() is not None:
        sys.exit("mrl-serve did not start: see its log above")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log: a full pipe blocks it
    urllib.request.urlopen(f"http://{http}/health", timeout=10)
    return proc, grpc, http


async def _measure(specs: dict[str, TargetSpec], texts: tuple[str, ...], pid: int, args) -> list[dict]:
    targets = {name: open_target(spec) for name, spec in specs.items()}
    rows = []
    try:
        for target in targets.values():
            await target.connect()
        for concurrency in args.concurrency:
            for name in [*targets, *reversed(targets)]:
                config = ServeConfig(
                    targets=(specs[name],), texts=texts, requests=args.requests, warmup_requests=2 * concurrency
                )
                server, client, wall = _server_cpu_s(pid), time.process_time(), time.perf_counter()
                outcomes = await run_level(targets[name], config, concurrency, None)
                wall = time.perf_counter() - wall
                server, client = _server_cpu_s(pid) - server, time.process_time() - client
                n = len(outcomes)
                failed = sorted({o.code for o in outcomes} - {"OK"})
                row = {
                    "transport": name,
                    "concurrency": concurrency,
                    "requests": n,
                    "failed": failed,
                    "requests_per_s": n / wall,
                    "client_cpu_us": 1e6 * client / n,
                    "server_cpu_us": 1e6 * server / n,
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    finally:
        for target in targets.values():
            await target.close()
    return rows


def main() -> None:
    """Run the comparison and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--texts", type=Path, required=True)
    parser.add_argument("--words", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 64))
    parser.add_argument("--out", type=Path, default=Path("bench/results/transport-cpu.json"))
    args = parser.parse_args()
    texts = tuple(" ".join(t.split()[: args.words]) for t in read_lines(args.texts))
    proc, grpc, http = _start(args.artifact)
    try:
        specs = {
            "grpc": TargetSpec(kind="mrl", address=grpc),
            "http-base64": TargetSpec(kind="http", address=http),
            "http-float": TargetSpec(kind="http", address=http, encoding_format="float"),
        }
        rows = asyncio.run(_measure(specs, texts, proc.pid, args))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": settings, "cpu": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    tmp.rename(args.out)


if __name__ == "__main__":
    main()
