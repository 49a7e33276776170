"""Funnel designs: shortlist with small codes, re-score the shortlist with larger vectors from the same forward
pass; their quality, the Pareto front of RAM against quality, and the cheapest design that keeps a target."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrl.bench import retrieval
from mrl.runtime import encodings

RESCORE_CHUNK = 64  # queries re-scored at once: bounds the gathered vectors at 64 x k x dims


@dataclass(frozen=True, kw_only=True)
class Funnel:
    """The `k` best by `shortlist_dims`-d `shortlist_encoding` codes (the index in RAM), re-scored by the float
    query against `rescore_dims`-d vectors stored in `rescore_encoding` (read k per query, e.g. from disk)."""

    shortlist_dims: int
    shortlist_encoding: str
    k: int
    rescore_dims: int
    rescore_encoding: str

    @property
    def reuses_codes(self) -> bool:
        """Whether the re-score reads the shortlist's own codes, so nothing is stored besides the index."""
        return (self.rescore_dims, self.rescore_encoding) == (self.shortlist_dims, self.shortlist_encoding)

    @property
    def ram_bytes(self) -> int:
        """Bytes per vector held in RAM: the shortlist codes."""
        return encodings.bytes_per_vector(self.shortlist_encoding, self.shortlist_dims)

    @property
    def disk_bytes(self) -> int:
        """Bytes per vector stored apart for re-scoring (0 when it reads the shortlist codes)."""
        return 0 if self.reuses_codes else encodings.bytes_per_vector(self.rescore_encoding, self.rescore_dims)


def _precision(encoding: str) -> int:
    return encodings.bytes_per_vector(encoding, 64)  # bits kept per 8 dims: ubinary < int8 < float16 < float32


def funnels(
    dims: Sequence[int], shortlist_encodings: Sequence[str], sizes: Sequence[int], rescore_encodings: Sequence[str]
) -> list[Funnel]:
    """Every funnel whose re-score is at least as wide and as precise as its shortlist, and not a plain float search."""
    out = []
    for e_s in dict.fromkeys(shortlist_encodings):
        for d_s in sorted(set(dims)):
            for k in sorted(set(sizes)):
                for e_r in dict.fromkeys(rescore_encodings):
                    for d_r in sorted(d for d in set(dims) if d >= d_s):
                        if _precision(e_r) < _precision(e_s):
                            continue
                        if (d_r, e_r) == (d_s, e_s) and e_s not in (*encodings.PACKED, *encodings.CALIBRATED):
                            continue  # a float query re-scoring the float codes it searched: a single stage
                        stages = {"shortlist_dims": d_s, "shortlist_encoding": e_s, "k": k}
                        out.append(Funnel(**stages, rescore_dims=d_r, rescore_encoding=e_r))
    return out


