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

from mrl.bench import flops, funnel, memory, retrieval, search_cost
from mrl.bench.engine import depth_keys
from mrl.bench.texts import Pair
from mrl.runtime import encodings
from mrl.runtime.embedder import Embedder
from mrl.runtime.errors import InvalidInputError
from mrl.runtime.manifest import load_manifest

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class TradeoffConfig:
    """What `mrl-bench tradeoff` evaluates."""

    artifact: Path
    corpus: tuple[str, ...]
    pairs: tuple[Pair, ...] = ()
    precisions: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None  # depths to evaluate (None: every depth the artifact serves)
    encodings: tuple[str, ...] = ("float32", "int8", "ubinary")
    k: int = 10
    max_queries: int = 1000
    target_recall: float = 0.95
    batch_size: int = 32
    backend: str = "auto"
    threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    shortlist_encodings: tuple[str, ...] = ("ubinary", "int8")
    shortlist_sizes: tuple[int, ...] = (50, 100, 200)  # () evaluates no funnels
    rescore_encodings: tuple[str, ...] = ("float32", "int8", "ubinary")
    cost_vectors: int = 1_000_000  # synthetic codes each query cost is measured on (0: not measured)

    def __post_init__(self) -> None:
        for encoding in (*self.encodings, *self.shortlist_encodings, *self.rescore_encodings):
            encodings.check_encoding(encoding)
        if any(k <= self.k for k in self.shortlist_sizes):
            raise InvalidInputError(f"shortlist sizes must exceed k={self.k}, got {list(self.shortlist_sizes)}")
        if self.cost_vectors and self.cost_vectors <= max((*self.shortlist_sizes, self.k)):
            raise InvalidInputError(
                f"query cost needs more synthetic vectors than the largest shortlist, not {self.cost_vectors}"
            )
        if len(set(self.corpus)) <= self.k:
            raise InvalidInputError(f"the corpus needs more than k={self.k} distinct documents")
        if not 0 < self.target_recall <= 1:
            raise InvalidInputError(f"target recall must be within (0, 1], not {self.target_recall}")


def unique(texts: Sequence[str]) -> list[str]:
    """Texts in first-seen order without duplicates (a duplicate would be a tie, not a neighbour)."""
    return list(dict.fromkeys(texts))


def variant(row: dict[str, Any]) -> str:
    """A row's precision and encoding, and its depth where it keeps fewer layers than the model has."""
    name = f"{row['precision']}/{row['encoding']}"
    return name if row.get("full_depth", True) else f"l{row['layers']} {name}"


def cost(row: dict[str, Any]) -> tuple[float, int]:
    """What a row costs, for "fewest FLOPs and bytes": compute per text first (the layer share where FLOPs are
    unknown), then bytes per vector."""
    flops_per_text = row.get("flops_per_text")
    return (row.get("layer_share", 1.0) if flops_per_text is None else flops_per_text, row["bytes_per_vector"])


