"""Percentiles and summaries on samples whose answers are known by hand."""

import math

import numpy as np
import pytest

from mrl.bench.stats import block_schedule, percentile, ratio, summarize, throughput


def test_percentiles_of_one_to_hundred():
    samples = list(range(1, 101))
    # Rank (n - 1) * q / 100, interpolated: 49.5 -> 50.5, 89.1 -> 90.1, 98.01 -> 99.01.
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 0) == 1
    assert percentile(samples, 100) == 100


def test_percentile_ignores_input_order_and_matches_numpy():
    rng = np.random.default_rng(3)
    samples = rng.lognormal(size=257).tolist()
    for q in (1, 50, 90, 99, 99.9):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_percentile_of_one_sample_and_bad_input():
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_in_milliseconds():
    s = summarize([0.010, 0.020, 0.030, 0.040])
    assert s.n == 4
    assert s.mean_ms == pytest.approx(25.0)
    assert s.min_ms == pytest.approx(10.0) and s.max_ms == pytest.approx(40.0)
    assert s.p50_ms == pytest.approx(25.0)
    assert s.p90_ms == pytest.approx(37.0)  # rank 2.7: 30 + 0.7 * 10
    assert s.std_ms == pytest.approx(math.sqrt(500 / 3))  # sample standard deviation
    assert summarize([0.005]).std_ms == 0.0


def test_throughput_and_ratio():
    assert throughput(32, [0.1, 0.1, 0.2]) == pytest.approx(32 * 3 / 0.4)
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0) is None


def test_block_schedule_alternates_and_covers_every_repeat():
    assert block_schedule(["a", "b"], 3, 1) == [("a", 1), ("b", 1), ("a", 1), ("b", 1), ("a", 1), ("b", 1)]
    assert block_schedule(["a", "b"], 7, 3) == [("a", 3), ("b", 3), ("a", 3), ("b", 3), ("a", 1), ("b", 1)]
    with pytest.raises(ValueError):
        block_schedule(["a"], 0, 1)
