"""The one JSON schema of every command, its round trip, and the side-by-side comparison."""

import json

import pytest

from mrl.bench import env
from mrl.bench.report import (
    SCHEMA,
    ReportError,
    compare_reports,
    fmt,
    load_report,
    make_report,
    markdown_table,
    schema_problems,
    write_report,
)

LATENCY = {
    "n": 3,
    "mean_ms": 2.0,
    "std_ms": 1.0,
    "min_ms": 1.0,
    "p50_ms": 2.0,
    "p90_ms": 2.8,
    "p99_ms": 2.98,
    "max_ms": 3.0,
}


def engine_row(backend="onnxruntime", texts_per_s=100.0, **kw):
    row = {
        "backend": backend, "precision": "fp32", "dims": 32, "batch_size": 1, "seq_len": 16, "tokens_per_text": 16.0,
        "latency": LATENCY, "texts_per_s": texts_per_s, "tokens_per_s": 16 * texts_per_s, "peak_rss_mib": 500.0,
        "speedup": None, "flops_per_s": 1e9, "fraction_of_peak": 0.01,
    }  # fmt: skip
    return {**row, **kw}


def report(rows, kind="engine"):
    return make_report(kind, command=["mrl-bench", kind], environment=env.collect(), config={"x": 1}, results=rows)


def test_report_has_every_top_level_field_and_the_environment():
    r = report([engine_row()])
    assert r["schema"] == SCHEMA and r["kind"] == "engine"
    assert set(r) == {"schema", "kind", "created_at", "command", "environment", "config", "results", "extra"}
    e = r["environment"]
    assert e["cpu"]["usable_cores"] >= 1 and e["cpu"]["model"]
    assert "onnxruntime" in e["packages"] and e["packages"]["onnxruntime"]
    assert {"gpus", "torch_cuda", "toolkit_version", "artifact", "python"} <= e.keys()
    assert schema_problems(r) == []


def test_schema_problems_name_what_is_wrong():
    r = report([engine_row()])
    bad = {**r, "results": [{k: v for k, v in engine_row().items() if k != "texts_per_s"}]}
    assert any("texts_per_s" in p for p in schema_problems(bad))
    assert any("kind" in p for p in schema_problems({**r, "kind": "nope"}))
    assert any("schema" in p for p in schema_problems({**r, "schema": "other/2"}))
    assert schema_problems([]) == ["a report is a JSON object"]
    with pytest.raises(ReportError, match="latency lacks"):
        report([engine_row(latency={"n": 1})])


@pytest.mark.parametrize("kind", ["serve", "tradeoff"])
def test_other_kinds_require_their_columns(kind):
    with pytest.raises(ReportError, match="row 0 lacks"):
        report([{"concurrency": 1}], kind=kind)


def test_round_trip_writes_null_for_nan(tmp_path):
    r = report([engine_row(fraction_of_peak=float("nan"))])
    path = write_report(r, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["results"][0]["fraction_of_peak"] is None
    assert load_report(path)["results"][0]["texts_per_s"] == 100.0


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ReportError, match="not an mrl-bench report"):
        load_report(tmp_path / "x.json")
    with pytest.raises(ReportError, match="cannot read"):
        load_report(tmp_path / "missing.json")


def test_compare_side_by_side():
    a = report([engine_row(), engine_row(backend="pytorch", texts_per_s=50.0)])
    b = report([engine_row(texts_per_s=150.0), engine_row(dims=8)])
    text = compare_reports(a, b)
    line = next(line for line in text.splitlines() if line.startswith("| onnxruntime | fp32 | 32"))
    assert "| 100 | 150 | 1.5 |" in line
    assert "rows only in B" in text
    with pytest.raises(ReportError):
        compare_reports(a, {**b, "kind": "serve"})


def test_serve_reports_from_before_layers_pair_with_new_ones():
    def serve_row(texts_per_s, **kw):
        row = {"dims_mix": "default", "concurrency": 8, "requests": 10, "ok": 10, "errors": {}, "seconds": 1.0,
               "texts_per_s": texts_per_s, "latency": LATENCY}  # fmt: skip
        return {**row, **kw}

    old = report([serve_row(100.0)], kind="serve")  # written before layers_mix existed
    new = report([serve_row(120.0, layers_mix="default"), serve_row(200.0, layers_mix="3")], kind="serve")
    text = compare_reports(old, new)
    line = next(line for line in text.splitlines() if line.startswith("| default | default | 8"))
    assert "| 100 | 120 | 1.2 |" in line
    assert "1 rows only in B: [('default', '3', 8)]" in text


def test_markdown_and_number_formatting():
    assert fmt(None) == "–" and fmt(1234.5) == "1,234" and fmt(0.012345) == "0.0123" and fmt(True) == "yes"
    table = markdown_table(["a", "b"], [[1, 2.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.5 |"]
