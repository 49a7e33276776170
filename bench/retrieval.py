"""Retrieval quality, pure numpy: similarity of encoded vectors, nearest neighbours, recall@k and MRR@k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl.runtime import encodings

QUERY_CHUNK = 256  # queries scored at once: bounds memory at 256 x corpus size


def scores(queries: np.ndarray, docs: np.ndarray, encoding: str, dims: int) -> np.ndarray:
    """`[n_queries, n_docs]` similarity of codes in their encoding's own space (higher is closer)."""
    if encoding in encodings.PACKED:
        # Agreeing bits minus disagreeing bits: the dot product of ±1 vectors, i.e. dims - 2 * Hamming.
        q = encodings.unpack_bits(queries, encoding, dims).astype(np.float32) * 2 - 1
        d = encodings.unpack_bits(docs, encoding, dims).astype(np.float32) * 2 - 1
        return q @ d.T
    # uint8 holds the same buckets as int8, shifted by 128: score both centred, so they rank alike.
    shift = 128 if encoding == "uint8" else 0
    return (queries.astype(np.float32) - shift) @ (docs.astype(np.float32) - shift).T


def decode(codes: np.ndarray, encoding: str, dims: int, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float vectors a float query is compared against when it re-scores `encoding` codes (`[n, dims]` float32).

    float16: as float32; int8/uint8: each value at the centre of its bucket in `ranges` (the ones
    `encodings.encode` used); binary/ubinary: each bit as +1 or -1 (the re-scoring of Yamada et al. 2021).
    """
    if encoding in encodings.PACKED:
        return encodings.unpack_bits(codes, encoding, dims).astype(np.float32) * 2 - 1
    if encoding in encodings.CALIBRATED:
        if ranges is None:
            raise ValueError(f"decoding {encoding} needs the ranges it was encoded with")
        buckets = codes.astype(np.float32) + (128 if encoding == "int8" else 0)
        steps = (ranges[1] - ranges[0]) / 255
        return (ranges[0] + (buckets + 0.5) * steps).astype(np.float32)
    return np.asarray(codes, dtype=np.float32)


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


def knn(
    queries: np.ndarray, docs: np.ndarray, encoding: str, dims: int, k: int, exclude: Sequence[int] | None
) -> np.ndarray:
    """Top-k document indices for every query (codes of `encoding`), scored in chunks of queries."""
    parts = []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        skip = None if exclude is None else exclude[start : start + QUERY_CHUNK]
        parts.append(top_k(scores(chunk, docs, encoding, dims), k, skip))
    return np.concatenate(parts)


def encode_corpus(vectors: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A corpus's codes and the ranges they used: int8/uint8 are calibrated on the corpus itself, as an index is."""
    ranges = encodings.calibration_ranges(vectors) if encoding in encodings.CALIBRATED else None
    return encodings.encode(vectors, encoding, ranges), ranges


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
