"""`mrl-bench serve`: a closed-loop load generator for `mrl-serve` and Triton, in the manner of perf_analyzer.

Each of C workers sends a request, waits for the answer and sends the next, so C requests are
always in flight. Every level is bounded by a request count and a wall-clock limit; the generator
only ever connects to the targets it is given (`mrl.bench.targets`). With several targets, each
level runs against each in turn, in alternating order, so a drifting machine weighs on all alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mrl.bench import memory
from mrl.bench.drivers import open_driver, process_tree
from mrl.bench.load import Outcome, ServeConfig, mix_label, warmup_count
from mrl.bench.serve_report import add_comparisons
from mrl.bench.stats import summarize

Progress = Callable[[str], None]
OFFLINE_SINGLES = 200  # texts embedded one at a time for the offline one-text latency


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


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean, or None where any value is missing (a server that does not report it)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _rates(rounds: Sequence[Sequence[Outcome]], warmup: int, keep: Callable[[Outcome], bool]) -> dict[str, Any]:
    """Throughput of the outcomes `keep` takes over each round's steady window (summed; the window is the
    whole level's), and the latency percentiles of their successful measured requests of all rounds."""
    ok = [o for outcomes in rounds for o in outcomes if o.index >= warmup and o.code == "OK" and keep(o)]
    texts = done = 0
    tokens: int | None = 0
    seconds = 0.0
    for outcomes in rounds:
        window = measurement_window(outcomes, warmup)
        if window is None:
            continue
        seconds += window[1] - window[0]
        # Every request answered inside the window counts, warm-up ones too: they were real load.
        inside = [o for o in outcomes if o.code == "OK" and window[0] < o.done_at <= window[1] and keep(o)]
        texts += sum(o.texts for o in inside)
        counted = [o.tokens for o in inside]
        tokens = None if tokens is None or None in counted else tokens + sum(counted)
        done += len(inside)
    return {
        "ok": len(ok),
        "seconds": seconds,
        "texts_per_s": texts / seconds if seconds > 0 else None,
        "requests_per_s": done / seconds if seconds > 0 else None,
        "tokens_per_s": tokens / seconds if seconds > 0 and tokens is not None else None,
        "latency": dataclasses.asdict(summarize([o.seconds for o in ok])) if ok else None,
    }


