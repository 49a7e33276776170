"""Query cost of exact search: one query scanned against N codes on one core, measured on synthetic codes of the
same encoding and width, and scaled linearly in N.

The kernels are numpy's: float32 and int8 dot products through `np.einsum` (int8 accumulated in int32),
Hamming distance through XOR and popcount on 64-bit words. A search library with SIMD kernels (int8
dot products especially, which numpy has no fast loop for) and several threads will be faster; the
ratios between designs measured here are what the trade-off uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrl.bench import memory, retrieval
from mrl.runtime import encodings
from mrl.runtime.errors import InvalidInputError

SCAN_CHUNK = 65_536  # rows scored at once: temporaries stay cache-sized
TEN_MILLION = 10_000_000
Key = tuple[str, int, int]  # (encoding, dims, k)
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    # numpy >= 2.0 has a popcount ufunc; older numpy looks bytes up in a table.
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return _POPCOUNT8[words.view(np.uint8)].reshape(*words.shape, words.itemsize).sum(axis=-1, dtype=np.uint8)


def hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Differing bits between one packed query (`[width]` bytes) and every packed code (`[n, width]`)."""
    codes = np.ascontiguousarray(codes).view(np.uint8)
    query = np.ascontiguousarray(query).view(np.uint8).reshape(-1)
    word = next(w for w in (8, 4, 2, 1) if codes.shape[1] % w == 0)  # the widest word dividing a row
    rows = codes.view(np.dtype(f"u{word}"))
    q = query.view(np.dtype(f"u{word}"))
    out = np.empty(len(rows), dtype=np.uint32)
    for start in range(0, len(rows), SCAN_CHUNK):
        block = rows[start : start + SCAN_CHUNK]
        acc = _popcount(block[:, 0] ^ q[0]).astype(np.uint32)
        for j in range(1, rows.shape[1]):
            acc += _popcount(block[:, j] ^ q[j])
        out[start : start + len(block)] = acc
    return out


def dot(codes: np.ndarray, query: np.ndarray, encoding: str) -> np.ndarray:
    """Scores of one query against every code in a float or scalar encoding, ranked as `retrieval.scores` ranks."""
    if encoding in encodings.CALIBRATED:
        # uint8 is scored centred (as retrieval.scores does); the query's own -128 shift is a per-query constant.
        q = query.astype(np.int32).reshape(-1) - (128 if encoding == "uint8" else 0)
        return np.einsum("ij,j->i", codes, q, dtype=np.int32)
    if encoding == "float16":
        q = query.astype(np.float32).reshape(-1)
        parts = [codes[s : s + SCAN_CHUNK].astype(np.float32) @ q for s in range(0, len(codes), SCAN_CHUNK)]
        return np.concatenate(parts) if parts else np.empty(0, np.float32)
    return np.einsum("ij,j->i", codes, query.reshape(-1).astype(np.float32))


def select(score: np.ndarray, k: int, *, smallest: bool = False) -> np.ndarray:
    """Indices of the k best of one query's scores, best first, ties to the lower index (as `retrieval.top_k`)."""
    k = min(k, len(score))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    key = score if smallest else -score.astype(np.int64 if score.dtype.kind == "u" else score.dtype, copy=False)
    kth = np.partition(key, k - 1)[k - 1]
    candidates = np.flatnonzero(key <= kth)
    order = np.lexsort((candidates, key[candidates]))
    return candidates[order[:k]]


def scan(codes: np.ndarray, query: np.ndarray, encoding: str, k: int) -> np.ndarray:
    """Exact top-k of one query over every code, in the encoding's own space (Hamming for bits): a flat index."""
    if encoding in encodings.PACKED:
        return select(hamming(codes, query), k, smallest=True)
    return select(dot(codes, query, encoding), k)


def rescore_one(
    store: np.ndarray, ids: np.ndarray, query: np.ndarray, encoding: str, ranges: np.ndarray | None, k: int
) -> np.ndarray:
    """The best k of `ids` for one float query, re-scored against their stored vectors (`retrieval.decode`)."""
    ids = np.sort(ids)  # ties go to the lower document index, as everywhere else
    vectors = retrieval.decode(store[ids], encoding, len(query), ranges)
    return ids[select(vectors @ query, k)]


