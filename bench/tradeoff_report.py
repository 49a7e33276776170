"""What `mrl-bench tradeoff` prints: the single-stage and funnel tables, the Pareto front and the recommendations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mrl.bench.report import markdown_table


def tradeoff_text(rows: Sequence[dict[str, Any]], extra: Mapping[str, Any]) -> str:
    """Everything `mrl-bench tradeoff` prints on stdout, from its rows and extra facts."""
    n_vectors = (extra.get("search_cost") or {}).get("n_vectors")
    parts = [tradeoff_table(rows), "", *recommendation_lines(extra["recommendation"], extra["reference"])]
    designs = extra.get("design_recommendation")
    cost = extra.get("search_cost")
    if cost:
        parts += ["", f"Search cost: exact search of one query, {cost['kernel']}, over {cost['n_vectors']:,} synthetic"
                  f" codes; other load {cost['other_load_cores'] or 0:.2f} cores"]  # fmt: skip
    if extra.get("funnels"):
        parts += ["", "Funnels: shortlist in RAM, re-scored by the float query against vectors stored apart", ""]
        parts.append(funnel_table(extra["funnels"], n_vectors))
    if designs:
        metric = "labelled_recall_at_10" if designs.get("labelled_floor") is not None else "recall_at_10"
        parts += ["", "Pareto front: RAM bytes per vector against quality, single-stage and funnel designs", ""]
        parts += [front_table(designs["front"], metric, n_vectors), ""]
        parts += design_lines(designs, extra["reference"], n_vectors)
    return "\n".join(parts)


def tradeoff_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench tradeoff` prints."""
    labelled = any("mrr_at_10" in r for r in rows)
    headers = ["precision", "layers", "dims", "encoding", "bytes/vector", "index MB", "MFLOP/text", "recall@10 vs full"]
    headers += ["recall@10 (pairs)", "MRR@10 (pairs)"] if labelled else []
    headers += ["encode ms/text", "texts/s", "other load"]
    costed = any("query_ms" in r for r in rows)
    headers += ["search ms/query", "at 10M (extrapolated)"] if costed else []
    body = []
    for r in rows:
        cells = [r["precision"], r.get("layers") or "all", r["dims"], r["encoding"], r["bytes_per_vector"]]
        cells += [r["index_bytes"] / 1e6, None if r.get("flops_per_text") is None else r["flops_per_text"] / 1e6]
        cells.append(f"{r['recall_at_10']:.3f}")
        if labelled:
            cells += [f"{r['labelled_recall_at_10']:.3f}", f"{r['mrr_at_10']:.3f}"]
        cells += [r["encode_ms_per_text"], r["encode_texts_per_s"], r.get("other_load_cores")]
        cells += [f"{r['query_ms']:.3g}", f"{r['query_ms_10m']:.3g}"] if costed else []
        body.append(cells)
    return markdown_table(headers, body)


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
    if rec.get("cheapest"):
        lines.append(f"fewest FLOPs, then bytes, meeting it: {_cheapest_text(rec['cheapest'], 'recall_at_10')}")
    if rec.get("labelled_smallest_dims") is not None:
        lines.append(
            f"smallest dims keeping {rec['target_recall_at_10']:.0%} of the full-width labelled recall@10 "
            f"(>= {rec['labelled_floor']:.3f}) on the pairs:"
        )
        lines += [f"  {variant}: {d if d else 'none'}" for variant, d in rec["labelled_smallest_dims"].items()]
        best = rec.get("labelled_cheapest")
        lines.append(
            "fewest FLOPs, then bytes, keeping it: "
            + (_cheapest_text(best, "labelled_recall_at_10") if best else "none")
        )
    return lines


def _cheapest_text(best: dict[str, Any], metric: str) -> str:
    compute = "" if best["flops_per_text"] is None else f"{best['flops_per_text'] / 1e6:.0f} MFLOP/text, "
    return (
        f"{best['precision']} {best['encoding']} at {best['layers'] or 'all'} layers and dims {best['dims']} "
        f"({compute}{best['bytes_per_vector']} bytes/vector, {metric.replace('_at_', '@')} {best[metric]:.3f})"
    )


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.3g}"


