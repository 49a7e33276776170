"""`mrl-bench tradeoff`: how small can I go? Quality, bytes and encode time for every dims and encoding."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrl.bench import memory, retrieval
from mrl.bench.report import markdown_table
from mrl.bench.texts import Pair
from mrl.runtime import encodings
from mrl.runtime.embedder import Embedder
from mrl.runtime.errors import InvalidInputError
from mrl.runtime.manifest import load_manifest

Progress = Callable[[str], None]
QUERY_CHUNK = 256  # queries scored at once: bounds memory at 256 x corpus size


@dataclass(frozen=True, kw_only=True)
class TradeoffConfig:
    """What `mrl-bench tradeoff` evaluates."""

    artifact: Path
    corpus: tuple[str, ...]
    pairs: tuple[Pair, ...] = ()
    precisions: tuple[str, ...] | None = None
    encodings: tuple[str, ...] = ("float32", "int8", "ubinary")
    k: int = 10
    max_queries: int = 1000
    target_recall: float = 0.95
    batch_size: int = 32
    backend: str = "auto"
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        for encoding in self.encodings:
            encodings.check_encoding(encoding)
        if len(set(self.corpus)) <= self.k:
            raise InvalidInputError(f"the corpus needs more than k={self.k} distinct documents")
        if not 0 < self.target_recall <= 1:
            raise InvalidInputError(f"target recall must be within (0, 1], not {self.target_recall}")


def unique(texts: Sequence[str]) -> list[str]:
    """Texts in first-seen order without duplicates (a duplicate would be a tie, not a neighbour)."""
    return list(dict.fromkeys(texts))


def knn(
    queries: np.ndarray, docs: np.ndarray, encoding: str, dims: int, k: int, exclude: Sequence[int] | None
) -> np.ndarray:
    """Top-k document indices for every query (codes of `encoding`), scored in chunks of queries."""
    parts = []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start : start + QUERY_CHUNK]
        skip = None if exclude is None else exclude[start : start + QUERY_CHUNK]
        parts.append(retrieval.top_k(retrieval.scores(chunk, docs, encoding, dims), k, skip))
    return np.concatenate(parts)


def encode_corpus(vectors: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A corpus's codes and the ranges they used: int8/uint8 are calibrated on the corpus itself, as an index is."""
    ranges = encodings.calibration_ranges(vectors) if encoding in encodings.CALIBRATED else None
    return encodings.encode(vectors, encoding, ranges), ranges


