"""`mrl-bench serve` with mixes of depths: the round robin, each depth's share of a mixed level against that
depth alone, and a real `mrl-serve` over the tiny 2D artifact."""

import asyncio
from collections import Counter

import pytest

from mrl.bench.load import Outcome, ServeConfig, dims_for, layers_for
from mrl.bench.serve import level_row, sweep
from mrl.bench.serve_report import add_comparisons, serve_table
from mrl.bench.targets import TargetSpec
from mrl.runtime.errors import InvalidInputError

TEXTS = ("the river runs past the mill", "a small library on the square", "the first train leaves at six")


def test_layers_mix_is_a_round_robin_that_covers_every_dims_and_layers_pair_evenly():
    assert [layers_for((3, 6), i) for i in range(4)] == [3, 6, 3, 6]
    assert layers_for(None, 3) is None
    pairs = Counter((dims_for((64, 256), i), layers_for((3, 6), i, (64, 256))) for i in range(40))
    assert pairs == {(64, 3): 10, (256, 3): 10, (64, 6): 10, (256, 6): 10}


def test_a_mixed_level_reports_each_depth_apart():
    # Concurrency 1: request i sent at i, answered at i + 1 (depth 3) or i + 3 (depth 6) seconds later.
    outcomes, t = [], 0.0
    for i in range(8):
        layers = layers_for((3, 6), i)
        took = 1.0 if layers == 3 else 3.0
        outcomes.append(Outcome(index=i, sent_at=t, done_at=t + took, code="OK", texts=1, layers=layers))
        t += took
    row = level_row([outcomes], warmup=0, concurrency=1, mix=None, layers_mix=(3, 6))
    assert row["layers_mix"] == "3,6" and set(row["by_layers"]) == {"3", "6"}
    three, six = row["by_layers"]["3"], row["by_layers"]["6"]
    assert three["latency"]["p50_ms"] == pytest.approx(1000.0) and six["latency"]["p50_ms"] == pytest.approx(3000.0)
    assert three["ok"] == six["ok"] == 4
    # Sent at 0, 1, 4, 5, 8, 9, 12, 13: the window is (0, 13], holding seven answers, four of depth 3.
    assert three["texts_per_s"] == pytest.approx(4 / 13) and six["texts_per_s"] == pytest.approx(3 / 13)
    assert row["texts_per_s"] == pytest.approx(three["texts_per_s"] + six["texts_per_s"])
    assert "by_layers" not in level_row([outcomes], warmup=0, concurrency=1, mix=None, layers_mix=(3,))


def test_depths_are_held_against_each_other_and_each_against_itself_alone():
    def row(layers, texts_per_s, p50, **extra):
        return {"dims_mix": "default", "layers_mix": layers, "concurrency": 8, "texts_per_s": texts_per_s,
                "latency": {"p50_ms": p50}, **extra}  # fmt: skip

    by_layers = {"3": {"texts_per_s": 90.0, "latency": {"p50_ms": 60.0}}, "6": {"texts_per_s": 90.0, "latency": {}}}
    rows = [row("3", 200.0, 40.0), row("6", 100.0, 80.0), row("3,6", 180.0, 70.0, by_layers=by_layers)]
    add_comparisons(rows)
    assert rows[0]["vs_single_layers"] == {"6": 2.0} and rows[1]["vs_single_layers"] == {"3": 0.5}
    assert rows[2]["vs_single_layers"] == {"3": 0.9, "6": 1.8}
    assert by_layers["3"]["vs_alone"] == pytest.approx(0.45) and by_layers["3"]["p50_vs_alone"] == pytest.approx(1.5)
    assert by_layers["6"]["vs_alone"] == pytest.approx(0.9) and by_layers["6"]["p50_vs_alone"] is None
    # Half the texts at 200/s and half at 100/s, one after the other: 133.3/s.
    assert rows[2]["time_shared_texts_per_s"] == pytest.approx(400 / 3)
    assert rows[2]["vs_time_shared"] == pytest.approx(180 / (400 / 3))
    skewed = row("3,6,6,6", 120.0, 70.0, by_layers={"3": {"texts_per_s": 30.0}, "6": {"texts_per_s": 90.0}})
    add_comparisons([*rows, skewed])
    assert skewed["time_shared_texts_per_s"] == pytest.approx(1 / (0.25 / 200 + 0.75 / 100))  # 114.3/s
    table = serve_table([{**r, "ok": 1, "errors": {}, "server_queue_ms_mean": None} for r in rows])
    assert "| layers |" in table and "0.45x texts/s, 1.50x p50 of alone" in table and "2.00 vs 6" in table


