"""The trade-off run on the tiny model, its plot, and the real chatterbot texts."""

import itertools
import json

import pytest

from mrl.bench import corpora
from mrl.bench.plot import plot_designs, plot_tradeoff
from mrl.bench.texts import Pair, passage_sentences, read_pairs
from mrl.bench.tradeoff import TradeoffConfig, run_tradeoff
from mrl.bench.tradeoff_report import tradeoff_table
from mrl.runtime.errors import InvalidInputError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_tradeoff(tiny_artifact):
    docs = passage_sentences() + [
        f"note number {i} about the {w}" for i, w in enumerate(["mill", "river", "train", "bread", "books"] * 4)
    ]
    pairs = (Pair(query="Who opens a shop before sunrise?", positive=docs[8]), Pair(query=docs[0], positive=docs[1]))
    config = TradeoffConfig(
        artifact=tiny_artifact, corpus=(*docs, docs[0]), pairs=pairs, max_queries=20, threads=1, cost_vectors=5000
    )
    return run_tradeoff(config, lambda _: None)


def test_rows_cover_every_dims_and_encoding(tiny_tradeoff):
    rows, extra = tiny_tradeoff
    assert {(r["dims"], r["encoding"]) for r in rows} == {
        (d, e) for d in (8, 16, 32) for e in ("float32", "int8", "ubinary")
    }
    assert extra["duplicates_removed"] == 1 and extra["n_label_free_queries"] == 20
    full = next(r for r in rows if r["dims"] == 32 and r["encoding"] == "float32")
    assert full["recall_at_10"] == 1.0  # the reference against itself
    for r in rows:
        assert 0 <= r["recall_at_10"] <= 1 and 0 <= r["labelled_recall_at_10"] <= 1 and 0 <= r["mrr_at_10"] <= 1
        assert r["index_bytes"] == r["bytes_per_vector"] * extra["n_documents"]
        assert r["encode_ms_per_text"] > 0
    assert extra["recommendation"]["smallest_dims"]["fp32/float32"] in (8, 16, 32)
    assert "| fp32 | 2 | 32 | float32 | 128 |" in tradeoff_table(rows)


def test_plot_is_written(tiny_tradeoff, tmp_path):
    rows, extra = tiny_tradeoff
    path = plot_tradeoff(rows, tmp_path / "plots" / "t.png", target=0.95, title="tiny")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    designs = [*rows, *extra["funnels"]]
    path = plot_designs(designs, extra["design_recommendation"], tmp_path / "plots" / "d.png", title="tiny")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_funnels_and_designs_in_the_extra_facts(tiny_tradeoff):
    rows, extra = tiny_tradeoff
    assert extra["funnels"] and all(f["design"] == "funnel" for f in extra["funnels"])
    assert {f["shortlist_encoding"] for f in extra["funnels"]} == {"ubinary", "int8"}
    rec = extra["design_recommendation"]
    front = rec["front"]
    assert [d["ram_bytes_per_vector"] for d in front] == sorted(d["ram_bytes_per_vector"] for d in front)
    assert all(a["labelled_recall_at_10"] < b["labelled_recall_at_10"] for a, b in itertools.pairwise(front))
    assert extra["search_cost"]["n_vectors"] == 5000 and all(r["query_ms"] > 0 for r in rows)


def test_config_validation(tiny_artifact):
    with pytest.raises(InvalidInputError, match="encoding"):
        TradeoffConfig(artifact=tiny_artifact, corpus=tuple("abcdefghijkl"), encodings=("bf12",))
    with pytest.raises(InvalidInputError, match="more than k"):
        TradeoffConfig(artifact=tiny_artifact, corpus=("a", "b", "a"))


def test_read_pairs_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n\n{"query": "q"}\n')
    with pytest.raises(InvalidInputError, match="line 2 needs"):
        read_pairs(path)
    path.write_text('{"query": "q", "positive": "p"}\nnot json\n')
    with pytest.raises(InvalidInputError, match="line 2 is not JSON"):
        read_pairs(path)


def test_build_sets_by_hand():
    convs = [["What is AI?", "A field of science."], ["Hi", "Hello there, how are you doing today my friend?", "Fine."]]
    corpus, pairs, texts = corpora.build_sets(convs, min_words=5, max_words=40)
    assert corpus == ["A field of science.", "Hello there, how are you doing today my friend?", "Fine."]
    assert pairs == [
        {"query": "What is AI?", "positive": "A field of science."},
        {"query": "Hi", "positive": convs[1][1]},
    ]
    assert texts == [convs[1][1]]


def test_chatterbot_files(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    files = corpora.write_chatterbot(tmp_path)
    assert files.n_corpus > 1000 and files.n_pairs > 1500 and files.n_texts > 300
    first = json.loads(files.pairs.read_text().splitlines()[0])
    assert set(first) == {"query", "positive"}
    assert all(10 <= len(t.split()) <= 40 for t in files.texts.read_text().splitlines())