def query_ms(scan_ms: float, rescore_ms: float, measured_n: int, n: int) -> float:
    """Cost of one query at `n` vectors: the scan scaled linearly from `measured_n`, the re-score as it is.

    The re-score reads k vectors whatever N is; the scan reads all N codes.
    """
    return scan_ms * n / measured_n + rescore_ms


def synthetic_codes(encoding: str, dims: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random codes of an encoding and width: the search cost does not depend on their values."""
    if encoding in ("float32", "float16"):
        values = rng.random((n, dims), dtype=np.float32)
        values -= 0.5  # in place: at a million wide vectors every copy is gigabytes
        return values.astype(encodings.dtype_of(encoding), copy=False)
    info = np.iinfo(encodings.dtype_of(encoding))
    width = encodings.width(encoding, dims)
    return rng.integers(info.min, info.max, (n, width), dtype=encodings.dtype_of(encoding), endpoint=True)


@dataclass(frozen=True, kw_only=True)
class SearchCosts:
    """Median ms of one query, measured on `n_vectors` synthetic codes: scans (with their top-k) and re-scores."""

    n_vectors: int
    repeats: int
    scan_ms: dict[Key, float]
    rescore_ms: dict[Key, float]
    other_load_cores: float | None = None  # cores other processes used while it was measured

    def as_json(self) -> dict[str, object]:
        """The measurements as the report stores them."""

        def listed(d: dict[Key, float]) -> list[dict[str, object]]:
            return [{"encoding": e, "dims": n, "k": k, "ms": ms} for (e, n, k), ms in sorted(d.items())]

        return {
            "n_vectors": self.n_vectors,
            "repeats": self.repeats,
            "kernel": "numpy, one query at a time, one core",
            "other_load_cores": self.other_load_cores,
            "scan": listed(self.scan_ms),
            "rescore": listed(self.rescore_ms),
        }


def _median_ms(call: Callable[..., object], inputs: Sequence[tuple[Any, ...]]) -> float:
    """Median wall time of `call(*args)` over the inputs after the first (a warm-up: first-touch faults and
    lazily built ufunc loops are no query's cost)."""
    call(*inputs[0])
    times = []
    for args in inputs[1:]:
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _time_codes(
    encoding: str, dims: int, ks: tuple[Sequence[int], Sequence[int]], n_vectors: int, repeats: int, final_k: int
) -> tuple[dict[Key, float], dict[Key, float]]:
    """Scan and re-score times over one set of synthetic codes (`ks`: the scans' k, the re-scores' k)."""
    rng = np.random.default_rng(dims)
    codes = synthetic_codes(encoding, dims, n_vectors, rng)
    queries = synthetic_codes(encoding, dims, repeats + 1, rng)
    scans = {(encoding, dims, k): _median_ms(scan, [(codes, q, encoding, k) for q in queries]) for k in ks[0]}
    floats = rng.standard_normal((10 * repeats + 1, dims)).astype(np.float32)
    ranges = np.stack([np.full(dims, -0.3), np.full(dims, 0.3)]).astype(np.float32)
    rescores = {}
    for k in ks[1]:
        ids = [rng.choice(n_vectors, size=min(k, n_vectors), replace=False) for _ in floats]
        inputs = [(codes, i, q, encoding, ranges, final_k) for i, q in zip(ids, floats, strict=True)]
        rescores[(encoding, dims, k)] = _median_ms(rescore_one, inputs)  # microseconds: ten times the repeats
    return scans, rescores


def check_memory(codes: set[tuple[str, int]], n_vectors: int) -> None:
    """Refuse a corpus size whose widest synthetic codes would not fit in the memory available now."""
    widest = max((encodings.bytes_per_vector(e, d) for e, d in codes), default=0) * n_vectors
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return  # no way to tell on this platform: let numpy try
    if widest > free:
        raise InvalidInputError(
            f"timing search over {n_vectors:,} vectors needs {widest / 2**30:.1f} GiB for the widest codes and "
            f"{free / 2**30:.1f} GiB is free; lower --cost-vectors"
        )


def measure(
    scans: Iterable[Key], rescores: Iterable[Key], *, n_vectors: int, repeats: int = 10, final_k: int = 10,
    progress: Callable[[str], None] = lambda _: None,
) -> SearchCosts:  # fmt: skip
    """Time `scan` for each (encoding, dims, k), and `rescore_one` of k vectors down to the best `final_k`, on
    `n_vectors` synthetic codes; one set of codes at a time (the largest is n_vectors x the widest row)."""
    scans, rescores = set(scans), set(rescores)
    check_memory({(e, d) for e, d, _ in scans | rescores}, n_vectors)
    scan_ms: dict[Key, float] = {}
    rescore_ms: dict[Key, float] = {}
    before = memory.cpu_snapshot()
    for encoding, dims in sorted({(e, d) for e, d, _ in scans | rescores}):
        progress(f"timing search over {n_vectors:,} synthetic {dims}-d {encoding} codes")
        ks = tuple(sorted(k for e, d, k in wanted if (e, d) == (encoding, dims)) for wanted in (scans, rescores))
        timed = _time_codes(encoding, dims, ks, n_vectors, repeats, final_k)
        scan_ms.update(timed[0])
        rescore_ms.update(timed[1])
    busy = memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1)
    if busy is not None and busy > 0.25:
        progress(f"other processes used {busy:.2f} cores while search was timed: its ms/query are skewed")
    return SearchCosts(
        n_vectors=n_vectors, repeats=repeats, scan_ms=scan_ms, rescore_ms=rescore_ms, other_load_cores=busy
    )


def _stages(design: Mapping[str, Any], final_k: int) -> tuple[Key, Key | None]:
    """The scan a design runs and the re-score that follows it (None for a single stage)."""
    if design.get("design", "single") == "single":
        return (design["encoding"], design["dims"], final_k), None
    k = design["k"]
    return (design["shortlist_encoding"], design["shortlist_dims"], k), (
        design["rescore_encoding"], design["rescore_dims"], k,
    )  # fmt: skip


def needs(designs: Iterable[Mapping[str, Any]], final_k: int) -> tuple[set[Key], set[Key]]:
    """The scans and re-scores to time for these designs: one scan per set of codes, its top-k selection at the
    largest k any design takes from it (so designs sharing codes share one measurement and differ only by what
    their re-score costs), and one re-score per (encoding, dims, k)."""
    widest: dict[tuple[str, int], int] = {}
    rescores = set()
    for d in designs:
        (encoding, dims, k), rescore_key = _stages(d, final_k)
        widest[(encoding, dims)] = max(k, widest.get((encoding, dims), 0))
        if rescore_key is not None:
            rescores.add(rescore_key)
    return {(e, n, k) for (e, n), k in widest.items()}, rescores


def with_costs(designs: Iterable[Mapping[str, Any]], costs: SearchCosts, final_k: int) -> list[dict[str, Any]]:
    """The designs with `query_ms` at the measured size, `query_ms_10m` extrapolated to 10M vectors, and the
    bytes a funnel reads per query for its re-score."""
    scans = {(e, n): ms for (e, n, _), ms in costs.scan_ms.items()}
    out = []
    for d in designs:
        scan_key, rescore_key = _stages(d, final_k)
        rescore_ms = 0.0 if rescore_key is None else costs.rescore_ms[rescore_key]
        scan_ms = scans[scan_key[:2]]
        extra: dict[str, Any] = {
            "query_ms": scan_ms + rescore_ms,
            "query_ms_10m": query_ms(scan_ms, rescore_ms, costs.n_vectors, TEN_MILLION),
        }
        if rescore_key is not None:
            extra["rescore_read_bytes_per_query"] = d["k"] * encodings.bytes_per_vector(*rescore_key[:2])
        out.append({**d, **extra})
    return out
