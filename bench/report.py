"""One JSON schema for every `mrl-bench` command, its Markdown rendering, and side-by-side comparison."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.runtime.errors import MrlError

SCHEMA = "mrl-bench/1"
TOP_LEVEL = ("schema", "kind", "created_at", "command", "environment", "config", "results", "extra")


class ReportError(MrlError):
    """A benchmark JSON file that is unreadable or does not follow the schema."""


@dataclass(frozen=True, kw_only=True)
class Kind:
    """What the rows of one command hold: the columns naming a row, every required column, what to compare."""

    key: tuple[str, ...]
    required: tuple[str, ...]
    compare: tuple[str, ...]
    key_defaults: Mapping[str, Any] = field(default_factory=dict)
    """What a key column means in rows written before it existed (so old reports still pair with new ones)."""


KINDS: dict[str, Kind] = {
    "engine": Kind(
        key=("backend", "variant", "precision", "dims", "batch_size", "seq_len"),
        required=(
            "backend",
            "precision",
            "dims",
            "batch_size",
            "seq_len",
            "tokens_per_text",
            "latency",
            "texts_per_s",
            "tokens_per_s",
            "peak_rss_mib",
            "speedup",
            "flops_per_s",
            "fraction_of_peak",
        ),
        compare=("texts_per_s", "p50_ms", "p99_ms"),
    ),
    "serve": Kind(
        key=("dims_mix", "layers_mix", "concurrency"),
        required=("dims_mix", "concurrency", "requests", "ok", "errors", "seconds", "texts_per_s", "latency"),
        compare=("texts_per_s", "p50_ms", "p99_ms"),
        key_defaults={"layers_mix": "default"},
    ),
    "tradeoff": Kind(
        key=("precision", "dims", "encoding"),
        required=(
            "precision",
            "dims",
            "encoding",
            "bytes_per_vector",
            "index_bytes",
            "recall_at_10",
            "encode_ms_per_text",
        ),
        compare=("recall_at_10", "mrr_at_10", "encode_ms_per_text"),
    ),
    "memory": Kind(
        key=("strategy", "precision", "profiles"),
        required=("strategy", "precision", "profiles", "dims", "rss_mib", "added_mib", "weights_mib", "s"),
        compare=("rss_mib", "added_mib"),
    ),
}
LATENCY_KEYS = ("n", "mean_ms", "p50_ms", "p90_ms", "p99_ms")


def make_report(
    kind: str,
    *,
    command: Sequence[str],
    environment: Mapping[str, Any],
    config: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a report and check it against the schema."""
    report = {
        "schema": SCHEMA,
        "kind": kind,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(command),
        "environment": dict(environment),
        "config": dict(config),
        "results": [dict(r) for r in results],
        "extra": dict(extra or {}),
    }
    problems = schema_problems(report)
    if problems:
        raise ReportError("report does not follow the schema: " + "; ".join(problems))
    return report


def schema_problems(report: Any) -> list[str]:
    """Every way `report` departs from the schema (empty when it follows it)."""
    if not isinstance(report, dict):
        return ["a report is a JSON object"]
    problems = [f"missing {k!r}" for k in TOP_LEVEL if k not in report]
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    kind = KINDS.get(report.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        problems.append(f"kind {report.get('kind')!r} is not one of {', '.join(KINDS)}")
        return problems
    env = report.get("environment")
    if not isinstance(env, dict) or not {"toolkit_version", "cpu", "packages"} <= env.keys():
        problems.append("environment lacks toolkit_version, cpu or packages")
    results = report.get("results")
    if not isinstance(results, list):
        return [*problems, "results is not a list"]
    for i, row in enumerate(results):
        missing = [k for k in kind.required if k not in row]
        if missing:
            problems.append(f"row {i} lacks {', '.join(missing)}")
        latency = row.get("latency")
        if "latency" in kind.required and isinstance(latency, dict):
            lacking = [k for k in LATENCY_KEYS if k not in latency]
            if lacking:
                problems.append(f"row {i} latency lacks {', '.join(lacking)}")
    return problems


def _finite(value: Any) -> Any:
    # JSON has no NaN or Infinity; write null so every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(report: Mapping[str, Any], path: Path) -> Path:
    """Write the report as indented JSON."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(dict(report)), indent=2) + "\n")
    return path


def load_report(path: Path) -> dict[str, Any]:
    """Read and check a report written by `mrl-bench`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    problems = schema_problems(data)
    if problems:
        raise ReportError(f"{path} is not an mrl-bench report: {problems[0]}")
    return data


def metric(row: Mapping[str, Any], name: str) -> Any:
    """A row's value by name, looking into its latency summary for `*_ms` names."""
    if name in row:
        return row[name]
    latency = row.get("latency")
    return latency.get(name) if isinstance(latency, dict) else None


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to `digits` significant figures, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value == 0 or abs(value) >= 10 ** (digits - 1):
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "0"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Side-by-side Markdown of two reports of one kind, matched row by row on the key columns."""
    if a["kind"] != b["kind"]:
        raise ReportError(f"cannot compare a {a['kind']} report with a {b['kind']} report")
    kind = KINDS[a["kind"]]
    # Key columns no row of either report sets (e.g. `variant` in reports written before it existed) are left out.
    key = [k for k in kind.key if any(k in r for r in [*a["results"], *b["results"]])]

    def key_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(k, kind.key_defaults.get(k)) for k in key)

    rows_b = {key_of(r): r for r in b["results"]}
    headers = [*key]
    for m in kind.compare:
        headers += [f"{m} A", f"{m} B", "B/A"]
    rows = []
    seen = set()
    for ra in a["results"]:
        row_key = key_of(ra)
        seen.add(row_key)
        rb = rows_b.get(row_key, {})
        cells: list[Any] = list(row_key)
        for m in kind.compare:
            va, vb = metric(ra, m), metric(rb, m)
            both = isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va
            cells += [va, vb, vb / va if both else None]
        rows.append(cells)
    only_b = [k for k in rows_b if k not in seen]
    env_a, env_b = a["environment"], b["environment"]
    head = [
        f"A: {a['created_at']}  {_machine(env_a)}",
        f"B: {b['created_at']}  {_machine(env_b)}",
        "",
    ]
    tail = [f"\n{len(only_b)} rows only in B: {only_b}"] if only_b else []
    return "\n".join([*head, markdown_table(headers, rows), *tail])


def _machine(env: Mapping[str, Any]) -> str:
    cpu = env.get("cpu") or {}
    gpus = ", ".join(g.get("name") or "?" for g in env.get("gpus") or []) or "no GPU"
    return f"{cpu.get('model')} ({cpu.get('usable_cores')} cores), {gpus}"
