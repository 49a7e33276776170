"""Engine benchmark decisions (pure functions) and one tiny end-to-end run with the PyTorch baseline."""

import json

import numpy as np
import pytest

from mrl.bench import flops
from mrl.bench.engine import EngineConfig, add_speedups, batch_plan, cosine_stats, pair_baseline, peaks_list, run_engine
from mrl.bench.runners import plan_baseline
from mrl.bench.texts import texts_of_length
from mrl.runtime.embedder import Embedder
from mrl.runtime.errors import InvalidInputError

BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 2,
}


def test_flops_per_token_by_hand():
    # Per layer: QKV + output 2*32*96 + 2*32*32 = 8192; MLP 2*2*32*64 = 8192; attention 2*2*10*32 = 1280.
    assert flops.flops_per_token(BERT, 10) == 2 * (8192 + 8192 + 1280)
    llama = {**BERT, "model_type": "llama", "num_key_value_heads": 1}
    # Grouped K/V: 2*32*(32 + 2*16) + 2*32*32 = 6144; gated MLP: 3 matrices, 12288.
    assert flops.flops_per_token(llama, 10) == 2 * (6144 + 12288 + 1280)


def test_model_config_of_a_sentence_transformers_dir(tiny_st_dir, tmp_path):
    config = flops.find_model_config(tiny_st_dir)
    assert config is not None and config["hidden_size"] == 32
    assert flops.find_model_config(tmp_path) is None and flops.find_model_config(None) is None


def test_gemm_peaks_are_measured_and_chosen_by_dtype():
    peaks = [flops.numpy_fp32_peak(size=64, repeats=2), *flops.onnxruntime_peaks(size=64, repeats=2, threads=1)]
    assert all(p.flops_per_s > 0 for p in peaks)
    best = flops.best_peaks(peaks)
    assert "fp32" in best
    assert flops.peak_for("int8", best).dtype == ("int8" if "int8" in best else "fp32")
    assert flops.peak_for("fp16", best).dtype == "fp32"  # no fp16 GEMM measured on a CPU: held to fp32's
    rows = peaks_list({("cpu", dtype): p for dtype, p in best.items()})
    assert rows[0]["device"] == "cpu" and rows[0]["dtype"] == "fp32" and rows[0]["flops_per_s"] > 0


def test_pair_baseline():
    assert pair_baseline("fp32", ["fp32", "fp16"]) == "fp32"
    assert pair_baseline("fp16", ["fp32", "fp16"]) == "fp16"
    assert pair_baseline("fp16", ["fp32"]) == "fp32"
    assert pair_baseline("int8", ["fp32"]) == "fp32"
    assert pair_baseline("fp32", []) is None


def test_plan_baseline(tmp_path):
    src = {"kind": "sentence-transformers", "path": str(tmp_path)}
    assert plan_baseline("auto", src, torch_present=True, cuda=True).precisions == ("fp32", "fp16")
    cpu = plan_baseline("auto", src, torch_present=True, cuda=False)
    assert (cpu.device, cpu.precisions) == ("cpu", ("fp32",))
    assert plan_baseline("auto", src, torch_present=False, cuda=False).device is None
    assert plan_baseline("none", src, torch_present=True, cuda=True).device is None
    assert "no CUDA" in plan_baseline("cuda", src, torch_present=True, cuda=False).reason
    assert plan_baseline("auto", {"kind": "onnx", "path": str(tmp_path)}, torch_present=True, cuda=False).device is None
    assert plan_baseline("auto", {"path": str(tmp_path / "gone")}, torch_present=True, cuda=False).device is None


def test_speedups_pair_each_row_with_its_cells_baseline():
    def row(backend, precision, tps, batch=1, full_depth=True):
        return {
            "backend": backend,
            "precision": precision,
            "device": "cpu",
            "dims": 8,
            "batch_size": batch,
            "seq_len": 16,
            "texts_per_s": tps,
            "full_depth": full_depth,
        }

    rows = [
        row("onnxruntime", "fp32", 300),
        row("onnxruntime", "int8", 500),
        row("pytorch", "fp32", 100),
        row("onnxruntime", "fp32", 50, batch=32),
        row("onnxruntime", "fp32", 540, full_depth=False),
        row("onnxruntime", "int8", 80, batch=32, full_depth=False),
    ]
    add_speedups(rows)
    assert rows[0]["speedup"] == {"vs": "pytorch fp32 cpu", "ratio": 3.0}
    assert rows[1]["speedup"]["ratio"] == 5.0
    assert rows[2]["speedup"]["ratio"] == 1.0
    assert "speedup" not in rows[3] or rows[3]["speedup"] is None  # no baseline in that cell
    # a layer-cut profile is held against the same backend and precision at full depth, not the baseline
    assert rows[4]["vs_full_depth"] == 1.8 and rows[4].get("speedup") is None
    assert rows[0]["vs_full_depth"] == 1.0 and rows[5]["vs_full_depth"] is None  # no full-depth int8 at batch 32