def level_row(
    rounds: Sequence[Sequence[Outcome]],
    *,
    warmup: int,
    concurrency: int,
    mix: tuple[int, ...] | None,
    target: str = "",
    layers_mix: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Throughput over each round's steady window (summed), latency percentiles of successful measured
    requests of all rounds, errors by status code; with several layers, the same for each depth's requests."""
    measured = [o for outcomes in rounds for o in outcomes if o.index >= warmup]
    ok = [o for o in measured if o.code == "OK"]
    row = {
        "target": target,
        "dims_mix": mix_label(mix),
        "layers_mix": mix_label(layers_mix),
        "concurrency": concurrency,
        "rounds": len(rounds),
        "requests": len(measured),
        "errors": dict(sorted(Counter(o.code for o in measured if o.code != "OK").items())),
        **_rates(rounds, warmup, lambda o: True),
        "server_queue_ms_mean": _mean([o.queue_ms for o in ok]),
        "server_inference_ms_mean": _mean([o.inference_ms for o in ok]),
    }
    if layers_mix is not None and len(layers_mix) > 1:
        row["by_layers"] = {str(n): _rates(rounds, warmup, lambda o, n=n: o.layers == n) for n in layers_mix}
    return row


def round_orders(mixes: Sequence[Any], rounds: int) -> list[list[Any]]:
    """Order per round, reversed every other round (ABBA): a slow drift then weighs on all cells alike."""
    return [list(mixes) if r % 2 == 0 else list(reversed(mixes)) for r in range(rounds)]


async def sweep(config: ServeConfig, progress: Progress) -> list[dict[str, Any]]:
    """Every concurrency level; within a level, each (target, dims mix, layers mix) in alternating order for
    `config.rounds`."""

    drivers = []
    rows = []
    try:
        for spec in config.targets:
            drivers.append(await open_driver(spec, config, dict(config.client_python).get(spec.kind)))
        ours = process_tree(config.server_pids) + tuple(p for d in drivers for p in d.pids)
        cells = [(d, m, n) for d in drivers for m in config.dims_mixes for n in config.layers_mixes]
        for concurrency in config.concurrency:
            outcomes: dict[tuple[str, str, str], list[list[Outcome]]] = {_key(*c): [] for c in cells}
            busy: dict[tuple[str, str, str], list[float]] = {key: [] for key in outcomes}
            for r, order in enumerate(round_orders(cells, config.rounds)):
                for driver, mix, layers_mix in order:
                    key = _key(driver, mix, layers_mix)
                    progress(f"{driver.label}: concurrency {concurrency}, {_cell(key)}, round {r + 1}/{config.rounds}")
                    before = memory.cpu_snapshot(ours)
                    outcomes[key].append(await driver.run_level(concurrency, mix, layers_mix))
                    # Without --server-pid, "other" includes the servers themselves, not only unrelated jobs.
                    load = memory.other_load(before, memory.cpu_snapshot(ours), os.cpu_count() or 1)
                    busy[key].append(load or 0.0)
            warmup = warmup_count(config, concurrency)
            for driver, mix, layers_mix in cells:
                key = _key(driver, mix, layers_mix)
                row = level_row(
                    outcomes[key], warmup=warmup, concurrency=concurrency, mix=mix, target=driver.label,
                    layers_mix=layers_mix,
                )  # fmt: skip
                row["other_load_cores"] = max(busy[key]) if busy[key] else None
                p50 = (row["latency"] or {}).get("p50_ms") or float("nan")
                speed = f"{row['texts_per_s'] or 0:.1f} texts/s, p50 {p50:.1f} ms, errors {row['errors'] or 'none'}"
                progress(f"  {driver.label} {_cell(key)}: {speed}")
                rows.append(row)
    finally:
        for driver in drivers:
            await driver.close()
    return rows


def _key(driver: Any, mix: tuple[int, ...] | None, layers_mix: tuple[int, ...] | None) -> tuple[str, str, str]:
    return (driver.label, mix_label(mix), mix_label(layers_mix))


def _cell(key: tuple[str, str, str]) -> str:
    return f"dims {key[1]}" + ("" if key[2] == "default" else f", layers {key[2]}")


def offline_throughput(
    artifact: Path, texts: Sequence[str], *, precision: str | None, threads: int, min_seconds: float = 5.0
) -> dict[str, Any]:
    """The offline Embedder on the same texts: texts/s at batch 32 over whole passes (at least `min_seconds`),
    and the median latency of one text at a time (what a server answering a lone caller is held against)."""
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
        singles = []
        for text in texts[:OFFLINE_SINGLES]:
            t0 = time.perf_counter()
            embedder.embed([text], truncate=True)
            singles.append(time.perf_counter() - t0)
        return {
            "artifact": str(artifact),
            "precision": embedder.precision,
            "batch_size": 32,
            "texts": len(texts),
            "passes": len(passes),
            "texts_per_s": len(texts) * len(passes) / sum(passes),
            "pass_seconds": passes,
            "batch1_p50_ms": statistics.median(singles) * 1000,
            "other_load_cores": memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1),
        }
    finally:
        embedder.close()


def bracketing_offline(level_index: int, offline: Sequence[float]) -> float | None:
    """The offline rate a level is held against: the mean of the passes just before and just after it."""
    near = offline[level_index : level_index + 2]
    return sum(near) / len(near) if near else None


def sweep_with_offline(
    config: ServeConfig, progress: Progress, measure_offline: Callable[[], dict[str, Any]] | None
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
        rows += asyncio.run(sweep(level, progress))
    if measure_offline is not None:
        progress("offline Embedder at batch 32 (after the sweep)")
        offline.append(measure_offline())
        rates = [o["texts_per_s"] for o in offline]
        singles = [o["batch1_p50_ms"] for o in offline]
        for row in rows:
            level = config.concurrency.index(row["concurrency"])
            row["offline_texts_per_s"] = bracketing_offline(level, rates)
            row["offline_batch1_p50_ms"] = bracketing_offline(level, singles)
    add_comparisons(rows)
    return rows, offline
