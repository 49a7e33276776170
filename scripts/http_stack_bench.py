"""Which HTTP stack and JSON/base64 path for the OpenAI-compatible front end: measured, not guessed.

Usage: python scripts/http_stack_bench.py [--requests 3000] [--rounds 2] [--out bench/results/http-stack.json]

Part 1 (in process): encoding one response of embeddings (json vs orjson, tolist vs numpy; base64 vs pybase64)
and parsing one request body (json vs orjson).
Part 2 (closed loop over 127.0.0.1): the same OpenAI-shaped /v1/embeddings handler (orjson, a fixed
float32 array, no model) served by aiohttp, by uvicorn+Starlette and by uvicorn with a bare ASGI app,
each in its own process, driven by one light keep-alive HTTP/1.1 client at concurrency 1 and 64,
stacks alternating in ABBA rounds. What differs between rows is only the server stack's own cost.
Needs the candidates installed: pip install aiohttp uvicorn httptools starlette orjson pybase64.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import timeit

import numpy as np

DIMS = 384
BODY = json.dumps({"input": ["how do I reset my password on this site?"], "model": "minilm"}).encode()
BODY32 = json.dumps({"input": ["how do I reset my password on this site?"] * 32, "model": "minilm"}).encode()


def _vectors(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, DIMS)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def micro() -> dict[str, float]:
    """Microseconds per call of each way to write a response / read a request."""
    import orjson
    import pybase64

    out: dict[str, float] = {}
    for n in (1, 32):
        v = _vectors(n)

        def data(rows):
            return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in rows]}

        cases = {
            f"float json.dumps(tolist) n={n}": lambda v=v: json.dumps(data(enumerate(v.tolist()))).encode(),
            f"float orjson(tolist) n={n}": lambda v=v: orjson.dumps(data(enumerate(v.tolist()))),
            f"float orjson(numpy rows) n={n}": lambda v=v: orjson.dumps(
                data(enumerate(v)), option=orjson.OPT_SERIALIZE_NUMPY
            ),
            f"base64 stdlib + orjson n={n}": lambda v=v: orjson.dumps(
                data((i, base64.b64encode(r.tobytes()).decode()) for i, r in enumerate(v))
            ),
            f"base64 pybase64 + orjson n={n}": lambda v=v: orjson.dumps(
                data((i, pybase64.b64encode(r.tobytes()).decode()) for i, r in enumerate(v))
            ),
        }
        for name, fn in cases.items():
            number = 2000 if n == 1 else 200
            out[name] = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
    for name, fn in {
        "parse json.loads n=32": lambda: json.loads(BODY32),
        "parse orjson.loads n=32": lambda: orjson.loads(BODY32),
    }.items():
        out[name] = min(timeit.repeat(fn, number=5000, repeat=5)) / 5000 * 1e6
    return out


# ---- servers (each runs in a child process: python this_file serve STACK PORT) ----


def _respond(body: bytes) -> bytes:
    import orjson

    request = orjson.loads(body)
    v = _VECTORS[: len(request["input"])]
    data = [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(v)]
    reply = {"object": "list", "data": data, "model": "minilm", "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    return orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)


_VECTORS = _vectors(32)


def serve(stack: str, port: int) -> None:
    """Run one stack's server until killed."""
    if stack == "aiohttp":
        from aiohttp import web

        async def embeddings(request: web.Request) -> web.Response:
            return web.Response(body=_respond(await request.read()), content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/embeddings", embeddings)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
        return
    import uvicorn

    if stack == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def route(request: Request) -> Response:
            return Response(_respond(await request.body()), media_type="application/json")

        app = Starlette(routes=[Route("/v1/embeddings", route, methods=["POST"])])
    else:

        async def app(scope, receive, send):  # a bare ASGI app: uvicorn's own cost only
            if scope["type"] != "http":
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            payload = _respond(body)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http="httptools")


# ---- client ----


async def _connection(port: int, body: bytes, until: list[int], latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        while until[0] > 0:
            until[0] -= 1
            start = time.perf_counter()
            writer.write(head + body)
            headers = await reader.readuntil(b"\r\n\r\n")
            lines = headers.split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length"))
            payload = await reader.readexactly(length)
            if not headers.startswith(b"HTTP/1.1 200") or not payload.startswith(b"{"):
                raise RuntimeError(f"bad response {headers[:40]!r}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def load(port: int, concurrency: int, requests: int, body: bytes) -> dict[str, float]:
    """Closed loop: `concurrency` connections, `requests` requests in all."""
    latencies: list[float] = []
    budget = [requests]
    start = time.perf_counter()
    await asyncio.gather(*(_connection(port, body, budget, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


def stacks_run(stacks: list[str], requests: int, rounds: int) -> list[dict[str, object]]:
    """Every stack x concurrency x body, in ABBA order over rounds; rows of the median over rounds."""
    results: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    for r in range(rounds):
        order = stacks if r % 2 == 0 else list(reversed(stacks))
        for stack in order:
            port = _free_port()
            proc = subprocess.Popen([sys.executable, __file__, "serve", stack, str(port)])
            try:
                _wait_listening(port)
                for n, body in ((1, BODY), (32, BODY32)):
                    for c in (1, 64):
                        asyncio.run(load(port, c, max(200, requests // 10), body))  # warm-up
                        got = asyncio.run(load(port, c, requests if n == 1 else requests // 4, body))
                        results.setdefault((stack, c, n), []).append(got)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    rows = []
    for (stack, c, n), runs in results.items():
        rows.append(
            {
                "stack": stack,
                "concurrency": c,
                "texts_per_request": n,
                "rps": statistics.median(x["rps"] for x in runs),
                "p50_ms": statistics.median(x["p50_ms"] for x in runs),
                "runs": runs,
            }
        )
    return rows


def main() -> None:
    """Run both parts, print tables, write JSON."""
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/results/http-stack.json")
    args = p.parse_args()
    import aiohttp
    import orjson
    import starlette
    import uvicorn

    env = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        "uvicorn": uvicorn.__version__,
        "starlette": starlette.__version__,
        "orjson": orjson.__version__,
        "numpy": np.__version__,
    }
    m = micro()
    print("| encode/parse | µs per call |\n|---|---|")
    for name, us in m.items():
        print(f"| {name} | {us:.1f} |")
    rows = stacks_run(["aiohttp", "starlette", "asgi"], args.requests, args.rounds)
    print("\n| stack | texts/request | concurrency | requests/s | p50 ms |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["texts_per_request"], r["concurrency"], r["stack"])):
        print(f"| {r['stack']} | {r['texts_per_request']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "micro_us": m, "stacks": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