def test_cosine_stats():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    stats = cosine_stats(a, b)
    assert stats["min"] == pytest.approx(np.sqrt(0.5)) and stats["mean"] == pytest.approx((1 + np.sqrt(0.5)) / 2)


@pytest.mark.parametrize("n_tokens", [3, 5, 17, 48])
def test_texts_of_exact_token_length(tiny_artifact, n_tokens):
    embedder = Embedder.load(tiny_artifact)
    texts = texts_of_length(embedder.tokenizer, n_tokens, 6)
    assert len(set(texts)) == 6
    assert [e.n_tokens for e in embedder.tokenizer.encode(texts)] == [n_tokens] * 6
    with pytest.raises(InvalidInputError):
        texts_of_length(embedder.tokenizer, 2, 1)  # only room for [CLS] and [SEP]
    with pytest.raises(InvalidInputError):
        texts_of_length(embedder.tokenizer, 10_000, 1)


def test_engine_run_on_the_tiny_model_with_the_baseline(tiny_artifact):
    config = EngineConfig(
        artifact=tiny_artifact,
        dims=(8, 32),
        batch_sizes=(1, 4),
        seq_lens=(12,),
        warmup=1,
        repeats=3,
        threads=1,
        ceiling=False,
    )
    rows, extra = run_engine(config, lambda _: None)
    assert extra["baseline"]["device"] == "cpu"
    assert {(r["backend"], r["dims"], r["batch_size"]) for r in rows} == {
        (b, d, n) for b in ("onnxruntime", "pytorch") for d in (8, 32) for n in (1, 4)
    }
    for r in rows:
        assert r["latency"]["n"] == 3 and len(r["samples_ms"]) == 3
        assert r["tokens_per_text"] == 12.0
        assert r["tokens_per_s"] == pytest.approx(12 * r["texts_per_s"])
        assert r["speedup"]["vs"] == "pytorch fp32 cpu"
        # The exported graph and sentence-transformers agree: same texts, same truncation and normalisation.
        assert r["cosine_vs_reference"]["min"] > 0.9999
        assert r["flops_per_token"] == flops.flops_per_token(
            flops.find_model_config(json.loads((tiny_artifact / "manifest.json").read_text())["source"]["path"]), 12
        )
    with pytest.raises(InvalidInputError, match="above the largest"):
        run_engine(EngineConfig(artifact=tiny_artifact, dims=(64,), ceiling=False, baseline="none"), lambda _: None)


def test_engine_config_validation(tiny_artifact):
    with pytest.raises(InvalidInputError):
        EngineConfig(artifact=tiny_artifact, repeats=1)
    with pytest.raises(InvalidInputError):
        EngineConfig(artifact=tiny_artifact, baseline="tpu")


@pytest.mark.gpu
def test_cuda_baseline_runs_fp32_and_fp16_with_device_memory(tiny_artifact):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    config = EngineConfig(
        artifact=tiny_artifact, dims=(32,), batch_sizes=(4,), seq_lens=(12,), warmup=1, repeats=3, settle_ms=1,
        baseline="cuda", ceiling=True,
    )  # fmt: skip
    rows, extra = run_engine(config, lambda _: None)
    cuda_rows = {r["precision"]: r for r in rows if r["backend"] == "pytorch"}
    assert set(cuda_rows) == {"fp32", "fp16"} and all(r["device"] == "cuda" for r in cuda_rows.values())
    assert all(r["peak_device_mib"] > 0 for r in cuda_rows.values())
    assert {("cuda", "fp16"), ("cuda", "fp32")} <= {(p["device"], p["dtype"]) for p in extra["peaks"]}
    assert cuda_rows["fp16"]["cosine_vs_reference"]["min"] > 0.99


def test_batch_plan_in_file_order_or_spread_over_a_sorted_pool():
    pool = [str(i) for i in range(10)]
    assert batch_plan(pool, 3, 4, spread=False) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9", "0", "1"]]
    assert batch_plan(pool, 2, 4, spread=True) == [["0", "1"], ["2", "3"], ["5", "6"], ["7", "8"]]


def test_engine_on_real_texts_length_sorted(tiny_artifact):
    texts = ("a short one", "a somewhat longer text about the river and the mill", "tiny", "the train leaves at six")
    config = EngineConfig(
        artifact=tiny_artifact, dims=(8,), batch_sizes=(2,), texts=texts, length_sorted=True, warmup=1, repeats=2,
        threads=1, ceiling=False, settle_ms=1, baseline="none",
    )  # fmt: skip
    rows, _ = run_engine(config, lambda _: None)
    (row,) = rows
    assert row["seq_len"] is None and row["speedup"] is None and 2 < row["tokens_per_text"] < 20
