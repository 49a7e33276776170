"""`mrl-bench serve`: a closed-loop load generator for `mrl-serve`, in the manner of perf_analyzer.

Each of C workers sends a request, waits for the answer and sends the next, so C requests are
always in flight. Every level is bounded by a request count and a wall-clock limit; the generator
only ever connects to the one target it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrl.bench import memory
from mrl.bench.stats import ratio, summarize
from mrl.bench.texts import cycle
from mrl.runtime.errors import InvalidInputError

Progress = Callable[[str], None]
MAX_REQUESTS = 1_000_000  # per level: a typo in --requests must not run for days
MAX_DURATION_S = 3600.0


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """One concurrency sweep against one server."""

    target: str
    texts: tuple[str, ...]
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    requests: int | None = 1000  # measured requests per level (None: run for `duration_s`)
    duration_s: float | None = None
    warmup_requests: int | None = None  # per level; None: twice the concurrency
    texts_per_request: int = 1
    dims_mixes: tuple[tuple[int, ...] | None, ...] = (None,)  # None: the server's default dims
    request_timeout_s: float = 60.0
    token: str | None = None
    server_pid: int | None = None  # a local server's pid: its CPU is not counted as other load
    rounds: int = 1  # each (level, mix) this many times, mixes in ABBA order; results pooled

    def __post_init__(self) -> None:
        check_target(self.target)
        if not self.texts:
            raise InvalidInputError("no texts to send")
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 4096:
            raise InvalidInputError("concurrency levels must be within 1..4096")
        if (self.requests is None) == (self.duration_s is None):
            raise InvalidInputError("give either a request count or a duration per level, not both")
        if self.requests is not None and not 2 <= self.requests <= MAX_REQUESTS:
            raise InvalidInputError(f"requests per level must be within 2..{MAX_REQUESTS:,}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise InvalidInputError(f"duration per level must be within 0..{MAX_DURATION_S:.0f} s")
        if not 1 <= self.rounds <= 100:
            raise InvalidInputError("rounds must be within 1..100")
        if self.texts_per_request < 1:
            raise InvalidInputError("texts per request must be at least 1")


def check_target(target: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets), refusing anything else: schemes, paths, lists, bad ports."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or "/" in target or "," in target or " " in target:
        raise InvalidInputError(f"target must be HOST:PORT, such as 127.0.0.1:50051, not {target!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidInputError(f"an IPv6 target needs brackets: [::1]:50051, not {target!r}")
    elif ":" in host:
        raise InvalidInputError(f"an IPv6 target needs brackets: [::1]:50051, not {target!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"target port must be within 1..65535, not {port!r}")
    return host, int(port)


def mix_label(mix: tuple[int, ...] | None) -> str:
    """How a dims mix is named in tables and JSON."""
    return "default" if mix is None else ",".join(map(str, mix))


def dims_for(mix: tuple[int, ...] | None, index: int) -> int | None:
    """The dims of request `index`: round-robin over the mix, so the split is exactly even."""
    return None if mix is None else mix[index % len(mix)]


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One request's result, with when it was sent and answered (perf_counter seconds)."""

    index: int
    sent_at: float
    done_at: float
    code: str  # "OK" or the gRPC status name
    texts: int
    tokens: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0

    @property
    def seconds(self) -> float:
        """Latency as the client saw it."""
        return self.done_at - self.sent_at


async def _one(client, index: int, texts: list[str], dims: int | None, timeout: float) -> Outcome:
    import grpc

    sent = time.perf_counter()
    try:
        response = await client.embed_response(texts, dims=dims, timeout=timeout)
    except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
        code = e.code().name if callable(getattr(e, "code", None)) else "UNKNOWN"
        return Outcome(index=index, sent_at=sent, done_at=time.perf_counter(), code=code, texts=0)
    done = time.perf_counter()
    if len(response.embeddings) != len(texts) or (dims is not None and response.dimensions != dims):
        return Outcome(index=index, sent_at=sent, done_at=done, code="BAD_RESPONSE", texts=0)
    return Outcome(
        index=index,
        sent_at=sent,
        done_at=done,
        code="OK",
        texts=len(texts),
        tokens=response.usage.input_tokens,
        queue_ms=response.timing.queue_ms,
        inference_ms=response.timing.inference_ms,
    )


