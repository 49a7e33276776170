"""The load generator: its pure pieces, then a real `mrl-serve` on 127.0.0.1 in a subprocess."""

import asyncio

import pytest

from mrl.bench.load import MAX_REQUESTS, Outcome, ServeConfig, dims_for
from mrl.bench.serve import bracketing_offline, level_row, measurement_window, offline_throughput, round_orders, sweep
from mrl.bench.serve_report import add_comparisons, serve_table
from mrl.bench.targets import TargetSpec, check_target
from mrl.runtime.errors import InvalidInputError

TEXTS = ("the river runs past the mill", "a small library on the square", "the first train leaves at six")


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:1", "[::1]:8080"])
def test_targets_accepted(target):
    assert check_target(target)[1] > 0


@pytest.mark.parametrize(
    "target", ["http://127.0.0.1:1", "127.0.0.1", "a:1,b:2", "::1:80", "host:0", "host:99999", "h:x"]
)
def test_targets_refused(target):
    with pytest.raises(InvalidInputError):
        check_target(target)


def test_config_is_bounded():
    with pytest.raises(InvalidInputError, match="either"):
        ServeConfig(targets=(TargetSpec(address="127.0.0.1:1"),), texts=TEXTS, requests=10, duration_s=1.0)
    with pytest.raises(InvalidInputError, match="requests per level"):
        ServeConfig(targets=(TargetSpec(address="127.0.0.1:1"),), texts=TEXTS, requests=10**9)
    with pytest.raises(InvalidInputError, match="duration"):
        ServeConfig(targets=(TargetSpec(address="127.0.0.1:1"),), texts=TEXTS, requests=None, duration_s=10**6)
    with pytest.raises(InvalidInputError, match="concurrency"):
        ServeConfig(targets=(TargetSpec(address="127.0.0.1:1"),), texts=TEXTS, concurrency=(0,))


def test_dims_mix_is_an_exact_round_robin():
    assert [dims_for((64, 128, 256), i) for i in range(6)] == [64, 128, 256, 64, 128, 256]
    assert dims_for(None, 5) is None


def test_level_row_counts_the_steady_window():
    # Concurrency 1 in a closed loop: request i is sent at i and answered at i + 1 (seconds).
    outcomes = [
        Outcome(index=i, sent_at=float(i), done_at=float(i + 1), code="OK", texts=2, tokens=20) for i in range(6)
    ]
    outcomes.append(Outcome(index=6, sent_at=6.0, done_at=6.5, code="UNAVAILABLE", texts=0))
    assert measurement_window(outcomes, warmup=2) == (2.0, 6.0)
    row = level_row([outcomes], warmup=2, concurrency=1, mix=(8, 16))
    # Answered inside (2, 6]: requests 2, 3, 4 and 5 (done at 3, 4, 5, 6): 8 texts in 4 s.
    assert row["texts_per_s"] == pytest.approx(2.0) and row["tokens_per_s"] == pytest.approx(20.0)
    assert row["requests"] == 5 and row["ok"] == 4 and row["errors"] == {"UNAVAILABLE": 1}
    assert row["latency"]["p50_ms"] == pytest.approx(1000.0) and row["dims_mix"] == "8,16"


def test_rounds_are_pooled_and_alternate():
    one = [Outcome(index=i, sent_at=float(i), done_at=float(i + 1), code="OK", texts=1) for i in range(4)]
    two = [Outcome(index=i, sent_at=10 + 2.0 * i, done_at=12 + 2.0 * i, code="OK", texts=1) for i in range(4)]
    row = level_row([one, two], warmup=0, concurrency=1, mix=None)
    # Round one: 3 texts in 3 s; round two: 3 texts in 6 s -> 6 texts in 9 s.
    assert row["texts_per_s"] == pytest.approx(6 / 9) and row["rounds"] == 2 and row["latency"]["n"] == 8
    assert round_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_comparisons():
    rows = [
        {"dims_mix": "128", "concurrency": 8, "texts_per_s": 100.0},
        {"dims_mix": "64,128,256", "concurrency": 8, "texts_per_s": 90.0},
    ]
    for row in rows:
        row["offline_texts_per_s"] = 200.0
        row["offline_batch1_p50_ms"] = 4.0
    rows[0]["latency"] = {"p50_ms": 5.5}
    add_comparisons(rows)
    assert rows[0]["vs_offline"] == 0.5 and rows[1]["vs_single_dims"] == {"128": 0.9}
    assert rows[0]["p50_over_offline_batch1_ms"] == 1.5 and rows[1]["p50_over_offline_batch1_ms"] is None
    assert bracketing_offline(0, [100.0, 200.0, 400.0]) == 150.0
    assert bracketing_offline(2, [100.0, 200.0, 400.0]) == 400.0
    assert bracketing_offline(0, []) is None


def test_sweep_against_a_real_server(server):
    config = ServeConfig(
        targets=(TargetSpec(address=server),),
        texts=TEXTS,
        concurrency=(1, 4),
        requests=12,
        warmup_requests=2,
        dims_mixes=((8,), (8, 16, 32)),
        texts_per_request=2,
        rounds=2,
    )
    rows = asyncio.run(sweep(config, lambda _: None))
    assert [(r["concurrency"], r["dims_mix"]) for r in rows] == [(1, "8"), (1, "8,16,32"), (4, "8"), (4, "8,16,32")]
    for r in rows:
        assert r["requests"] == 24 and r["ok"] == 24 and r["errors"] == {} and r["rounds"] == 2
        assert r["texts_per_s"] > 0 and r["latency"]["n"] == 24
        assert r["latency"]["p50_ms"] <= r["latency"]["p99_ms"]
        assert r["tokens_per_s"] > r["texts_per_s"]  # each text is several tokens
    add_comparisons(rows)
    assert "8,16,32" in serve_table(rows)


def test_errors_are_counted_by_status_code(server):
    config = ServeConfig(
        targets=(TargetSpec(address=server),),
        texts=TEXTS,
        concurrency=(2,),
        requests=4,
        warmup_requests=0,
        dims_mixes=((999,),),
    )
    (row,) = asyncio.run(sweep(config, lambda _: None))
    assert row["ok"] == 0 and row["errors"] == {"INVALID_ARGUMENT": 4} and row["latency"] is None


def test_duration_mode_stops(server):
    config = ServeConfig(
        targets=(TargetSpec(address=server),),
        texts=TEXTS,
        concurrency=(2,),
        requests=None,
        duration_s=0.5,
        warmup_requests=2,
    )
    (row,) = asyncio.run(sweep(config, lambda _: None))
    # It ended on the deadline, not on the request cap (pytest-timeout would catch a hang).
    assert 0 < row["ok"] < MAX_REQUESTS and row["errors"] == {}


def test_nothing_listening_is_an_error_not_a_hang(free_port):
    config = ServeConfig(
        targets=(TargetSpec(address=f"127.0.0.1:{free_port}"),),
        texts=TEXTS,
        concurrency=(1,),
        requests=2,
        warmup_requests=0,
        request_timeout_s=2,
    )
    (row,) = asyncio.run(sweep(config, lambda _: None))
    assert row["ok"] == 0 and sum(row["errors"].values()) == 2


def test_offline_baseline(tiny_artifact):
    result = offline_throughput(tiny_artifact, TEXTS * 4, precision=None, threads=1, min_seconds=0.05)
    assert result["texts_per_s"] > 0 and result["passes"] >= 1 and result["batch_size"] == 32