def test_layers_mixes_are_refused_for_triton_targets():
    triton = TargetSpec(kind="triton", address="127.0.0.1:8001", model="m")
    with pytest.raises(InvalidInputError, match="layers mixes are for mrl-serve"):
        ServeConfig(targets=(triton,), texts=TEXTS, layers_mixes=((3,),))


def test_a_sweep_of_depths_alone_and_mixed_against_a_real_server(server_2d):
    config = ServeConfig(
        targets=(TargetSpec(address=server_2d),),
        texts=TEXTS,
        concurrency=(4,),
        requests=16,
        warmup_requests=2,
        dims_mixes=((8, 16),),
        layers_mixes=((1,), (3,), (1, 3), (2,)),
    )
    rows = asyncio.run(sweep(config, lambda _: None))
    add_comparisons(rows)
    assert [r["layers_mix"] for r in rows] == ["1", "3", "1,3", "2"]
    for r in rows[:3]:
        assert r["ok"] == 16 and r["errors"] == {} and r["texts_per_s"] > 0
    mixed = rows[2]
    assert {k: v["ok"] for k, v in mixed["by_layers"].items()} == {"1": 8, "3": 8}
    assert all(v["vs_alone"] > 0 for v in mixed["by_layers"].values()) and mixed["vs_time_shared"] > 0
    assert rows[0]["vs_single_layers"]["3"] > 0 and rows[0]["vs_single_layers"]["2"] is None  # 2 answered none
    assert rows[3]["ok"] == 0 and rows[3]["errors"] == {"INVALID_ARGUMENT": 16}  # no profile keeps 2 layers
    assert "1,3" in serve_table(rows)


def test_the_http_target_sends_layers_too(served_2d):
    config = ServeConfig(
        targets=(TargetSpec(kind="http", address=served_2d.http),),
        texts=TEXTS,
        concurrency=(2,),
        requests=8,
        warmup_requests=0,
        layers_mixes=((1, 3), (2,)),
    )
    mixed, refused = asyncio.run(sweep(config, lambda _: None))
    assert mixed["ok"] == 8 and {k: v["ok"] for k, v in mixed["by_layers"].items()} == {"1": 4, "3": 4}
    assert refused["ok"] == 0 and refused["errors"] == {"HTTP_400": 8}  # no profile keeps 2 layers


def test_the_serve_command_takes_layers_mixes_and_compares_reports_by_them(server_2d, tmp_path, capsys):
    from mrl.bench.cli import main
    from mrl.bench.report import load_report

    out, texts = tmp_path / "layers.json", tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")  # short: the built-in sentences run over the tiny model's 48 tokens
    flags = "--concurrency 2 --requests 6 --layers-mix 1 --layers-mix 3 --layers-mix 1,3 --threads 1 -q"
    assert main(["serve", "--target", server_2d, *flags.split(), "--texts", str(texts), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "each depth in the mix" in table and "x time-shared" in table
    rows = load_report(out)["results"]
    assert [r["layers_mix"] for r in rows] == ["1", "3", "1,3"] and all(r["errors"] == {} for r in rows)
    assert main(["--compare", str(out), str(out)]) == 0
    compared = capsys.readouterr().out
    assert compared.count("| 1,3 |") == 1 and "layers_mix" in compared
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--target", server_2d, "--layers-mix", "0"])
    assert refused.value.code == 2 and "values must be at least 1" in capsys.readouterr().err
