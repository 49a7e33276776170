"""What `mrl-bench serve` reports: each row held against the offline rate, other targets, single dims and single
depths (each depth of a mix on its own too), as JSON fields and one Markdown table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from mrl.bench.stats import ratio


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput against its offline rate, against the first target's same level and mixes, for
    mixed dims against each single-dims mix of the same target, and for layers against each single depth
    (each depth of a mixed row on its own too: see `_compare_depths`)."""
    first = rows[0].get("target", "") if rows else ""
    same = {(r.get("target", ""), r["concurrency"], r["dims_mix"], r.get("layers_mix", "default")): r for r in rows}
    for row in rows:
        target, concurrency, layers = row.get("target", ""), row["concurrency"], row.get("layers_mix", "default")
        row["vs_offline"] = ratio(row["texts_per_s"], row.get("offline_texts_per_s"))
        p50, single = (row.get("latency") or {}).get("p50_ms"), row.get("offline_batch1_p50_ms")
        row["p50_over_offline_batch1_ms"] = None if p50 is None or single is None else p50 - single
        if target != first and (first, concurrency, row["dims_mix"], layers) in same:
            row["vs_first_target"] = ratio(
                row["texts_per_s"], same[first, concurrency, row["dims_mix"], layers]["texts_per_s"]
            )
        if "," in row["dims_mix"]:
            row["vs_single_dims"] = {
                mix: ratio(row["texts_per_s"], other["texts_per_s"])
                for (t, c, mix, n), other in same.items()
                if t == target and c == concurrency and n == layers and "," not in mix
            }
        if layers != "default":
            singles = {
                n: other
                for (t, c, mix, n), other in same.items()
                if (t, c, mix) == (target, concurrency, row["dims_mix"]) and n != "default" and "," not in n
            }
            row["vs_single_layers"] = {
                n: ratio(row["texts_per_s"], other["texts_per_s"]) for n, other in singles.items() if n != layers
            }
            _compare_depths(row, singles)


def _compare_depths(row: dict[str, Any], singles: dict[str, dict[str, Any]]) -> None:
    """For a mix of depths: each depth's texts/s and p50 in the mix against that depth alone, and the mix's
    texts/s against time-sharing the machine between the depths alone (in the mix's shares)."""
    by_layers = row.get("by_layers") or {}
    for depth, part in by_layers.items():
        alone = singles.get(depth)
        if alone is not None:
            part["vs_alone"] = ratio(part["texts_per_s"], alone["texts_per_s"])
            part["p50_vs_alone"] = ratio(_p50(part), _p50(alone))
    shares = Counter(row["layers_mix"].split(","))
    rates = {d: singles[d]["texts_per_s"] for d in shares if d in singles}
    if len(shares) > 1 and len(rates) == len(shares) and all(rates.values()):
        total = sum(shares.values())
        row["time_shared_texts_per_s"] = 1 / sum(shares[d] / total / rates[d] for d in shares)
        row["vs_time_shared"] = ratio(row["texts_per_s"], row["time_shared_texts_per_s"])


def _p50(row: dict[str, Any]) -> float | None:
    return (row.get("latency") or {}).get("p50_ms")


def _ratios(values: dict[str, float | None]) -> str | None:
    return ", ".join(f"{r:.2f} vs {m}" for m, r in values.items() if r is not None) or None


def _depths_cell(row: dict[str, Any]) -> str | None:
    """Each depth of a mixed row: its texts/s and p50, and both against that depth alone."""
    parts = []
    for depth, part in (row.get("by_layers") or {}).items():
        p50 = (part.get("latency") or {}).get("p50_ms")
        text = f"{depth}: {part['texts_per_s'] or 0:.1f}/s p50 {p50 or float('nan'):.1f} ms"
        if part.get("vs_alone") is not None and part.get("p50_vs_alone") is not None:
            text += f" ({part['vs_alone']:.2f}x texts/s, {part['p50_vs_alone']:.2f}x p50 of alone)"
        parts.append(text)
    if row.get("vs_time_shared") is not None:
        parts.append(f"all {row['vs_time_shared']:.2f}x time-shared")
    return "; ".join(parts) or None


def serve_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table `mrl-bench serve` prints."""
    from mrl.bench.report import markdown_table

    several = len({r.get("target", "") for r in rows}) > 1
    layered = any(r.get("layers_mix", "default") != "default" for r in rows)
    headers = [
        *(["target"] if several else []),
        "dims",
        *(["layers"] if layered else []),
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
        "p50 - offline 1-text ms",
        "vs single dims",
        *(["vs single layers", "each depth in the mix"] if layered else []),
        *(["vs first target"] if several else []),
        "other load",
    ]
    body = []
    for r in rows:
        lat = r["latency"] or {}
        vs_first = r.get("vs_first_target")
        body.append(
            [
                *([r.get("target", "")] if several else []),
                r["dims_mix"],
                *([r.get("layers_mix", "default")] if layered else []),
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
                r.get("p50_over_offline_batch1_ms"),
                _ratios(r.get("vs_single_dims") or {}),
                *([_ratios(r.get("vs_single_layers") or {}), _depths_cell(r)] if layered else []),
                *([None if vs_first is None else f"{vs_first:.2f}"] if several else []),
                r.get("other_load_cores"),
            ]
        )
    return markdown_table(headers, body)


def offline_note(offline: Sequence[dict[str, Any]]) -> str:
    """The line under the serve table naming the offline passes (empty without any)."""
    if not offline:
        return ""
    speeds = ", ".join(f"{o['texts_per_s']:.1f}" for o in offline)
    singles = ", ".join(f"{o['batch1_p50_ms']:.2f}" for o in offline)
    loads = ", ".join("–" if o["other_load_cores"] is None else f"{o['other_load_cores']:.2f}" for o in offline)
    return (
        f"\noffline Embedder before each level and after the last: batch 32 {speeds} texts/s; "
        f"one text p50 {singles} ms; other load {loads}"
    )
