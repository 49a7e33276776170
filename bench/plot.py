"""The trade-off plot: quality against dims, bytes per vector on a second axis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    variants = list(dict.fromkeys((r["precision"], r["encoding"]) for r in rows))
    for precision, encoding in variants:
        sel = sorted(
            (r for r in rows if (r["precision"], r["encoding"]) == (precision, encoding)), key=lambda r: r["dims"]
        )
        dims = [r["dims"] for r in sel]
        (line,) = ax.plot(dims, [r["recall_at_10"] for r in sel], marker="o", label=f"{precision}/{encoding} vs full")
        if "labelled_recall_at_10" in sel[0]:
            ax.plot(
                dims,
                [r["labelled_recall_at_10"] for r in sel],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"{precision}/{encoding} pairs",
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
    fig.tight_layout()
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
