"""`mrl-bench` over the (layers x dims) grid of a 2D Matryoshka artifact: engine, trade-off, recommendation, plot."""

from __future__ import annotations

import pytest

from mrl.bench.cli import main
from mrl.bench.engine import EngineConfig, depth_keys, run_engine
from mrl.bench.plot import plot_quality_speed
from mrl.bench.texts import Pair, passage_sentences
from mrl.bench.tradeoff import TradeoffConfig, recommend, run_tradeoff
from mrl.bench.tradeoff_report import tradeoff_table
from mrl.runtime import load_manifest
from mrl.runtime.errors import InvalidInputError

DOCS = passage_sentences() + [f"note {i} about the {w}" for i, w in enumerate(["mill", "river", "train", "bread"] * 5)]


@pytest.fixture(scope="module")
def tradeoff_2d(tiny_2d_artifact):
    pairs = (Pair(query="Who opens a shop before sunrise?", positive=DOCS[8]), Pair(query=DOCS[0], positive=DOCS[1]))
    config = TradeoffConfig(
        artifact=tiny_2d_artifact, corpus=tuple(DOCS), pairs=pairs, max_queries=20, threads=1, encodings=("float32",)
    )
    return run_tradeoff(config, lambda _: None)


def test_depth_keys(tiny_2d_artifact):
    manifest = load_manifest(tiny_2d_artifact)
    assert depth_keys(None, manifest) == [None, 1]
    assert depth_keys((1, 3), manifest) == [None, 1] and depth_keys((1,), manifest) == [1]
    with pytest.raises(InvalidInputError, match="no profiles that keep 2 layers; it serves 1, 3"):
        depth_keys((2, 3), manifest)


def test_tradeoff_covers_the_layers_by_dims_grid(tradeoff_2d):
    rows, extra = tradeoff_2d
    assert {(r["layers"], r["dims"]) for r in rows} == {(n, d) for n in (1, 3) for d in (8, 16, 32)}
    full = next(r for r in rows if r["layers"] == 3 and r["dims"] == 32)
    assert full["recall_at_10"] == 1.0 and full["full_depth"] and full["layer_share"] == 1.0
    shallow = next(r for r in rows if r["layers"] == 1 and r["dims"] == 32)
    assert shallow["recall_at_10"] < 1.0 and not shallow["full_depth"]
    assert shallow["layer_share"] == pytest.approx(1 / 3)
    assert shallow["flops_per_text"] == pytest.approx(full["flops_per_text"] / 3)  # same texts, a third of the layers
    assert "3 of 3 layers" in extra["reference"]
    rec = extra["recommendation"]
    assert set(rec["smallest_dims"]) == {"fp32/float32", "l1 fp32/float32"}
    assert rec["cheapest"] is not None and "| fp32 | 1 | 32 | float32 |" in tradeoff_table(rows)


def test_recommendation_takes_fewest_flops_then_bytes():
    def row(layers, dims, recall, full_depth=False):
        return {
            "precision": "fp32", "encoding": "float32", "layers": layers, "full_depth": full_depth, "dims": dims,
            "bytes_per_vector": 4 * dims, "flops_per_text": 1e6 * layers, "layer_share": layers / 6,
            "recall_at_10": recall, "labelled_recall_at_10": recall,
        }  # fmt: skip

    rows = [row(6, 256, 1.0, True), row(6, 64, 0.97, True), row(3, 256, 0.96), row(3, 64, 0.90), row(1, 256, 0.5)]
    rec = recommend(rows, 0.95)
    assert rec["fewest_bytes"]["dims"] == 64 and rec["fewest_bytes"]["layers"] == 6  # bytes alone
    assert (rec["cheapest"]["layers"], rec["cheapest"]["dims"]) == (3, 256)  # FLOPs first, then bytes
    assert rec["smallest_dims"] == {"fp32/float32": 64, "l3 fp32/float32": 256, "l1 fp32/float32": None}
    assert rec["labelled_floor"] == pytest.approx(0.95) and rec["labelled_cheapest"]["layers"] == 3
    for r in rows:  # without a model config the layer share stands in for FLOPs
        r["flops_per_text"] = None
    assert recommend(rows, 0.95)["cheapest"]["layers"] == 3


def test_quality_speed_plot(tradeoff_2d, tmp_path):
    rows, _ = tradeoff_2d
    path = plot_quality_speed(rows, tmp_path / "speed.png", title="tiny 2d")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_engine_runs_each_depth_beside_the_others(tiny_2d_artifact):
    config = EngineConfig(
        artifact=tiny_2d_artifact, dims=(16,), batch_sizes=(2,), seq_lens=(8,), warmup=1, repeats=2, threads=1,
        settle_ms=0, ceiling=False,
    )  # fmt: skip
    rows, _ = run_engine(config, lambda _: None)
    by = {(r["backend"], r["layers"]): r for r in rows}
    assert set(by) == {("onnxruntime", 3), ("onnxruntime", 1), ("pytorch", 3)}
    shallow, full = by[("onnxruntime", 1)], by[("onnxruntime", 3)]
    assert shallow["vs_full_depth"] == pytest.approx(shallow["texts_per_s"] / full["texts_per_s"])
    assert shallow["speedup"] is None and full["speedup"]["vs"] == "pytorch fp32 cpu"
    # quality is checked within a depth: the 1-layer runner is its own reference, the full one PyTorch's
    assert shallow["cosine_vs_reference"]["reference"] == "onnxruntime fp32 l1"
    assert full["cosine_vs_reference"]["reference"] == "pytorch fp32" and full["cosine_vs_reference"]["min"] > 0.9999
    assert shallow["flops_per_token"] == pytest.approx(full["flops_per_token"] / 3)


def test_cli_layers_flags(tiny_2d_artifact, tmp_path, capsys):
    flags = "--dims 16 --batch-sizes 2 --seq-lens 8 --warmup 1 --repeats 2 --threads 1 --no-ceiling --baseline none"
    argv = ["engine", str(tiny_2d_artifact), *flags.split(), "--layers", "1", "--out", str(tmp_path / "e.json")]
    assert main(argv) == 0
    assert "| onnxruntime | fp32 | 1 | 16 | 2 | 8 |" in capsys.readouterr().out
    assert main([*argv[:-4], "--layers", "2", "--out", str(tmp_path / "f.json")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no profiles that keep 2 layers" in errors[0]