async def run_level(client, config: ServeConfig, concurrency: int, mix: tuple[int, ...] | None) -> list[Outcome]:
    """Drive one concurrency level once: warm-up requests, then the measured ones; returns every outcome."""
    warmup = warmup_count(config, concurrency)
    last = warmup + (config.requests if config.requests is not None else MAX_REQUESTS)
    limit = (config.duration_s or MAX_DURATION_S) + config.request_timeout_s + 60
    hard_stop = time.perf_counter() + limit  # bounds the level even if the server stalls
    deadline = [hard_stop]
    issued = [0]
    outcomes: list[Outcome] = []
    n = config.texts_per_request

    async def worker() -> None:
        # One event loop runs every worker: reading and bumping `issued` between awaits is atomic.
        while issued[0] < last and time.perf_counter() < deadline[0]:
            index = issued[0]
            issued[0] += 1
            if index == warmup and config.duration_s is not None:
                deadline[0] = min(hard_stop, time.perf_counter() + config.duration_s)
            texts = cycle(config.texts, n, index * n)
            outcomes.append(await _one(client, index, texts, dims_for(mix, index), config.request_timeout_s))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def measurement_window(outcomes: Sequence[Outcome], warmup: int) -> tuple[float, float] | None:
    """From the first measured request's send to the last request's send.

    In a closed loop every send follows a completion, so between these two sends exactly
    `concurrency` requests are always in flight: neither the ramp-up nor the drain at the end,
    when fewer are in flight, is inside the window.
    """
    measured = [o for o in outcomes if o.index >= warmup]
    if len(measured) < 2:
        return None
    start = min(o.sent_at for o in measured)
    end = max(o.sent_at for o in measured)
    return (start, end) if end > start else None


def warmup_count(config: ServeConfig, concurrency: int) -> int:
    """Unmeasured requests at the start of each level: the configured count, else twice the concurrency."""
    return 2 * concurrency if config.warmup_requests is None else config.warmup_requests


def level_row(
    rounds: Sequence[Sequence[Outcome]], *, warmup: int, concurrency: int, mix: tuple[int, ...] | None
) -> dict[str, Any]:
    """Throughput over each round's steady window (summed), latency percentiles of successful measured
    requests of all rounds, errors by status code."""
    measured = [o for outcomes in rounds for o in outcomes if o.index >= warmup]
    ok = [o for o in measured if o.code == "OK"]
    errors = dict(sorted(Counter(o.code for o in measured if o.code != "OK").items()))
    texts = tokens = done = 0
    seconds = 0.0
    for outcomes in rounds:
        window = measurement_window(outcomes, warmup)
        if window is None:
            continue
        seconds += window[1] - window[0]
        # Every request answered inside the window counts, warm-up ones too: they were real load.
        inside = [o for o in outcomes if o.code == "OK" and window[0] < o.done_at <= window[1]]
        texts += sum(o.texts for o in inside)
        tokens += sum(o.tokens for o in inside)
        done += len(inside)
    return {
        "dims_mix": mix_label(mix),
        "concurrency": concurrency,
        "rounds": len(rounds),
        "requests": len(measured),
        "ok": len(ok),
        "errors": errors,
        "seconds": seconds,
        "texts_per_s": texts / seconds if seconds > 0 else None,
        "requests_per_s": done / seconds if seconds > 0 else None,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "latency": dataclasses.asdict(summarize([o.seconds for o in ok])) if ok else None,
        "server_queue_ms_mean": sum(o.queue_ms for o in ok) / len(ok) if ok else None,
        "server_inference_ms_mean": sum(o.inference_ms for o in ok) / len(ok) if ok else None,
    }


def round_orders(mixes: Sequence[Any], rounds: int) -> list[list[Any]]:
    """Mix order per round, reversed every other round (ABBA): a slow drift then weighs on all mixes alike."""
    return [list(mixes) if r % 2 == 0 else list(reversed(mixes)) for r in range(rounds)]


async def sweep(
    config: ServeConfig, progress: Progress, *, root_certificates: bytes | None = None
) -> list[dict[str, Any]]:
    """Every concurrency level; within a level, each dims mix in alternating order for `config.rounds` rounds."""
    from mrl.serving.client import AsyncEmbedClient

    client = AsyncEmbedClient(config.target, token=config.token, root_certificates=root_certificates)
    ours = () if config.server_pid is None else (config.server_pid,)
    rows = []
    try:
        for concurrency in config.concurrency:
            outcomes: dict[str, list[list[Outcome]]] = {mix_label(m): [] for m in config.dims_mixes}
            busy: dict[str, list[float]] = {mix_label(m): [] for m in config.dims_mixes}
            for r, order in enumerate(round_orders(config.dims_mixes, config.rounds)):
                for mix in order:
                    progress(f"concurrency {concurrency}, dims {mix_label(mix)}, round {r + 1}/{config.rounds}")
                    before = memory.cpu_snapshot(ours)
                    outcomes[mix_label(mix)].append(await run_level(client, config, concurrency, mix))
                    # Without --server-pid, "other" includes the server itself, not only unrelated jobs.
                    load = memory.other_load(before, memory.cpu_snapshot(ours), os.cpu_count() or 1)
                    busy[mix_label(mix)].append(load or 0.0)
            for mix in config.dims_mixes:
                label = mix_label(mix)
                row = level_row(
                    outcomes[label], warmup=warmup_count(config, concurrency), concurrency=concurrency, mix=mix
                )
                row["other_load_cores"] = max(busy[label]) if busy[label] else None
                p50 = (row["latency"] or {}).get("p50_ms") or float("nan")
                errors = row["errors"] or "none"
                progress(f"  dims {label}: {row['texts_per_s'] or 0:.1f} texts/s, p50 {p50:.1f} ms, errors {errors}")
                rows.append(row)
    finally:
        await client.close()
    return rows