def full_width_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The row quality is measured against: float32 vectors, full depth, fp32 where there is one, widest dims."""
    return max(
        (r for r in rows if r["encoding"] == "float32"),
        key=lambda r: (r.get("full_depth", True), r["precision"] == "fp32", r["dims"]),
        default=None,
    )


def recommend(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """Smallest dims meeting the target per variant, the fewest bytes, and the fewest FLOPs and bytes overall.

    Label-free: recall@10 against the full-width neighbours >= target. Labelled (when pairs were
    given): labelled recall@10 >= target x the full-depth, full-width fp32 float32 labelled recall@10,
    i.e. keeps that share of the best quality this artifact reaches on the user's own pairs.
    """
    variants = list(dict.fromkeys(variant(r) for r in rows))
    full = full_width_row(rows)
    labelled_floor = None
    if full is not None and "labelled_recall_at_10" in full:
        labelled_floor = target * full["labelled_recall_at_10"]

    def smallest(metric: str, floor: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in variants:
            ok = [r["dims"] for r in rows if variant(r) == name and r[metric] >= floor]
            out[name] = min(ok) if ok else None
        return out

    def cheapest(metric: str, floor: float | None) -> dict[str, Any] | None:
        passing = [r for r in rows if floor is not None and r[metric] >= floor]
        if not passing:
            return None
        best = min(passing, key=lambda r: (*cost(r), -r[metric]))
        keys = ("precision", "layers", "dims", "encoding", "bytes_per_vector", "flops_per_text", metric)
        return {k: best.get(k) for k in keys}

    passing = [r for r in rows if r["recall_at_10"] >= target]
    best = min(passing, key=lambda r: (r["bytes_per_vector"], -r["recall_at_10"])) if passing else None
    return {
        "target_recall_at_10": target,
        "smallest_dims": smallest("recall_at_10", target),
        "fewest_bytes": None
        if best is None
        else {k: best.get(k) for k in ("precision", "layers", "dims", "encoding", "bytes_per_vector", "recall_at_10")},
        "cheapest": cheapest("recall_at_10", target),
        "labelled_floor": labelled_floor,
        "labelled_smallest_dims": None if labelled_floor is None else smallest("labelled_recall_at_10", labelled_floor),
        "labelled_cheapest": cheapest("labelled_recall_at_10", labelled_floor),
    }


def _embed_timed(
    embedder: Embedder, texts: Sequence[str], dims: int, batch: int, prompt: str | None, layers: int | None
) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = embedder.embed(texts, dims, prompt, layers=layers, batch_size=batch, truncate=True)
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
    if config.cost_vectors:  # before any embedding: a size that cannot fit fails now, not after minutes of work
        every = (*config.encodings, *config.rescore_encodings) if config.shortlist_sizes else config.encodings
        search_cost.check_memory({(e, full) for e in every}, config.cost_vectors)
    extra: dict[str, Any] = {
        "n_documents": len(docs),
        "duplicates_removed": len(config.corpus) - len(docs),
        "n_label_free_queries": len(query_rows),
        "n_pairs": len(config.pairs),
        "labelled_pool": len(pool) if labelled else None,
        "reference": f"{reference_precision} float32 at dims {full}"
        + ("" if manifest.total_layers is None else f", {manifest.layers[-1]} of {manifest.total_layers} layers"),
        "full_dims": manifest.full_dims,
        "trained_dims": manifest.trained_dims,
    }
    if full != manifest.full_dims:
        progress(
            f"the widest profile has {full} dims, below the model's {manifest.full_dims}: recall is relative to {full}"
        )
    progress(f"embedding {len(docs)} documents with {reference_precision} at dims {full} (the reference)")
    reference = _reference_neighbours(config, docs, query_rows, reference_precision, full)
    depths = depth_keys(config.layers, manifest)
    model_config = flops.find_model_config(manifest.source.get("path"))
    rows: list[dict[str, Any]] = []
    funnel_rows: list[dict[str, Any]] = []
    for precision in precisions:
        embedder = _load(config, precision)
        try:
            tokens = float(np.mean([e.n_tokens for e in embedder.tokenizer.encode(pool, truncate=True)]))
            for depth in depths:
                layers = depth or manifest.total_layers
                per_token = None if model_config is None else flops.flops_per_token(model_config, tokens, depth)
                facts = {
                    "layers": layers,
                    "full_depth": depth is None,
                    "layer_share": 1.0 if depth is None else depth / (manifest.total_layers or depth),
                    "flops_per_text": None if per_token is None else per_token * tokens,
                }
                group: dict[int, Embedded] = {}
                for dims in sorted({p.dims for p in embedder.profiles if p.layers == depth}, reverse=True):
                    progress(
                        f"embedding {len(pool)} documents with {precision} at {layers or 'all'} layers, dims {dims}"
                    )
                    group[dims] = _embed_profile(config, embedder, pool, depth, dims, facts)
                    rows += _score(config, group[dims], reference, query_rows, positive_index)
                funnel_rows += _score_funnels(config, group, reference, query_rows, positive_index, progress)
        finally:
            embedder.close()
    rows.sort(
        key=lambda r: (
            precisions.index(r["precision"]),
            -r["layer_share"],
            config.encodings.index(r["encoding"]),
            -r["dims"],
        )
    )
    extra["recommendation"] = recommend(rows, config.target_recall)
    return _with_designs(config, rows, funnel_rows, extra, progress)


def _with_designs(
    config: TradeoffConfig, rows: list[dict[str, Any]], funnel_rows: list[dict[str, Any]], extra: dict[str, Any],
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Rows and extra facts with each design's query cost, the funnels, and the design recommendation."""
    if config.cost_vectors:
        scans, rescores = search_cost.needs([*rows, *funnel_rows], config.k)
        costs = search_cost.measure(scans, rescores, n_vectors=config.cost_vectors, final_k=config.k, progress=progress)
        rows = search_cost.with_costs(rows, costs, config.k)
        funnel_rows = search_cost.with_costs(funnel_rows, costs, config.k)
        extra["search_cost"] = costs.as_json()
    extra["funnels"] = funnel_rows
    designs = [*rows, *funnel_rows]
    extra["design_recommendation"] = funnel.recommend(designs, config.target_recall, full_width_row(rows))
    return rows, extra


