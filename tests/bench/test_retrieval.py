"""Recall, MRR and encodings on examples small enough to check by hand."""

import numpy as np
import pytest

from mrl.bench import retrieval
from mrl.bench.tradeoff import recommend
from mrl.runtime import encodings


def test_neighbour_recall_by_hand():
    # Query 0 keeps 2 of its 3 true neighbours, query 1 keeps 1 of 3: (2/3 + 1/3) / 2 = 0.5.
    reference = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 1, 9], [6, 7, 8]])
    assert retrieval.neighbour_recall(found, reference) == pytest.approx(0.5)
    assert retrieval.neighbour_recall(reference, reference) == 1.0


def test_label_free_recall_on_points_on_a_line():
    # Five 2-d unit vectors at angles 0, 10, 25, 60, 90 degrees: each one's nearest others are obvious.
    angles = np.radians([0, 10, 25, 60, 90])
    full = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    score = full @ full.T
    top = retrieval.top_k(score, 2, exclude=range(5))
    assert top.tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2]]
    # Keeping only the first coordinate (cos), re-normalised, every vector becomes +1 or 0-ish:
    # the ranking collapses, and recall against the full-width neighbours drops.
    cut = full[:, :1] / np.maximum(np.abs(full[:, :1]), 1e-12)
    found = retrieval.top_k(cut @ cut.T, 2, exclude=range(5))
    assert found.tolist()[0] == [1, 2]  # ties go to the lower index
    assert retrieval.neighbour_recall(found, top) < 1.0


def test_top_k_ties_and_exclusion():
    score = np.array([[0.1, 0.9, 0.9, 0.5], [1.0, 0.0, 0.0, 1.0]])
    assert retrieval.top_k(score, 2).tolist() == [[1, 2], [0, 3]]
    assert retrieval.top_k(score, 2, exclude=[1, 0]).tolist() == [[2, 3], [3, 1]]
    assert retrieval.top_k(score, 2, exclude=[-1, 0]).tolist() == [[1, 2], [3, 1]]  # -1: nothing left out


def test_recall_and_mrr_at_k_from_ranks():
    found = np.array([[5, 2, 7], [1, 3, 4], [9, 8, 6]])
    ranks = retrieval.ranks_of(found, [2, 1, 0])
    assert ranks == [1, 0, None]
    assert retrieval.recall_at_k(ranks, 3) == pytest.approx(2 / 3)
    assert retrieval.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert retrieval.mrr_at_k(ranks, 3) == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_every_encoding_keeps_the_obvious_neighbour():
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((50, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:5] + 0.01 * rng.standard_normal((5, 32)).astype(np.float32)
    ranges = encodings.calibration_ranges(docs)
    for encoding in encodings.ENCODINGS:
        q, d = encodings.encode(queries, encoding, ranges), encodings.encode(docs, encoding, ranges)
        best = retrieval.top_k(retrieval.scores(q, d, encoding, 32), 1)
        assert best[:, 0].tolist() == [0, 1, 2, 3, 4], encoding


def test_int8_and_uint8_rank_alike():
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((40, 16)).astype(np.float32)
    ranges = encodings.calibration_ranges(docs)
    ranked = [
        retrieval.top_k(
            retrieval.scores(encodings.encode(docs, e, ranges), encodings.encode(docs, e, ranges), e, 16), 5
        )
        for e in ("int8", "uint8")
    ]
    np.testing.assert_array_equal(*ranked)


@pytest.mark.parametrize("encoding", ["binary", "ubinary"])
def test_bit_scores_are_agreements_minus_disagreements(encoding):
    a = encodings.encode(np.array([[1.0, -1.0, 1.0]]), encoding)
    b = encodings.encode(np.array([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]]), encoding)
    assert retrieval.scores(a, b, encoding, 3).tolist() == [[1.0, -3.0]]


def test_sample_indices_spread_and_bounded():
    assert retrieval.sample_indices(5, 10) == [0, 1, 2, 3, 4]
    picked = retrieval.sample_indices(1000, 4)
    assert picked == [0, 333, 666, 999]


def test_recommend_smallest_dims_and_fewest_bytes():
    rows = [
        {"precision": "fp32", "encoding": "float32", "dims": d, "recall_at_10": r, "bytes_per_vector": 4 * d}
        for d, r in [(256, 1.0), (128, 0.97), (64, 0.90)]
    ] + [
        {"precision": "fp32", "encoding": "int8", "dims": d, "recall_at_10": r, "bytes_per_vector": d}
        for d, r in [(256, 0.96), (128, 0.93), (64, 0.85)]
    ]
    rec = recommend(rows, 0.95)
    assert rec["smallest_dims"] == {"fp32/float32": 128, "fp32/int8": 256}
    assert rec["fewest_bytes"]["encoding"] == "int8" and rec["fewest_bytes"]["dims"] == 256
    assert recommend(rows, 0.999)["smallest_dims"]["fp32/int8"] is None


def test_recommend_from_labelled_pairs_keeps_a_share_of_full_quality():
    rows = [
        {"precision": "fp32", "encoding": "float32", "dims": d, "recall_at_10": r, "labelled_recall_at_10": q,
         "bytes_per_vector": 4 * d}
        for d, r, q in [(256, 1.0, 0.80), (128, 0.7, 0.77), (64, 0.5, 0.70)]
    ]  # fmt: skip
    rec = recommend(rows, 0.95)
    assert rec["labelled_floor"] == pytest.approx(0.76)
    assert rec["labelled_smallest_dims"] == {"fp32/float32": 128}
    assert rec["smallest_dims"] == {"fp32/float32": 256}
    assert recommend([{**r, "labelled_recall_at_10": None} for r in rows][:0], 0.95)["labelled_floor"] is None