def candidate_scores(queries: np.ndarray, docs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """`[n_queries, n_candidates]` dot products of each float query with its candidates' vectors."""
    out = np.empty(candidates.shape, dtype=np.float32)
    for start in range(0, len(queries), RESCORE_CHUNK):
        rows = slice(start, start + RESCORE_CHUNK)
        out[rows] = np.einsum("qd,qkd->qk", queries[rows], docs[candidates[rows]])
    return out


def best_of(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k candidates with the highest scores, best first; ties go to the lower document index."""
    order = np.lexsort((candidates, -scores), axis=-1)[:, :k]
    return np.take_along_axis(candidates, order, axis=-1)


def rescore(queries: np.ndarray, docs: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The best k of each query's candidates by float dot product against `docs` (e.g. `retrieval.decode`d codes)."""
    return best_of(candidates, candidate_scores(queries, docs, candidates), k)


@dataclass(frozen=True, kw_only=True)
class SearchSet:
    """One dims' unit float vectors as a search sees them: the indexed documents and the queries."""

    docs: np.ndarray
    queries: np.ndarray
    exclude: Sequence[int] | None = None  # per query, a document it may not find (itself), -1 for none


def search(designs: Sequence[Funnel], sets: Mapping[int, SearchSet], k: int) -> dict[Funnel, np.ndarray]:
    """Top-k document indices per query for every funnel; each shortlist and each re-scoring is computed once."""
    found: dict[Funnel, np.ndarray] = {}
    decoded: dict[tuple[int, str], np.ndarray] = {}
    for d_s, e_s in dict.fromkeys((f.shortlist_dims, f.shortlist_encoding) for f in designs):
        mine = [f for f in designs if (f.shortlist_dims, f.shortlist_encoding) == (d_s, e_s)]
        index = sets[d_s]
        codes, ranges = retrieval.encode_corpus(index.docs, e_s)
        # The query is quantised with the index's ranges: a real index fixes them at build time.
        query_codes = encodings.encode(index.queries, e_s, ranges)
        shortlist = retrieval.knn(query_codes, codes, e_s, d_s, max(f.k for f in mine), index.exclude)
        for d_r, e_r in dict.fromkeys((f.rescore_dims, f.rescore_encoding) for f in mine):
            if (d_r, e_r) not in decoded:
                stored, stored_ranges = retrieval.encode_corpus(sets[d_r].docs, e_r)
                decoded[(d_r, e_r)] = retrieval.decode(stored, e_r, d_r, stored_ranges)
            # Scores of the largest shortlist serve every k: a smaller shortlist is its first k columns.
            scores = candidate_scores(sets[d_r].queries, decoded[(d_r, e_r)], shortlist)
            for f in mine:
                if (f.rescore_dims, f.rescore_encoding) == (d_r, e_r):
                    found[f] = best_of(shortlist[:, : f.k], scores[:, : f.k], k)
    return found


def evaluate(
    designs: Sequence[Funnel],
    free: Mapping[int, SearchSet],
    reference: np.ndarray,
    labelled: Mapping[int, SearchSet] | None = None,
    relevant: Sequence[int] | None = None,
    k: int = 10,
) -> list[dict[str, Any]]:
    """One row per funnel: recall@k against the `reference` neighbours of `free`'s queries and, given labelled
    queries and each one's relevant document, their recall@k and MRR@k."""
    found_free = search(designs, free, k)
    found_labelled = search(designs, labelled, k) if labelled is not None else {}
    rows = []
    for f in designs:
        row: dict[str, Any] = {
            "design": "funnel",
            "shortlist_dims": f.shortlist_dims,
            "shortlist_encoding": f.shortlist_encoding,
            "k": f.k,
            "rescore_dims": f.rescore_dims,
            "rescore_encoding": f.rescore_encoding,
            "ram_bytes_per_vector": f.ram_bytes,
            "disk_bytes_per_vector": f.disk_bytes,
            "recall_at_10": retrieval.neighbour_recall(found_free[f], reference),
        }
        if f in found_labelled and relevant is not None:
            ranks = retrieval.ranks_of(found_labelled[f], relevant)
            row["labelled_recall_at_10"] = retrieval.recall_at_k(ranks, k)
            row["mrr_at_10"] = retrieval.mrr_at_k(ranks, k)
        rows.append(row)
    return rows


def label(row: Mapping[str, Any]) -> str:
    """A design's name: its profile, then its one stage or its shortlist and re-score stages."""
    profile = row["precision"] if row.get("full_depth", True) else f"{row['precision']} l{row['layers']}"
    if row.get("design", "single") == "single":
        return f"{profile} {row['dims']}-d {row['encoding']}"
    return (
        f"{profile} {row['shortlist_dims']}-d {row['shortlist_encoding']} top {row['k']} "
        f"-> {row['rescore_dims']}-d {row['rescore_encoding']}"
    )


def _compute(row: Mapping[str, Any]) -> float:
    flops = row.get("flops_per_text")
    return row.get("layer_share", 1.0) if flops is None else flops


def cost_key(row: Mapping[str, Any], metric: str) -> tuple[float, ...]:
    """What makes one design cheaper than another: RAM bytes per vector, then ms per query, then bytes stored
    apart, then encoder compute per text; the better quality breaks what is left."""
    ms = row.get("query_ms")
    return (
        row["ram_bytes_per_vector"],
        math.inf if ms is None else ms,
        row.get("disk_bytes_per_vector", 0),
        _compute(row),
        -row[metric],
    )


def cheapest(designs: Sequence[Mapping[str, Any]], metric: str, floor: float | None) -> Mapping[str, Any] | None:
    """The cheapest design (by `cost_key`) whose `metric` reaches `floor`; None if none does."""
    passing = [d for d in designs if floor is not None and d.get(metric) is not None and d[metric] >= floor]
    return min(passing, key=lambda d: cost_key(d, metric)) if passing else None


def pareto_front(designs: Sequence[Mapping[str, Any]], metric: str) -> list[Mapping[str, Any]]:
    """Designs that no other beats on both RAM bytes and quality, fewest bytes first.

    At equal bytes only the best quality stays (the faster query breaks a tie); each next point costs
    more bytes and buys strictly better quality.
    """
    ranked = sorted(
        (d for d in designs if d.get(metric) is not None),
        key=lambda d: (d["ram_bytes_per_vector"], -d[metric], cost_key(d, metric)),
    )
    front: list[Mapping[str, Any]] = []
    for d in ranked:
        if not front or d[metric] > front[-1][metric]:
            front.append(d)
    return front


SUMMARY_KEYS = (
    "design", "precision", "layers", "dims", "encoding", "shortlist_dims", "shortlist_encoding", "k",
    "rescore_dims", "rescore_encoding", "ram_bytes_per_vector", "disk_bytes_per_vector", "query_ms",
    "query_ms_10m", "recall_at_10", "labelled_recall_at_10", "mrr_at_10",
)  # fmt: skip


SHARED = ("labelled_recall_at_10", "mrr_at_10")  # labelled metrics also given as a share of the full-width float's


def summary(row: Mapping[str, Any] | None, full: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The keys of a design the report's recommendation keeps, its label, and its labelled quality as a share of
    the `full` design's."""
    if row is None:
        return None
    out = {"label": label(row), **{k: row[k] for k in SUMMARY_KEYS if k in row}}
    if full is not None:
        out["share_of_full"] = {m: row[m] / full[m] for m in SHARED if row.get(m) is not None and full.get(m)}
    return out


def recommend(designs: Sequence[Mapping[str, Any]], target: float, full: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cheapest design, single-stage or funnel, keeping recall@10 >= target against the full-width neighbours,
    and the cheapest keeping labelled recall@10 >= target x the `full` (full-width float) design's; the front."""
    floor = (
        None if full is None or full.get("labelled_recall_at_10") is None else target * full["labelled_recall_at_10"]
    )
    metric = "recall_at_10" if floor is None else "labelled_recall_at_10"
    return {
        "target_recall_at_10": target,
        "full": summary(full),
        "design": summary(cheapest(designs, "recall_at_10", target), full),
        "labelled_floor": floor,
        "labelled_design": None if floor is None else summary(cheapest(designs, metric, floor), full),
        "front": [summary(d, full) for d in pareto_front(designs, metric)],
    }
