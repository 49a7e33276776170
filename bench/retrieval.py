"""Retrieval quality, pure numpy: output encodings, nearest neighbours, recall@k and MRR@k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("float32", "float16", "int8", "ubinary")


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """Vectors as an index would store them, and how to score them against each other."""

    codes: np.ndarray  # what is stored, one row a vector
    encoding: str


def bytes_per_vector(encoding: str, dims: int) -> int:
    """Storage for one vector of `dims` components in `encoding` (ubinary packs 8 dims a byte, sign bits)."""
    per_dim = {"float32": 4, "float16": 2, "int8": 1}
    if encoding == "ubinary":
        return math.ceil(dims / 8)
    if encoding not in per_dim:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    return per_dim[encoding] * dims


def int8_ranges(calibration: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (minimum, step) mapping the calibration vectors' range onto 256 levels."""
    low = calibration.min(axis=0)
    high = calibration.max(axis=0)
    step = np.maximum(high - low, 1e-12) / 255
    return low.astype(np.float32), step.astype(np.float32)


def encode(vectors: np.ndarray, encoding: str, calibration: np.ndarray | None = None) -> Encoded:
    """Store unit vectors as `encoding`; int8 is scalar quantisation with ranges from `calibration`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if encoding == "float32":
        return Encoded(codes=vectors, encoding=encoding)
    if encoding == "float16":
        return Encoded(codes=vectors.astype(np.float16), encoding=encoding)
    if encoding == "int8":
        # Per-dimension ranges from the corpus, as sentence-transformers' quantize_embeddings and
        # vector databases do; values outside the calibration range are clipped.
        low, step = int8_ranges(vectors if calibration is None else calibration)
        codes = np.clip(np.round((vectors - low) / step) - 128, -128, 127).astype(np.int8)
        return Encoded(codes=codes, encoding=encoding)
    if encoding == "ubinary":
        return Encoded(codes=np.packbits(vectors > 0, axis=1), encoding=encoding)
    raise ValueError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")


def scores(queries: Encoded, docs: Encoded, dims: int) -> np.ndarray:
    """`[n_queries, n_docs]` similarity in the encoding's own space (higher is closer)."""
    if queries.encoding != docs.encoding:
        raise ValueError(f"cannot score {queries.encoding} queries against {docs.encoding} documents")
    if queries.encoding == "ubinary":
        # Agreeing bits minus disagreeing bits: the dot product of ±1 vectors, i.e. dims - 2 * Hamming.
        q = np.unpackbits(queries.codes, axis=1, count=dims).astype(np.float32) * 2 - 1
        d = np.unpackbits(docs.codes, axis=1, count=dims).astype(np.float32) * 2 - 1
        return q @ d.T
    return queries.codes.astype(np.float32) @ docs.codes.astype(np.float32).T


def top_k(score: np.ndarray, k: int, exclude: Sequence[int] | None = None) -> np.ndarray:
    """Indices of the k highest scores per row, best first; ties go to the lower index.

    `exclude[i]` is a column row i may not return (the query itself); a negative value excludes nothing.
    """
    score = np.array(score, dtype=np.float64, copy=True)
    if exclude is not None:
        rows = np.asarray(exclude)
        keep = rows >= 0
        score[np.arange(len(score))[keep], rows[keep]] = -np.inf
    k = min(k, score.shape[1] - (1 if exclude is not None else 0))
    if k <= 0:
        return np.zeros((len(score), 0), dtype=np.int64)
    # Candidates are everything at least as good as the k-th best (ties included), so the final
    # order is exact without sorting whole rows of a large corpus.
    kth = np.partition(score, -k, axis=1)[:, -k]
    out = np.empty((len(score), k), dtype=np.int64)
    for i, row in enumerate(score):
        candidates = np.flatnonzero(row >= kth[i])
        order = np.lexsort((candidates, -row[candidates]))  # last key first: score desc, then index
        out[i] = candidates[order[:k]]
    return out


def neighbour_recall(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of |found ∩ reference| / |reference|: how many true neighbours were kept."""
    if found.shape[0] != reference.shape[0]:
        raise ValueError("found and reference need one row per query each")
    hits = [len(set(f.tolist()) & set(r.tolist())) / len(r) for f, r in zip(found, reference, strict=True)]
    return float(np.mean(hits))


def ranks_of(found: np.ndarray, relevant: Sequence[int]) -> list[int | None]:
    """Zero-based position of each row's relevant document in its results (None: not retrieved)."""
    out: list[int | None] = []
    for row, want in zip(found, relevant, strict=True):
        hits = np.flatnonzero(row == want)
        out.append(int(hits[0]) if hits.size else None)
    return out


def recall_at_k(ranks: Sequence[int | None], k: int) -> float:
    """Fraction of queries whose one relevant document is in the top k."""
    return float(np.mean([r is not None and r < k for r in ranks]))


def mrr_at_k(ranks: Sequence[int | None], k: int) -> float:
    """Mean reciprocal rank, counting only hits within the top k."""
    return float(np.mean([1 / (r + 1) if r is not None and r < k else 0.0 for r in ranks]))


def sample_indices(n: int, limit: int) -> list[int]:
    """Up to `limit` indices spread evenly over range(n): deterministic, covering the whole corpus."""
    if n <= limit:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, limit).round().astype(int)]