def recommend(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """Smallest dims meeting the target per precision and encoding, and the fewest bytes overall.

    Label-free: recall@10 against the full-width neighbours >= target. Labelled (when pairs were
    given): labelled recall@10 >= target x the full-width fp32 float32 labelled recall@10, i.e. keeps
    that share of the best quality this artifact reaches on the user's own pairs.
    """
    variants = list(dict.fromkeys((r["precision"], r["encoding"]) for r in rows))
    full = max(
        (r for r in rows if r["encoding"] == "float32"),
        key=lambda r: (r["precision"] == "fp32", r["dims"]),
        default=None,
    )
    labelled_floor = None
    if full is not None and "labelled_recall_at_10" in full:
        labelled_floor = target * full["labelled_recall_at_10"]

    def smallest(metric: str, floor: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for key in variants:
            ok = [r["dims"] for r in rows if (r["precision"], r["encoding"]) == key and r[metric] >= floor]
            out[f"{key[0]}/{key[1]}"] = min(ok) if ok else None
        return out

    passing = [r for r in rows if r["recall_at_10"] >= target]
    best = min(passing, key=lambda r: (r["bytes_per_vector"], -r["recall_at_10"])) if passing else None
    return {
        "target_recall_at_10": target,
        "smallest_dims": smallest("recall_at_10", target),
        "fewest_bytes": None
        if best is None
        else {k: best[k] for k in ("precision", "dims", "encoding", "bytes_per_vector", "recall_at_10")},
        "labelled_floor": labelled_floor,
        "labelled_smallest_dims": None if labelled_floor is None else smallest("labelled_recall_at_10", labelled_floor),
    }


def _embed_timed(
    embedder: Embedder, texts: Sequence[str], dims: int, batch: int, prompt: str | None
) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = embedder.embed(texts, dims, prompt, batch_size=batch, truncate=True)
    return vectors, time.perf_counter() - start


def _prompt(embedder: Embedder, name: str) -> str | None:
    # Models trained with query/document prompts must get them here too, or quality is understated.
    return name if name in embedder.manifest.prompts else None


def run_tradeoff(config: TradeoffConfig, progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Embed the corpus with every profile, score every encoding; returns rows and extra facts."""
    manifest = load_manifest(config.artifact)
    precisions = config.precisions or tuple(manifest.precisions)
    missing = [p for p in precisions if p not in manifest.precisions]
    if missing:
        raise InvalidInputError(f"the artifact has no {missing[0]} profiles; it has {', '.join(manifest.precisions)}")
    docs = unique(config.corpus)
    labelled = bool(config.pairs)
    pool = unique([*docs, *(p.positive for p in config.pairs)]) if labelled else docs
    positive_index = {t: i for i, t in enumerate(pool)}
    query_rows = retrieval.sample_indices(len(docs), config.max_queries)
    reference_precision = "fp32" if "fp32" in manifest.precisions else manifest.precisions[0]
    full = max(manifest.dims)
    extra: dict[str, Any] = {
        "n_documents": len(docs),
        "duplicates_removed": len(config.corpus) - len(docs),
        "n_label_free_queries": len(query_rows),
        "n_pairs": len(config.pairs),
        "labelled_pool": len(pool) if labelled else None,
        "reference": f"{reference_precision} float32 at dims {full}",
        "full_dims": manifest.full_dims,
        "trained_dims": manifest.trained_dims,
    }
    if full != manifest.full_dims:
        progress(
            f"the widest profile has {full} dims, below the model's {manifest.full_dims}: recall is relative to {full}"
        )
    progress(f"embedding {len(docs)} documents with {reference_precision} at dims {full} (the reference)")
    reference = _reference_neighbours(config, docs, query_rows, reference_precision, full)
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        embedder = _load(config, precision)
        try:
            doc_prompt, query_prompt = _prompt(embedder, "document"), _prompt(embedder, "query")
            for dims in sorted(embedder.manifest.dims, reverse=True):
                progress(f"embedding {len(pool)} documents with {precision} at dims {dims}")
                before = memory.cpu_snapshot()
                vectors, seconds = _embed_timed(embedder, pool, dims, config.batch_size, doc_prompt)
                busy = memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1)
                queries = None
                if labelled:
                    queries, _ = _embed_timed(
                        embedder, [p.query for p in config.pairs], dims, config.batch_size, query_prompt
                    )
                embedded = Embedded(
                    precision=precision, dims=dims, pool=vectors, n_docs=len(docs), queries=queries,
                    seconds=seconds, other_load=busy,
                )  # fmt: skip
                rows += _score(config, embedded, reference, query_rows, positive_index)
        finally:
            embedder.close()
    rows.sort(key=lambda r: (precisions.index(r["precision"]), config.encodings.index(r["encoding"]), -r["dims"]))
    extra["recommendation"] = recommend(rows, config.target_recall)
    return rows, extra


@dataclass(frozen=True, kw_only=True)
class Embedded:
    """One profile's vectors of the whole pool (corpus first), the queries', and how long the pool took."""

    precision: str
    dims: int
    pool: np.ndarray
    n_docs: int
    queries: np.ndarray | None
    seconds: float
    other_load: float | None


def _reference_neighbours(
    config: TradeoffConfig, docs: list[str], query_rows: list[int], precision: str, dims: int
) -> np.ndarray:
    embedder = _load(config, precision)
    try:
        vectors = embedder.embed(docs, dims, _prompt(embedder, "document"), batch_size=config.batch_size, truncate=True)
    finally:
        embedder.close()
    return knn(vectors[query_rows], vectors, "float32", dims, config.k, query_rows)


def _score(
    config: TradeoffConfig,
    embedded: Embedded,
    reference: np.ndarray,
    query_rows: list[int],
    positive_index: dict[str, int],
) -> list[dict[str, Any]]:
    """One row per output encoding for one profile's vectors."""
    rows = []
    corpus = embedded.pool[: embedded.n_docs]
    for encoding in config.encodings:
        codes, _ = encode_corpus(corpus, encoding)
        found = knn(codes[query_rows], codes, encoding, embedded.dims, config.k, exclude=query_rows)
        size = encodings.bytes_per_vector(encoding, embedded.dims)
        row: dict[str, Any] = {
            "precision": embedded.precision,
            "dims": embedded.dims,
            "encoding": encoding,
            "bytes_per_vector": size,
            "index_bytes": size * embedded.n_docs,
            "recall_at_10": retrieval.neighbour_recall(found, reference),
            "encode_ms_per_text": 1000 * embedded.seconds / len(embedded.pool),
            "encode_texts_per_s": len(embedded.pool) / embedded.seconds,
            "other_load_cores": embedded.other_load,
        }
        if embedded.queries is not None:
            row.update(_labelled(embedded.pool, embedded.queries, config, positive_index, embedded.dims, encoding))
        rows.append(row)
    return rows


def recommendation_lines(rec: dict[str, Any], reference: str) -> list[str]:
    """The recommendation as the lines `mrl-bench tradeoff` prints under its table."""
    lines = [f"smallest dims with recall@10 >= {rec['target_recall_at_10']} against {reference}:"]
    lines += [f"  {variant}: {d if d else 'none meets the target'}" for variant, d in rec["smallest_dims"].items()]
    best = rec["fewest_bytes"]
    if best:
        lines.append(
            f"fewest bytes meeting it: {best['precision']} {best['encoding']} at dims {best['dims']} "
            f"({best['bytes_per_vector']} bytes/vector, recall@10 {best['recall_at_10']:.3f})"
        )
    if rec.get("labelled_smallest_dims") is not None:
        lines.append(
            f"smallest dims keeping {rec['target_recall_at_10']:.0%} of the full-width labelled recall@10 "
            f"(>= {rec['labelled_floor']:.3f}) on the pairs:"
        )
        lines += [f"  {variant}: {d if d else 'none'}" for variant, d in rec["labelled_smallest_dims"].items()]
    return lines


def _labelled(
    pool_vectors: np.ndarray,
    queries: np.ndarray,
    config: TradeoffConfig,
    positive_index: dict[str, int],
    dims: int,
    encoding: str,
) -> dict[str, float]:
    # Queries are quantised with the documents' int8 ranges: a real index fixes them at build time.
    docs, ranges = encode_corpus(pool_vectors, encoding)
    q = encodings.encode(queries, encoding, ranges)
    # A query whose exact text is also in the index would find itself first: leave that one out.
    own = [positive_index.get(p.query, -1) if p.query != p.positive else -1 for p in config.pairs]
    found = knn(q, docs, encoding, dims, config.k, exclude=own)
    ranks = retrieval.ranks_of(found, [positive_index[p.positive] for p in config.pairs])
    return {
        "labelled_recall_at_10": retrieval.recall_at_k(ranks, config.k),
        "mrr_at_10": retrieval.mrr_at_k(ranks, config.k),
    }


def _load(config: TradeoffConfig, precision: str) -> Embedder:
    # Every backend takes a thread count (GPU ones ignore it), whatever "auto" resolves to.
    return Embedder.load(config.artifact, config.backend, precision=precision, intra_op_threads=config.threads)


def tradeoff_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench tradeoff` prints."""
    labelled = any("mrr_at_10" in r for r in rows)
    headers = ["precision", "dims", "encoding", "bytes/vector", "index MB", "recall@10 vs full"]
    headers += ["recall@10 (pairs)", "MRR@10 (pairs)"] if labelled else []
    headers += ["encode ms/text", "texts/s", "other load"]
    body = []
    for r in rows:
        cells = [r["precision"], r["dims"], r["encoding"], r["bytes_per_vector"], r["index_bytes"] / 1e6]
        cells.append(f"{r['recall_at_10']:.3f}")
        if labelled:
            cells += [f"{r['labelled_recall_at_10']:.3f}", f"{r['mrr_at_10']:.3f}"]
        cells += [r["encode_ms_per_text"], r["encode_texts_per_s"], r.get("other_load_cores")]
        body.append(cells)
    return markdown_table(headers, body)