def offline_throughput(
    artifact: Path, texts: Sequence[str], *, precision: str | None, threads: int, min_seconds: float = 5.0
) -> dict[str, Any]:
    """The offline Embedder at batch 32 on the same texts: texts/s over whole passes, at least `min_seconds`."""
    from mrl.runtime.embedder import Embedder

    # Every backend takes a thread count (GPU ones ignore it), whatever "auto" resolves to.
    embedder = Embedder.load(artifact, "auto", precision=precision, intra_op_threads=threads)
    try:
        embedder.embed(list(texts[:64]), batch_size=32, truncate=True)  # warm-up
        passes = []
        before = memory.cpu_snapshot()
        start = time.perf_counter()
        while not passes or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            embedder.embed(list(texts), batch_size=32, truncate=True)
            passes.append(time.perf_counter() - t0)
        return {
            "artifact": str(artifact),
            "precision": embedder.precision,
            "batch_size": 32,
            "texts": len(texts),
            "passes": len(passes),
            "texts_per_s": len(texts) * len(passes) / sum(passes),
            "pass_seconds": passes,
            "other_load_cores": memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1),
        }
    finally:
        embedder.close()


def bracketing_offline(level_index: int, offline: Sequence[float]) -> float | None:
    """The offline rate a level is held against: the mean of the passes just before and just after it."""
    near = offline[level_index : level_index + 2]
    return sum(near) / len(near) if near else None


def sweep_with_offline(
    config: ServeConfig,
    progress: Progress,
    measure_offline: Callable[[], dict[str, Any]] | None,
    *,
    root_certificates: bytes | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sweep with an offline pass before every concurrency level and after the last.

    A shared machine drifts over minutes; holding each level against the offline passes right
    around it keeps the ratio honest where one before/after pair would not.
    """
    rows: list[dict[str, Any]] = []
    offline: list[dict[str, Any]] = []
    for concurrency in config.concurrency:
        if measure_offline is not None:
            progress(f"offline Embedder at batch 32 (before concurrency {concurrency})")
            offline.append(measure_offline())
        level = dataclasses.replace(config, concurrency=(concurrency,))
        rows += asyncio.run(sweep(level, progress, root_certificates=root_certificates))
    if measure_offline is not None:
        progress("offline Embedder at batch 32 (after the sweep)")
        offline.append(measure_offline())
        rates = [o["texts_per_s"] for o in offline]
        for row in rows:
            row["offline_texts_per_s"] = bracketing_offline(config.concurrency.index(row["concurrency"]), rates)
    add_comparisons(rows)
    return rows, offline


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput against its offline rate and, for mixed dims, against each single-dims mix."""
    singles = {(r["concurrency"], r["dims_mix"]): r for r in rows if "," not in r["dims_mix"]}
    for row in rows:
        row["vs_offline"] = ratio(row["texts_per_s"], row.get("offline_texts_per_s"))
        if "," in row["dims_mix"]:
            row["vs_single_dims"] = {
                mix: ratio(row["texts_per_s"], other["texts_per_s"])
                for (c, mix), other in singles.items()
                if c == row["concurrency"]
            }


def serve_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench serve` prints."""
    from mrl.bench.report import markdown_table

    headers = [
        "dims",
        "concurrency",
        "ok",
        "errors",
        "texts/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "server queue ms",
        "offline texts/s",
        "vs offline",
        "vs single dims",
        "other load",
    ]
    body = []
    for r in rows:
        lat = r["latency"] or {}
        vs = r.get("vs_single_dims") or {}
        body.append(
            [
                r["dims_mix"],
                r["concurrency"],
                r["ok"],
                r["errors"] or "0",
                r["texts_per_s"],
                lat.get("p50_ms"),
                lat.get("p90_ms"),
                lat.get("p99_ms"),
                r["server_queue_ms_mean"],
                r.get("offline_texts_per_s"),
                None if r.get("vs_offline") is None else f"{r['vs_offline']:.2f}",
                ", ".join(f"{ratio_:.2f} vs {m}" for m, ratio_ in vs.items() if ratio_ is not None) or None,
                r.get("other_load_cores"),
            ]
        )
    return markdown_table(headers, body)


def offline_note(offline: Sequence[dict[str, Any]]) -> str:
    """The line under the serve table naming the offline passes (empty without any)."""
    if not offline:
        return ""
    speeds = ", ".join(f"{o['texts_per_s']:.1f}" for o in offline)
    loads = ", ".join("–" if o["other_load_cores"] is None else f"{o['other_load_cores']:.2f}" for o in offline)
    return f"\noffline Embedder, batch 32, before each level and after the last: {speeds} texts/s; other load {loads}"