def _score_funnels(
    config: TradeoffConfig, group: dict[int, Embedded], reference: np.ndarray, query_rows: list[int],
    positive_index: dict[str, int], progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per funnel over one profile's dims (all from the same forward pass of the same depth)."""
    designs = funnel.funnels(list(group), config.shortlist_encodings, config.shortlist_sizes, config.rescore_encodings)
    if not designs:
        return []
    first = next(iter(group.values()))
    progress(f"searching {len(designs)} funnels with {first.precision} at {first.facts['layers'] or 'all'} layers")
    free = {
        d: funnel.SearchSet(docs=e.pool[: e.n_docs], queries=e.pool[query_rows], exclude=query_rows)
        for d, e in group.items()
    }
    labelled, relevant = None, None
    if config.pairs:
        own = _own_rows(config, positive_index)
        labelled = {d: funnel.SearchSet(docs=e.pool, queries=e.queries, exclude=own) for d, e in group.items()}
        relevant = [positive_index[p.positive] for p in config.pairs]
    rows = funnel.evaluate(designs, free, reference, labelled, relevant, config.k)
    return [{"precision": first.precision, **first.facts, **r} for r in rows]


def _own_rows(config: TradeoffConfig, positive_index: dict[str, int]) -> list[int]:
    # A query whose exact text is also in the index would find itself first: leave that one out.
    return [positive_index.get(p.query, -1) if p.query != p.positive else -1 for p in config.pairs]


def _embed_profile(
    config: TradeoffConfig, embedder: Embedder, pool: list[str], depth: int | None, dims: int, facts: dict[str, Any]
) -> Embedded:
    """Embed the pool (timed) and the queries with one profile."""
    before = memory.cpu_snapshot()
    vectors, seconds = _embed_timed(embedder, pool, dims, config.batch_size, _prompt(embedder, "document"), depth)
    busy = memory.other_load(before, memory.cpu_snapshot(), os.cpu_count() or 1)
    queries = None
    if config.pairs:
        query_texts = [p.query for p in config.pairs]
        queries, _ = _embed_timed(embedder, query_texts, dims, config.batch_size, _prompt(embedder, "query"), depth)
    return Embedded(
        precision=embedder.precision, dims=dims, pool=vectors, n_docs=len(unique(config.corpus)), queries=queries,
        seconds=seconds, other_load=busy, facts=facts,
    )  # fmt: skip


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
    facts: dict[str, Any]  # the profile's depth: layers, full_depth, layer_share, flops_per_text


def _reference_neighbours(
    config: TradeoffConfig, docs: list[str], query_rows: list[int], precision: str, dims: int
) -> np.ndarray:
    embedder = _load(config, precision)
    try:
        vectors = embedder.embed(docs, dims, _prompt(embedder, "document"), batch_size=config.batch_size, truncate=True)
    finally:
        embedder.close()
    return retrieval.knn(vectors[query_rows], vectors, "float32", dims, config.k, query_rows)


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
        codes, _ = retrieval.encode_corpus(corpus, encoding)
        found = retrieval.knn(codes[query_rows], codes, encoding, embedded.dims, config.k, exclude=query_rows)
        size = encodings.bytes_per_vector(encoding, embedded.dims)
        row: dict[str, Any] = {
            "design": "single",
            "precision": embedded.precision,
            **embedded.facts,
            "dims": embedded.dims,
            "encoding": encoding,
            "bytes_per_vector": size,
            "ram_bytes_per_vector": size,
            "disk_bytes_per_vector": 0,
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


def _labelled(
    pool_vectors: np.ndarray,
    queries: np.ndarray,
    config: TradeoffConfig,
    positive_index: dict[str, int],
    dims: int,
    encoding: str,
) -> dict[str, float]:
    # Queries are quantised with the documents' int8 ranges: a real index fixes them at build time.
    docs, ranges = retrieval.encode_corpus(pool_vectors, encoding)
    q = encodings.encode(queries, encoding, ranges)
    found = retrieval.knn(q, docs, encoding, dims, config.k, exclude=_own_rows(config, positive_index))
    ranks = retrieval.ranks_of(found, [positive_index[p.positive] for p in config.pairs])
    return {
        "labelled_recall_at_10": retrieval.recall_at_k(ranks, config.k),
        "mrr_at_10": retrieval.mrr_at_k(ranks, config.k),
    }


def _load(config: TradeoffConfig, precision: str) -> Embedder:
    # Every backend takes a thread count (GPU ones ignore it), whatever "auto" resolves to.
    return Embedder.load(config.artifact, config.backend, precision=precision, intra_op_threads=config.threads)
