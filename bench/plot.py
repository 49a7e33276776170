"""The trade-off plots: quality against dims, against encode speed, and against RAM bytes per design."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrl.bench.tradeoff import variant
from mrl.runtime.errors import BackendUnavailableError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BackendUnavailableError("the plot needs matplotlib: pip install 'mrl-toolkit[bench]'") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, *, target: float, title: str) -> Path:
    """Write a PNG: recall@10 per precision/encoding against dims, bytes per vector on the right axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    bytes_ax = ax.twinx()
    for name in dict.fromkeys(variant(r) for r in rows):
        sel = sorted((r for r in rows if variant(r) == name), key=lambda r: r["dims"])
        dims = [r["dims"] for r in sel]
        (line,) = ax.plot(dims, [r["recall_at_10"] for r in sel], marker="o", label=f"{name} vs full")
        if "labelled_recall_at_10" in sel[0]:
            ax.plot(
                dims,
                [r["labelled_recall_at_10"] for r in sel],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"{name} pairs",
            )
    for encoding in dict.fromkeys(r["encoding"] for r in rows):
        sel = sorted({r["dims"]: r["bytes_per_vector"] for r in rows if r["encoding"] == encoding}.items())
        bytes_ax.plot([d for d, _ in sel], [b for _, b in sel], color="grey", linestyle=":", marker=".")
        bytes_ax.annotate(encoding, sel[-1], textcoords="offset points", xytext=(4, 0), fontsize=8, color="grey")
    ax.axhline(target, color="red", linewidth=0.8, linestyle="-.", label=f"target {target:g}")
    ax.set_xscale("log", base=2)
    all_dims = sorted({r["dims"] for r in rows})
    ax.set_xticks(all_dims, [str(d) for d in all_dims])
    ax.set_xlabel("dims")
    ax.set_ylabel("recall@10")
    ax.set_ylim(0, 1.02)
    bytes_ax.set_yscale("log")
    bytes_ax.set_ylabel("bytes per vector (dotted)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_quality_speed(rows: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Write a PNG: quality against measured texts/s, one point per (layers, dims) profile and precision.

    Quality is the labelled recall@10 where pairs were given, else recall@10 against the full
    model's neighbours; float32 vectors only (the output encoding changes bytes, not speed).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    metric = "labelled_recall_at_10" if any("labelled_recall_at_10" in r for r in rows) else "recall_at_10"
    points = [r for r in rows if r["encoding"] == "float32"]
    markers = "osD^v<>"
    depths = sorted({r.get("layers") or 0 for r in points}, reverse=True)
    colors = plt.get_cmap("viridis")
    for i, precision in enumerate(dict.fromkeys(r["precision"] for r in points)):
        for j, depth in enumerate(depths):
            sel = sorted(
                (r for r in points if r["precision"] == precision and (r.get("layers") or 0) == depth),
                key=lambda r: r["dims"],
            )
            if not sel:
                continue
            xs, ys = [r["encode_texts_per_s"] for r in sel], [r[metric] for r in sel]
            color = colors(j / max(1, len(depths) - 1) * 0.9)  # one colour per depth, one marker per precision
            ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="", color=color,
                    label=f"{precision}, {depth or 'all'} layers")  # fmt: skip
            for r, x, y in zip(sel, xs, ys, strict=True):
                ax.annotate(f"d{r['dims']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("texts/s (measured: the whole corpus, batch 32)")
    ax.set_ylabel("recall@10 on the pairs" if metric == "labelled_recall_at_10" else "recall@10 vs full")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_designs(designs: Sequence[dict[str, Any]], rec: dict[str, Any], path: Path, *, title: str) -> Path:
    """Write a PNG: quality against RAM bytes per vector for every single-stage and funnel design, with the
    Pareto front and the recommended design (`rec`: `funnel.recommend`'s result)."""
    plt = _pyplot()
    labelled = rec.get("labelled_floor") is not None
    metric = "labelled_recall_at_10" if labelled else "recall_at_10"
    floor = rec["labelled_floor"] if labelled else rec["target_recall_at_10"]
    best = rec["labelled_design"] if labelled else rec["design"]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for kind, marker, color in (("single", "o", "tab:blue"), ("funnel", "^", "tab:orange")):
        sel = [d for d in designs if d.get("design", "single") == kind and d.get(metric) is not None]
        if sel:
            xs, ys = [d["ram_bytes_per_vector"] for d in sel], [d[metric] for d in sel]
            name = "single-stage" if kind == "single" else "funnel"
            ax.scatter(xs, ys, marker=marker, s=18, alpha=0.45, color=color, label=f"{name} ({len(sel)})")
    front = rec["front"]
    ax.step(
        [d["ram_bytes_per_vector"] for d in front], [d[metric] for d in front], where="post", color="black",
        linewidth=1, label="Pareto front",
    )  # fmt: skip
    for i, d in enumerate(front):  # labels alternate below and above the front so neighbours do not overlap
        ax.annotate(d["label"], (d["ram_bytes_per_vector"], d[metric]), textcoords="offset points",
                    xytext=(4, -10 if i % 2 == 0 else 6), fontsize=6)  # fmt: skip
    if best:
        ax.scatter([best["ram_bytes_per_vector"]], [best[metric]], marker="*", s=220, color="red", zorder=5,
                   label=f"recommended: {best['label']}")  # fmt: skip
    ax.axhline(floor, color="red", linewidth=0.8, linestyle="-.", label=f"target {floor:.3g}")
    ax.set_xscale("log", base=2)
    ticks = sorted({d["ram_bytes_per_vector"] for d in designs})
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel("bytes per vector in RAM (the index; a funnel's re-score vectors are stored apart)")
    ax.set_ylabel("recall@10 on the pairs" if labelled else "recall@10 vs full")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)
