"""`mrl-bench` as a user runs it: help, one-line errors with exit code 2, JSON + table + plot."""

import json

import pytest

from mrl.bench.cli import main
from mrl.bench.report import load_report


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "mrl-bench tradeoff" in out and "--compare" in out
    for command in ("engine", "serve", "tradeoff"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["engine", "/nonexistent/artifact", "--no-ceiling"], "does not exist"),
        (["engine", "A", "--batch-sizes", "1,x"], "whole numbers"),
        (["serve", "--target", "http://example.com:80"], "HOST:PORT"),
        (["serve", "--target", "127.0.0.1:1", "--requests", "5", "--duration", "3"], "not allowed with"),
        (["tradeoff", "A"], "--corpus"),
        (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "cannot read"),
        ([], "name a command"),
    ],
)
def test_errors_are_one_line_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and err.startswith("mrl-bench")


def test_engine_command_writes_json_and_prints_a_table(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "engine.json"
    flags = "--dims 16 --batch-sizes 2 --seq-lens 8 --warmup 1 --repeats 2 --threads 1 --no-ceiling --settle-ms 1"
    argv = ["engine", str(tiny_artifact), *flags.split(), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| onnxruntime | fp32 | 2 | 16 | 2 | 8 |" in captured.out
    assert "cell 1/1" in captured.err  # progress goes to stderr
    report = load_report(out)
    assert report["kind"] == "engine" and report["command"][:2] == ["mrl-bench", "engine"]
    assert report["environment"]["artifact"]["manifest_sha256"]
    assert report["environment"]["packages"]["torch"]  # the baseline ran with torch


def test_tradeoff_command_writes_json_and_png(tiny_artifact, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"document {i} about {w}" for i, w in enumerate(["rivers", "trains", "bread", "books"] * 5))
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "about trains", "positive": "document 1 about trains"}) + "\n")
    out = tmp_path / "t" / "tradeoff.json"
    argv = ["tradeoff", str(tiny_artifact), "--corpus", str(corpus), "--pairs", str(pairs), "--out", str(out)]
    argv += ["--encodings", "float32,ubinary", "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "smallest dims with recall@10 >= 0.95" in text and "MRR@10" in text
    assert "of the full-width labelled recall@10" in text
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    report = load_report(out)
    assert len(report["results"]) == 6 and report["extra"]["plot"].endswith(".png")


def test_serve_command_and_compare(server, tiny_artifact, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one short text\nanother short text here\na third one\n")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        flags = "--concurrency 1,2 --requests 6 --dims-mix 8 --dims-mix 8,16 --threads 1"
        argv = ["serve", "--target", server, *flags.split(), "--texts", str(texts), "--out", str(out)]
        argv += ["--offline-baseline", str(tiny_artifact), "--offline-seconds", "0.1"]
        assert main(argv) == 0
        outs.append(out)
    table = capsys.readouterr().out
    assert "offline Embedder before each level" in table and "one text p50" in table and "vs 8" in table
    assert len(load_report(outs[0])["extra"]["offline"]) == 3  # before each of 2 levels, and after
    report = load_report(outs[0])
    assert len(report["results"]) == 4 and all(
        r["offline_texts_per_s"] > 0 and r["vs_offline"] > 0 for r in report["results"]
    )
    assert all(r["errors"] == {} for r in report["results"])
    assert main(["--compare", str(outs[0]), str(outs[1])]) == 0
    assert "texts_per_s A" in capsys.readouterr().out