def funnel_table(rows: Sequence[Mapping[str, Any]], n_vectors: int | None) -> str:
    """The Markdown table of every funnel `mrl-bench tradeoff` evaluated."""
    labelled = any("mrr_at_10" in r for r in rows)
    headers = ["precision", "layers", "shortlist", "k", "re-score", "RAM B/vector", "apart B/vector"]
    headers += ["recall@10 vs full"] + (["recall@10 (pairs)", "MRR@10 (pairs)"] if labelled else [])
    if n_vectors:
        headers += [f"ms/query at {n_vectors:,}", "ms/query at 10M (extrapolated)"]
    body = []
    for r in rows:
        cells = [r["precision"], r.get("layers") or "all", f"{r['shortlist_dims']}-d {r['shortlist_encoding']}"]
        cells += [r["k"], f"{r['rescore_dims']}-d {r['rescore_encoding']}"]
        cells += [r["ram_bytes_per_vector"], r["disk_bytes_per_vector"]]
        cells.append(f"{r['recall_at_10']:.3f}")
        if labelled:
            cells += [f"{r['labelled_recall_at_10']:.3f}", f"{r['mrr_at_10']:.3f}"]
        if n_vectors:
            cells += [_ms(r.get("query_ms")), _ms(r.get("query_ms_10m"))]
        body.append(cells)
    return markdown_table(headers, body)


def front_table(front: Sequence[Mapping[str, Any]], metric: str, n_vectors: int | None) -> str:
    """The Pareto front (design summaries: RAM bytes against quality) as a Markdown table, fewest bytes first."""
    labelled = metric == "labelled_recall_at_10"
    headers = ["design", "RAM B/vector", "apart B/vector", "recall@10 vs full"]
    headers += ["recall@10 (pairs)", "MRR@10 (pairs)", "share of full recall@10", "share of full MRR@10"] * labelled
    headers += [f"ms/query at {n_vectors:,}", "ms/query at 10M (extrapolated)"] if n_vectors else []
    body = []
    for d in front:
        cells = [d["label"], d["ram_bytes_per_vector"], d.get("disk_bytes_per_vector", 0), f"{d['recall_at_10']:.3f}"]
        if labelled:
            share = d.get("share_of_full") or {}
            cells += [f"{d['labelled_recall_at_10']:.3f}", f"{d['mrr_at_10']:.3f}"]
            cells += [_share(share.get("labelled_recall_at_10")), _share(share.get("mrr_at_10"))]
        body.append(cells + ([_ms(d.get("query_ms")), _ms(d.get("query_ms_10m"))] if n_vectors else []))
    return markdown_table(headers, body)


def _share(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def design_text(d: Mapping[str, Any], metric: str, n_vectors: int | None) -> str:
    """One design as the recommendation prints it: label, bytes, query cost, quality."""
    apart = d.get("disk_bytes_per_vector") or 0
    where = f" + {apart:,} B/vector stored apart" if apart else ""
    cost = ""
    if n_vectors and d.get("query_ms") is not None:
        cost = f", {d['query_ms']:.3g} ms/query at {n_vectors:,} vectors"
        cost += f", ~{d['query_ms_10m']:.3g} ms at 10M (extrapolated)"
    name = metric.replace("labelled_", "labelled ").replace("_at_", "@")
    share = (d.get("share_of_full") or {}).get(metric)
    kept = "" if share is None else f" = {share:.1%} of the full-width float's"
    return f"{d['label']} ({d['ram_bytes_per_vector']:,} B/vector in RAM{where}{cost}; {name} {d[metric]:.3f}{kept})"


def design_lines(rec: Mapping[str, Any], reference: str, n_vectors: int | None) -> list[str]:
    """The design recommendation as the lines `mrl-bench tradeoff` prints."""
    order = "RAM bytes/vector, then ms/query" if n_vectors else "RAM bytes/vector (query cost not measured)"
    best = rec["design"]
    lines = [
        f"cheapest design ({order}), single-stage or funnel, with recall@10 >= {rec['target_recall_at_10']} "
        f"against {reference}: " + (design_text(best, "recall_at_10", n_vectors) if best else "none"),
    ]
    if rec.get("labelled_floor") is not None:
        best = rec["labelled_design"]
        lines.append(
            f"cheapest design keeping {rec['target_recall_at_10']:.0%} of the full-width labelled recall@10 "
            f"(>= {rec['labelled_floor']:.3f}): "
            + (design_text(best, "labelled_recall_at_10", n_vectors) if best else "none")
        )
    return lines
