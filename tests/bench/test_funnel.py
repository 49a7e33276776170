"""Funnels (shortlist, re-score), their cost, the Pareto front and the recommendation, on vectors small enough
to check by hand; and `mrl-bench tradeoff` with funnels end to end on the tiny artifact."""

import json

import numpy as np
import pytest

from mrl.bench import funnel, retrieval, search_cost
from mrl.bench.cli import main
from mrl.bench.report import compare_reports, load_report
from mrl.bench.tradeoff import TradeoffConfig
from mrl.runtime import encodings
from mrl.runtime.errors import InvalidInputError

PNG = b"\x89PNG\r\n\x1a\n"


def stages(d_s, e_s, k, d_r, e_r):
    return funnel.Funnel(shortlist_dims=d_s, shortlist_encoding=e_s, k=k, rescore_dims=d_r, rescore_encoding=e_r)


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_funnels_keep_the_rescore_at_least_as_wide_and_precise():
    designs = funnel.funnels([16, 8], ["ubinary", "int8"], [20], ["float32", "ubinary"])
    names = [(f.shortlist_dims, f.shortlist_encoding, f.rescore_dims, f.rescore_encoding) for f in designs]
    assert names == [
        (8, "ubinary", 8, "float32"), (8, "ubinary", 16, "float32"), (8, "ubinary", 8, "ubinary"),
        (8, "ubinary", 16, "ubinary"), (16, "ubinary", 16, "float32"), (16, "ubinary", 16, "ubinary"),
        (8, "int8", 8, "float32"), (8, "int8", 16, "float32"), (16, "int8", 16, "float32"),
    ]  # fmt: skip
    # A float shortlist re-scored by its own floats is a single stage, not a funnel.
    assert funnel.funnels([8], ["float32"], [20], ["float32"]) == []
    assert len(funnel.funnels([8, 16], ["ubinary"], [20, 40], ["float32"])) == 2 * 3


def test_funnel_bytes_in_ram_and_apart():
    f = stages(64, "ubinary", 100, 384, "int8")
    assert (f.ram_bytes, f.disk_bytes, f.reuses_codes) == (8, 384, False)
    own = funnel.Funnel(
        shortlist_dims=384, shortlist_encoding="ubinary", k=40, rescore_dims=384, rescore_encoding="ubinary"
    )
    assert (own.ram_bytes, own.disk_bytes, own.reuses_codes) == (48, 0, True)


def test_decode_bits_and_bucket_centres():
    bits = encodings.encode(np.array([[0.5, -0.1, 0.2]]), "ubinary")
    assert retrieval.decode(bits, "ubinary", 3).tolist() == [[1.0, -1.0, 1.0]]
    binary = encodings.encode(np.array([[0.5, -0.1, 0.2]]), "binary")
    assert retrieval.decode(binary, "binary", 3).tolist() == [[1.0, -1.0, 1.0]]
    ranges = np.array([[-1.0, 0.0], [1.0, 2.55]], dtype=np.float32)  # steps of 2/255 and 0.01
    values = np.array([[0.0, 1.234], [-1.0, 2.55]], dtype=np.float32)
    for encoding in ("int8", "uint8"):
        decoded = retrieval.decode(encodings.encode(values, encoding, ranges), encoding, 2, ranges)
        # 0.0 is in bucket 127 of [-1, 1] (centre -1 + 127.5 * 2/255); 1.234 in bucket 123 (centre 1.235).
        np.testing.assert_allclose(decoded[0], [-1 + 127.5 * 2 / 255, 1.235], atol=1e-6)
        assert np.all(np.abs(decoded - values) <= (ranges[1] - ranges[0]) / 255 / 2 + 1e-6)
    with pytest.raises(ValueError, match="ranges"):
        retrieval.decode(np.zeros((1, 2), np.int8), "int8", 2)


