"""`mrl-bench serve` against Triton beside `mrl-serve`: targets, the client worker, one sweep over both."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from triton_helpers import PYTHON, require_triton, tritonserver

from mrl.bench.cli import main as bench_main
from mrl.bench.drivers import spec_from_json, spec_to_json
from mrl.bench.load import ServeConfig
from mrl.bench.serve import sweep
from mrl.bench.serve_report import add_comparisons, serve_table
from mrl.bench.targets import TargetSpec, client_pythons, default_triton_dims, split_target, target_specs
from mrl.export.triton import write_repository
from mrl.export.triton_config import Batching
from mrl.export.triton_plan import TritonOptions
from mrl.runtime.errors import InvalidInputError

TEXTS = ("the river runs past the mill", "a small library on the square", "the first train leaves at six")


def test_target_specs():
    assert split_target("127.0.0.1:1") == ("mrl", "127.0.0.1:1")
    assert split_target("triton=127.0.0.1:8001") == ("triton", "127.0.0.1:8001")
    with pytest.raises(InvalidInputError, match="unknown target kind 'openai'"):
        TargetSpec(kind="openai", address="127.0.0.1:1")
    with pytest.raises(InvalidInputError, match="--triton-model"):
        TargetSpec(kind="triton", address="127.0.0.1:1")
    with pytest.raises(InvalidInputError, match="different targets"):
        ServeConfig(targets=(TargetSpec(address="127.0.0.1:1"),) * 2, texts=TEXTS)
    spec = TargetSpec(address="127.0.0.1:1", token="t", root_certificates=b"PEM")
    assert spec_from_json(spec_to_json(spec)) == spec
    mrl, triton = target_specs(
        ["127.0.0.1:1", "triton=127.0.0.1:2"], triton_model="m", token="t", root_certificates=None
    )
    assert (mrl.kind, mrl.token, mrl.model) == ("mrl", "t", None)
    assert (triton.kind, triton.token, triton.model) == ("triton", None, "m")
    assert client_pythons(["/py", "mrl=/other"]) == (("triton", "/py"), ("mrl", "/other"))
    assert default_triton_dims(["m_d64", "m_d256", "m_tokenize", "m_encode_d64", "mm_d8", "m_d1x"], "m") == [64, 256]


def test_triton_target_without_tritonclient_says_what_to_do():
    config = ServeConfig(
        targets=(TargetSpec(kind="triton", address="127.0.0.1:1", model="m"),), texts=TEXTS, requests=2
    )
    with pytest.raises(InvalidInputError, match="--client-python"):
        asyncio.run(sweep(config, lambda _: None))


@pytest.fixture(scope="module")
def triton(tiny_artifact, tmp_path_factory):
    require_triton()
    root = tmp_path_factory.mktemp("bench-triton")
    options = TritonOptions(name="tiny", dims=(8, 32), encoder="python", batching=Batching(instances=1))
    write_repository(tiny_artifact, root / "repo", options)
    with tritonserver(root / "repo", root / "server.log") as server:
        yield server


@pytest.mark.slow
def test_one_sweep_over_mrl_serve_and_triton(server, triton):
    targets = (TargetSpec(address=server), TargetSpec(kind="triton", address=triton.grpc, model="tiny"))
    config = ServeConfig(
        targets=targets,
        texts=TEXTS,
        concurrency=(1, 4),
        requests=12,
        warmup_requests=2,
        dims_mixes=((8,), (8, 32), None),
        texts_per_request=2,
        client_python=(("triton", str(PYTHON)),),
    )
    progress = []
    rows = asyncio.run(sweep(config, progress.append))
    assert [(r["target"], r["concurrency"], r["dims_mix"]) for r in rows][:6] == [
        (f"mrl={server}", 1, "8"),
        (f"mrl={server}", 1, "8,32"),
        (f"mrl={server}", 1, "default"),
        (f"triton={triton.grpc}", 1, "8"),
        (f"triton={triton.grpc}", 1, "8,32"),
        (f"triton={triton.grpc}", 1, "default"),
    ]
    for r in rows:
        assert r["ok"] == 12 and r["errors"] == {}, r
        assert r["texts_per_s"] > 0 and r["latency"]["n"] == 12
    triton_rows = [r for r in rows if r["target"].startswith("triton")]
    assert all(r["tokens_per_s"] is None and r["server_queue_ms_mean"] is None for r in triton_rows)
    add_comparisons(rows)
    assert all(r["vs_first_target"] > 0 for r in triton_rows)
    table = serve_table(rows)
    assert "vs first target" in table and f"triton={triton.grpc}" in table
    assert any(line.startswith(f"triton={triton.grpc}: concurrency 4") for line in progress)


@pytest.mark.slow
def test_triton_errors_are_counted_by_status(triton):
    config = ServeConfig(
        targets=(TargetSpec(kind="triton", address=triton.grpc, model="tiny"),),
        texts=(TEXTS[0], "word " * 100),  # the second is over the tiny model's 48 tokens
        concurrency=(2,),
        requests=4,
        warmup_requests=0,
        client_python=(("triton", str(PYTHON)),),
    )
    (row,) = asyncio.run(sweep(config, lambda _: None))
    assert row["ok"] == 2 and row["errors"] == {"INVALID_ARGUMENT": 2}


@pytest.mark.slow
def test_an_mrl_target_runs_in_a_worker_too(server):
    config = ServeConfig(
        targets=(TargetSpec(address=server),),
        texts=TEXTS,
        concurrency=(2,),
        requests=6,
        warmup_requests=1,
        client_python=(("mrl", sys.executable),),
    )
    (row,) = asyncio.run(sweep(config, lambda _: None))
    assert row["ok"] == 6 and row["errors"] == {} and row["tokens_per_s"] > 0


@pytest.mark.slow
def test_serve_command_with_both_targets(server, triton, tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["serve", "--target", f"mrl={server}", "--target", f"triton={triton.grpc}", "--triton-model", "tiny"]
    argv += ["--client-python", str(PYTHON), "--concurrency", "2", "--requests", "4", "--out", str(out), "-q"]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["target"] for r in report["results"]] == [f"mrl={server}", f"triton={triton.grpc}"]
    assert "vs first target" in capsys.readouterr().out
