"""Statistics for latency samples: percentiles, summaries, throughput and ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(samples)
    # Rank on a 0..n-1 scale, interpolated: the definition numpy and most benchmark tools use,
    # so a reader can recompute our numbers from the raw samples in the JSON.
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Latency summary of one measured cell, in milliseconds."""

    n: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def summarize(seconds: Sequence[float]) -> Summary:
    """Summarise latency samples given in seconds (as perf_counter differences)."""
    if not seconds:
        raise ValueError("no samples to summarise")
    ms = [s * 1000 for s in seconds]
    mean = sum(ms) / len(ms)
    # Sample standard deviation (n - 1): the samples estimate a noisy machine, not a population.
    var = sum((x - mean) ** 2 for x in ms) / (len(ms) - 1) if len(ms) > 1 else 0.0
    return Summary(
        n=len(ms),
        mean_ms=mean,
        std_ms=math.sqrt(var),
        min_ms=min(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=max(ms),
    )


def throughput(items: float, seconds: Sequence[float]) -> float:
    """Items per second when each of the samples processed `items` items, one after the other."""
    total = sum(seconds)
    if total <= 0:
        raise ValueError("total time must be positive")
    return items * len(seconds) / total


def ratio(candidate: float | None, baseline: float | None) -> float | None:
    """candidate / baseline, or None where either is missing or the baseline is zero."""
    if candidate is None or baseline is None or baseline == 0:
        return None
    return candidate / baseline


def block_schedule(names: Sequence[str], repeats: int, block: int) -> list[tuple[str, int]]:
    """Round-robin blocks: (name, calls) pairs giving each name `repeats` calls, at most `block` in a row.

    Alternating candidates spreads a shared machine's slow spells (other jobs, thermal and
    frequency changes) over all of them instead of penalising whichever ran during the spell.
    Blocks rather than single calls, with a pause between them, because thread pools keep spinning
    after a call (onnxruntime's for tens of milliseconds): strict alternation would time each
    candidate against the previous one's spinning threads.
    """
    if repeats < 1 or block < 1:
        raise ValueError(f"repeats and block must be at least 1, not {repeats} and {block}")
    schedule = []
    for start in range(0, repeats, block):
        schedule += [(name, min(block, repeats - start)) for name in names]
    return schedule