def test_rescore_orders_candidates_by_the_float_query():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    docs = np.array([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    candidates = np.array([[0, 2, 3], [3, 2, 1]])
    assert funnel.rescore(queries, docs, candidates, 2).tolist() == [[2, 0], [3, 2]]
    # Ties go to the lower document index, whatever the shortlist's order.
    tied = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert funnel.rescore(queries[:1], tied, np.array([[2, 1, 0]]), 3).tolist() == [[0, 1, 2]]


def hand_sets():
    """8-d codes shortlist {0, 1} for k=2 and {0, 1, 2} for k=3; at 16 dims doc 2 is the true best."""
    signs8 = unit([[1] * 8, [1] * 7 + [-1], [1] * 4 + [-1] * 4, [-1] * 8])
    docs16 = np.zeros((4, 16), dtype=np.float32)
    docs16[0, 1], docs16[1, :2], docs16[2, 0], docs16[3, 0] = 1, (0.6, 0.8), 1, -1
    query16 = np.zeros((1, 16), dtype=np.float32)
    query16[0, 0] = 1
    return {
        8: funnel.SearchSet(docs=signs8, queries=unit([[1] * 8])),
        16: funnel.SearchSet(docs=docs16, queries=query16),
    }


def test_search_shortlists_then_rescores():
    small, large = stages(8, "ubinary", 2, 16, "float32"), stages(8, "ubinary", 3, 16, "float32")
    found = funnel.search([small, large], hand_sets(), 1)
    assert found[small].tolist() == [[1]]  # doc 2 never made the shortlist of 2
    assert found[large].tolist() == [[2]]  # a shortlist of 3 holds it, and the float re-score finds it
    rows = funnel.evaluate([small, large], hand_sets(), np.array([[2]]), hand_sets(), [2], k=1)
    assert [r["recall_at_10"] for r in rows] == [0.0, 1.0]
    assert [(r["labelled_recall_at_10"], r["mrr_at_10"]) for r in rows] == [(0.0, 0.0), (1.0, 1.0)]
    assert rows[0]["ram_bytes_per_vector"] == 1 and rows[0]["disk_bytes_per_vector"] == 64


def test_a_shortlist_of_the_whole_corpus_is_the_full_float_search():
    rng = np.random.default_rng(3)
    full = unit(rng.standard_normal((60, 32)))
    sets = {d: funnel.SearchSet(docs=unit(full[:, :d]), queries=unit(full[:8, :d]), exclude=range(8)) for d in (8, 32)}
    everything = funnel.Funnel(
        shortlist_dims=8, shortlist_encoding="int8", k=59, rescore_dims=32, rescore_encoding="float32"
    )
    expected = retrieval.knn(full[:8], full, "float32", 32, 10, list(range(8)))
    np.testing.assert_array_equal(funnel.search([everything], sets, 10)[everything], expected)


def design(name, ram, quality, ms=1.0, kind="funnel", **more):
    return {"design": kind, "precision": "fp32", "dims": ram, "encoding": name, "shortlist_dims": ram,
            "shortlist_encoding": name, "k": 50, "rescore_dims": 64, "rescore_encoding": "float32",
            "ram_bytes_per_vector": ram, "disk_bytes_per_vector": 256, "query_ms": ms, "recall_at_10": quality,
            "labelled_recall_at_10": quality, **more}  # fmt: skip


def test_pareto_front_keeps_only_designs_nothing_beats():
    designs = [
        design("a", 8, 0.70), design("b", 8, 0.75, ms=2.0), design("c", 16, 0.74), design("d", 16, 0.80),
        design("e", 32, 0.80), design("f", 48, 0.90), design("g", 64, 0.85, kind="single"),
    ]  # fmt: skip
    front = funnel.pareto_front(designs, "recall_at_10")
    assert [d["encoding"] for d in front] == ["b", "d", "f"]


def test_cheapest_by_ram_then_query_cost_then_bytes_apart():
    designs = [
        design("slow", 8, 0.96, ms=5.0), design("fast", 8, 0.95, ms=1.0), design("big", 4, 0.90),
        design("fast-more-disk", 8, 0.97, ms=1.0, disk_bytes_per_vector=1536),
    ]  # fmt: skip
    assert funnel.cheapest(designs, "recall_at_10", 0.95)["encoding"] == "fast"
    assert funnel.cheapest(designs, "recall_at_10", 0.89)["encoding"] == "big"
    assert funnel.cheapest(designs, "recall_at_10", 0.99) is None
    assert funnel.cheapest(designs, "recall_at_10", None) is None


def test_recommend_single_or_funnel():
    single = design("float32", 1536, 0.83, kind="single", labelled_recall_at_10=0.83)
    tiny_funnel = design("ubinary", 8, 0.97, labelled_recall_at_10=0.75)
    rec = funnel.recommend([single, tiny_funnel], 0.95, full=single)
    assert rec["labelled_floor"] == pytest.approx(0.95 * 0.83)
    assert rec["design"]["label"] == "fp32 8-d ubinary top 50 -> 64-d float32"  # 0.97 >= 0.95, in 8 bytes
    assert rec["labelled_design"]["label"] == "fp32 1536-d float32"  # the funnel keeps 0.75 < 0.7885 on the pairs
    assert [d["label"] for d in rec["front"]] == [rec["design"]["label"], "fp32 1536-d float32"]
    assert rec["design"]["share_of_full"]["labelled_recall_at_10"] == pytest.approx(0.75 / 0.83)
    assert funnel.recommend([single, tiny_funnel], 0.95, full=None)["labelled_design"] is None


def test_hamming_and_dot_by_hand():
    codes = np.array([[0b11110000, 0b00000001], [0b00001111, 0b00000000]], dtype=np.uint8)
    assert search_cost.hamming(codes, np.array([0b11110000, 0b00000000], np.uint8)).tolist() == [1, 8]
    wide = np.zeros((2, 8), np.uint8)
    wide[1, 7] = 0b111  # 64-bit words: the same count
    assert search_cost.hamming(wide, np.zeros(8, np.uint8)).tolist() == [0, 3]
    ints = np.array([[1, -2], [3, 4]], dtype=np.int8)
    assert search_cost.dot(ints, np.array([2, 1], np.int8), "int8").tolist() == [0, 10]
    assert search_cost.dot(np.array([[1.0, 2.0]], np.float32), np.array([3.0, 4.0]), "float32").tolist() == [11.0]


def test_select_best_first_ties_to_lower_index():
    assert search_cost.select(np.array([0.1, 0.9, 0.9, 0.5]), 3).tolist() == [1, 2, 3]
    assert search_cost.select(np.array([3, 1, 1, 0], np.uint32), 2, smallest=True).tolist() == [3, 1]
    assert search_cost.select(np.array([1.0]), 5).tolist() == [0]


@pytest.mark.parametrize("encoding", encodings.ENCODINGS)
def test_scan_finds_what_the_batched_search_finds(encoding):
    rng = np.random.default_rng(5)
    docs = unit(rng.standard_normal((300, 64)))
    codes, ranges = retrieval.encode_corpus(docs, encoding)
    queries = encodings.encode(unit(rng.standard_normal((4, 64))), encoding, ranges)
    expected = retrieval.knn(queries, codes, encoding, 64, 7, None)
    for query, want in zip(queries, expected, strict=True):
        assert search_cost.scan(codes, query, encoding, 7).tolist() == want.tolist()


@pytest.mark.parametrize("encoding", ["float32", "int8", "ubinary"])
def test_rescore_one_matches_the_batched_rescore(encoding):
    rng = np.random.default_rng(6)
    docs = unit(rng.standard_normal((100, 32)))
    codes, ranges = retrieval.encode_corpus(docs, encoding)
    query = unit(rng.standard_normal((1, 32)))
    ids = rng.choice(100, 30, replace=False)
    batched = funnel.rescore(query, retrieval.decode(codes, encoding, 32, ranges), ids[None], 5)
    assert search_cost.rescore_one(codes, ids, query[0], encoding, ranges, 5).tolist() == batched[0].tolist()


def test_query_cost_model_scales_the_scan_only():
    assert search_cost.query_ms(2.0, 0.1, 1_000_000, 10_000_000) == pytest.approx(20.1)
    costs = search_cost.SearchCosts(
        n_vectors=1000, repeats=1, scan_ms={("ubinary", 64, 200): 0.5, ("int8", 64, 10): 2.0},
        rescore_ms={("float32", 384, 100): 0.25, ("float32", 384, 200): 0.5},
    )  # fmt: skip
    single = {"design": "single", "encoding": "ubinary", "dims": 64}
    shaped = design("ubinary", 8, 0.9) | {"shortlist_dims": 64, "k": 100, "rescore_dims": 384}
    wider = shaped | {"k": 200}
    int8 = {"design": "single", "encoding": "int8", "dims": 64}
    # One scan per set of codes, its selection timed at the largest k taken from it; one re-score per k.
    assert search_cost.needs([single, shaped, wider, int8], 10) == (
        {("ubinary", 64, 200), ("int8", 64, 10)}, {("float32", 384, 100), ("float32", 384, 200)},
    )  # fmt: skip
    out = search_cost.with_costs([single, shaped, wider, int8], costs, 10)
    assert [d["query_ms"] for d in out] == [0.5, 0.75, 1.0, 2.0]
    assert out[1]["query_ms_10m"] == pytest.approx(5000.25) and out[3]["query_ms_10m"] == pytest.approx(20_000.0)
    assert out[1]["rescore_read_bytes_per_query"] == 100 * 1536 and "rescore_read_bytes_per_query" not in out[0]
    assert shaped["query_ms"] == 1.0 and "query_ms_10m" not in shaped  # the inputs are left as they were


def test_measure_times_every_stage_on_synthetic_codes():
    costs = search_cost.measure(
        {("ubinary", 64, 20), ("float32", 32, 10)}, {("int8", 32, 20)}, n_vectors=500, repeats=2
    )
    assert set(costs.scan_ms) == {("ubinary", 64, 20), ("float32", 32, 10)} and set(costs.rescore_ms) == {
        ("int8", 32, 20)
    }
    assert all(ms > 0 for ms in [*costs.scan_ms.values(), *costs.rescore_ms.values()])
    assert costs.as_json()["scan"][0] == {
        "encoding": "float32",
        "dims": 32,
        "k": 10,
        "ms": costs.scan_ms[("float32", 32, 10)],
    }
    for encoding in encodings.ENCODINGS:
        codes = search_cost.synthetic_codes(encoding, 24, 5, np.random.default_rng(0))
        assert codes.dtype == encodings.dtype_of(encoding) and codes.shape == (5, encodings.width(encoding, 24))


def test_measure_refuses_more_codes_than_memory_holds():
    with pytest.raises(InvalidInputError, match="lower --cost-vectors"):
        search_cost.measure({("float32", 384, 10)}, set(), n_vectors=10**12)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cost-vectors", str(10**12)], "lower --cost-vectors"),  # refused before any embedding
        (["--shortlist-sizes", "5"], "must exceed k=10"),
        (["--rescore-encodings", "int4"], "unknown encoding"),
    ],
)
def test_bad_funnel_flags_are_one_line_exit_2(tiny_artifact, tmp_path, capsys, flags, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"document {i}" for i in range(30)))
    argv = ["tradeoff", str(tiny_artifact), "--corpus", str(corpus), "--out", str(tmp_path / "t.json"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "t.json").exists()


def test_config_rejects_shortlists_no_larger_than_k(tiny_artifact):
    docs = tuple(f"doc {i}" for i in range(30))
    with pytest.raises(InvalidInputError, match="shortlist sizes must exceed k=10"):
        TradeoffConfig(artifact=tiny_artifact, corpus=docs, shortlist_sizes=(10, 20))
    with pytest.raises(InvalidInputError, match="largest shortlist"):
        TradeoffConfig(artifact=tiny_artifact, corpus=docs, cost_vectors=100)
    with pytest.raises(InvalidInputError, match="encoding"):
        TradeoffConfig(artifact=tiny_artifact, corpus=docs, rescore_encodings=("int4",))


def test_tradeoff_command_recommends_funnels(tiny_artifact, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    words = ["rivers", "trains", "bread", "books", "mills", "songs"]
    corpus.write_text("\n".join(f"document {i} about {w} and {words[i % 5]}" for i, w in enumerate(words * 6)))
    pairs = tmp_path / "pairs.jsonl"
    lines = [
        {"query": f"about {w}", "positive": f"document {i} about {w} and {words[i % 5]}"} for i, w in enumerate(words)
    ]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "funnel.json"
    argv = ["tradeoff", str(tiny_artifact), "--corpus", str(corpus), "--pairs", str(pairs), "--out", str(out)]
    argv += ["--threads", "1", "--shortlist-sizes", "12,20", "--cost-vectors", "3000", "--target-recall", "0.5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Funnels: shortlist in RAM" in text and "Pareto front" in text
    assert "| fp32 | 2 | 8-d ubinary | 12 | 32-d float32 | 1 | 128 |" in text
    assert "cheapest design (RAM bytes/vector, then ms/query), single-stage or funnel" in text
    assert "ms at 10M (extrapolated)" in text
    report = load_report(out)
    extra = report["extra"]
    funnels = extra["funnels"]
    assert len(funnels) == len(
        funnel.funnels([8, 16, 32], ["ubinary", "int8"], [12, 20], ["float32", "int8", "ubinary"])
    )
    assert all(0 <= f["recall_at_10"] <= 1 and f["query_ms"] > 0 for f in funnels)
    assert extra["search_cost"]["n_vectors"] == 3000
    rec = extra["design_recommendation"]
    best = rec["labelled_design"]
    assert best is not None and best["labelled_recall_at_10"] >= rec["labelled_floor"]
    assert best["label"] in text
    assert all(r["query_ms"] > 0 and r["design"] == "single" for r in report["results"])
    assert out.with_name("funnel-designs.png").read_bytes()[:8] == PNG
    assert "recall_at_10 A" in compare_reports(report, report)  # the single-stage rows still compare
