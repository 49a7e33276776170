"""Several configurations and exports timed in one engine run, and RSS per added dims profile (`mrl-bench memory`)."""

from __future__ import annotations

import pytest
from tinymodels import export

from mrl.bench.cli import main
from mrl.bench.engine import variant_skipped
from mrl.bench.footprint import add_growth
from mrl.bench.report import load_report
from mrl.bench.runners import Variant, parse_variant
from mrl.runtime import load_manifest


def test_variants_parse_from_text():
    assert parse_variant("old:graph=portable,disabled_optimizers=") == Variant(
        name="old", options={"graph": "portable", "disabled_optimizers": ()}
    )
    assert parse_variant("x:disabled_optimizers=A+B").options == {"disabled_optimizers": ("A", "B")}
    assert parse_variant("plain").options == {}
    for bad in (":graph=portable", "x:threads=2", "x:graph"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_a_variant_asking_for_missing_cpu_graphs_is_skipped(tiny_artifact):
    manifest = load_manifest(tiny_artifact)
    fused = Variant(name="fused", options={"graph": "optimized"})
    has_cpu_graphs = all(p.ort_cpu is not None for p in manifest.profiles)
    assert (variant_skipped(fused, manifest, "fp32") is None) == has_cpu_graphs
    assert variant_skipped(Variant(name="p", options={"graph": "portable"}), manifest, "fp32") is None
    assert variant_skipped(None, manifest, "fp32") is None


def test_engine_times_variants_and_another_export_in_one_run(tiny_st_dir, tiny_artifact, tmp_path, capsys):
    fused = export(tiny_st_dir, tmp_path / "fused", (8, 32), ("fp32",), ort_cpu="optimized")
    out = tmp_path / "engine.json"
    flags = "--dims 8 --batch-sizes 2 --seq-lens 8 --warmup 1 --repeats 2 --threads 1 --no-ceiling --settle-ms 1"
    argv = ["engine", str(fused), "--also", str(tiny_artifact), *flags.split(), "--out", str(out)]
    argv += ["--variant", "portable:graph=portable", "--variant", "fused:graph=optimized", "--baseline", "none"]
    assert main(argv) == 0
    rows = load_report(out)["results"]
    variants = sorted(r["variant"] for r in rows)
    assert "fused" in variants and "portable" in variants and "tiny portable" in variants
    assert ("tiny fused" in variants) == all(p.ort_cpu for p in load_manifest(tiny_artifact).profiles)
    assert "| onnxruntime [fused] | fp32 | 2 | 8 |" in capsys.readouterr().out  # 2 layers (all), 8 dims


def test_growth_is_rss_added_per_profile_over_one_profiles_weights():
    rows = [
        {"strategy": "s", "precision": "fp32", "rss_mib": 100.0, "weights_mib": 50.0},
        {"strategy": "s", "precision": "fp32", "rss_mib": 105.0, "weights_mib": 50.0},
        {"strategy": "t", "precision": "fp32", "rss_mib": 90.0, "weights_mib": 50.0},
    ]
    add_growth(rows)
    assert [r["added_mib"] for r in rows] == [None, 5.0, None]
    assert rows[1]["added_vs_weights"] == pytest.approx(0.1)


def test_memory_command_measures_each_strategy_in_its_own_process(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "memory.json"
    argv = ["memory", str(tiny_artifact), "--repeats", "1", "--batch-size", "4", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = load_report(out)["results"]
    assert {r["strategy"] for r in rows} == {"embedder", "sessions", "shared"}
    for strategy in ("embedder", "sessions", "shared"):
        mine = [r for r in rows if r["strategy"] == strategy]
        assert [r["profiles"] for r in mine] == [1, 2, 3] and [r["dims"] for r in mine] == [32, 16, 8]
        assert all(r["rss_mib"] > 0 and r["s"] > 0 for r in mine)
    assert "| embedder | fp32 | 3 | 8 |" in capsys.readouterr().out
