"""What the benchmarks ask of the runtime: the thread count whatever `auto` picks, the device each row ran on,
and the baseline's own device memory."""

from __future__ import annotations

import pytest

import mrl.runtime.embedder as embedder_module
from mrl.bench import serve, tradeoff
from mrl.bench.engine import engine_table
from mrl.bench.runners import DevicePeak, EmbedderRunner
from mrl.runtime.embedder import Embedder


def _session_threads(embedder: Embedder) -> set[int]:
    return {embedder.backend_for(p)._session.get_session_options().intra_op_num_threads for p in embedder.profiles}


def test_engine_runner_passes_threads_when_auto_picks_onnxruntime(tiny_artifact):
    runner = EmbedderRunner(tiny_artifact, "auto", "fp32", threads=1)
    try:
        assert runner.backend == "onnxruntime-cpu"  # what auto picks on a machine without a GPU
        assert _session_threads(runner.embedder) == {1}
        assert runner.device == "cpu"
    finally:
        runner.close()


def test_tradeoff_passes_threads_when_auto_picks_onnxruntime(tiny_artifact):
    config = tradeoff.TradeoffConfig(artifact=tiny_artifact, corpus=tuple(f"text {i}" for i in range(20)), threads=1)
    embedder = tradeoff._load(config, "fp32")
    try:
        embedder.warmup()
        assert _session_threads(embedder) == {1}
    finally:
        embedder.close()


def test_serve_offline_rate_passes_threads_to_auto(tiny_artifact, monkeypatch):
    seen = []
    original = Embedder.load.__func__

    def load(cls, *args, **kwargs):
        embedder = original(cls, *args, **kwargs)
        seen.append((args[1], kwargs, embedder))
        return embedder

    monkeypatch.setattr(Embedder, "load", classmethod(load))
    row = serve.offline_throughput(tiny_artifact, ["one text", "two texts"], precision=None, threads=1, min_seconds=0)
    assert row["texts_per_s"] > 0
    ((backend, kwargs, _),) = seen
    assert backend == "auto" and kwargs["intra_op_threads"] == 1


class GpuLikeBackend:
    """A backend that says it runs on CUDA, as the tensorrt and torch-on-CUDA backends do (computing on the CPU,
    so the artifact's acceptance test passes)."""

    name, device = "tensorrt", "cuda"

    def __init__(self, real):
        self._real = real
        self.providers = ["TensorRT 10.16.1 on CUDA device 0"]

    def run(self, feed):
        return self._real.run(feed)

    def warmup(self):
        pass

    def close(self):
        pass


def test_rows_say_cuda_where_the_backend_runs_on_cuda_even_when_auto_chose_it(tiny_artifact, monkeypatch):
    real = embedder_module.create_backend
    monkeypatch.setattr(
        embedder_module,
        "create_backend",
        lambda name, d, m, profile, **options: GpuLikeBackend(real("onnxruntime-cpu", d, m, profile, **options)),
    )
    runner = EmbedderRunner(tiny_artifact, "auto", "fp32", threads=1)
    assert runner.device == "cuda"
    row = {
        "backend": runner.backend, "precision": "fp32", "device": runner.device, "dims": 8, "batch_size": 1,
        "seq_len": 16, "tokens_per_text": 16.0, "latency": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0},
        "texts_per_s": 1.0, "tokens_per_s": 16.0, "flops_per_s": None, "fraction_of_peak": None, "peak_rss_mib": 1.0,
    }  # fmt: skip
    assert "| onnxruntime-cpu (cuda) |" in engine_table([row]).replace("  ", " ")


@pytest.mark.parametrize("others_mib", [0, 300])
def test_the_baselines_device_peak_leaves_out_the_other_models_on_the_gpu(others_mib):
    peak = DevicePeak(own_bytes=100 * 2**20)  # its weights, as measured at load
    peak.open_window((100 + others_mib) * 2**20)  # the fp32 and the fp16 baseline are both loaded
    device_peak = (100 + others_mib + 150) * 2**20  # activations while it runs
    assert peak.mib(device_peak) == pytest.approx(250)
