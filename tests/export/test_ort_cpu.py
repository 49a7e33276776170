"""ONNX Runtime CPU graphs: fused beside the portable ones, parity of their own, picked on the CPU provider only."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from tinymodels import export, save_sentence_transformer

from mrl.export import ortopt
from mrl.export.errors import ExportError
from mrl.runtime import Embedder, load_manifest

TEXTS = ["one", "a longer sentence, with enough words to need padding in a batch", "two words"]


@pytest.fixture(scope="module")
def fused_artifact(tiny_st_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "a"
    return export(tiny_st_dir, out, (16, 32), ("fp32", "int8"), ort_cpu="optimized")


def _ops(path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


def _domains(path) -> set[str]:
    return {n.domain for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fused_graphs_sit_beside_portable_ones_with_their_own_parity(fused_artifact):
    m = load_manifest(fused_artifact)
    assert [(c.precision, c.graph) for c in m.ort_cpu] == [("fp32", "optimized"), ("int8", "optimized")]
    assert m.ort_cpu[0].fusions["Attention"] == 2  # both layers of the tiny BERT
    assert m.ort_cpu[0].onnxruntime
    for p in m.profiles:
        assert p.ort_cpu is not None and p.ort_cpu.file == f"{p.name}.ort-cpu.onnx"
        assert p.ort_cpu.parity.passed and p.ort_cpu.parity.n_texts > 10
        assert p.ort_cpu.weights == f"weights-{p.precision}.ort-cpu.bin"
        # the portable graph stays free of ONNX Runtime's contrib ops, for TensorRT and others
        assert _domains(fused_artifact / p.file) <= {"", "ai.onnx"}
    assert _ops(fused_artifact / "d16-fp32.ort-cpu.onnx")["Attention"] == 2
    int8_ops = _ops(fused_artifact / "d16-int8.ort-cpu.onnx")
    assert int8_ops["QAttention"] == 2 and "Attention" not in int8_ops  # optimised first, then quantised
    # left unfused on purpose: slower than Add + LayerNormalization on ONNX Runtime's CPU provider
    assert "SkipLayerNormalization" not in _ops(fused_artifact / "d16-fp32.ort-cpu.onnx")


def test_cpu_runs_the_fused_graph_and_matches_the_portable_one(fused_artifact):
    fused = Embedder.load(fused_artifact, "onnxruntime-cpu")
    portable = Embedder.load(fused_artifact, "onnxruntime-cpu", graph="portable")
    np.testing.assert_allclose(fused.embed(TEXTS, dims=16), portable.embed(TEXTS, dims=16), atol=1e-5)
    backend = fused.backend_for(fused.plan().graph)
    assert backend.graph.name == "d32-fp32.ort-cpu.onnx"
    assert portable.backend_for(portable.plan().graph).graph.name == "d32-fp32.onnx"
    fused.close()
    portable.close()


def _left_padded(artifact):
    import dataclasses

    from mrl.runtime.tokenize import TextTokenizer

    settings = dataclasses.replace(load_manifest(artifact).tokenizer, padding_side="left")
    tokenizer = TextTokenizer.load(artifact, settings)
    return tokenizer.pad(tokenizer.encode(TEXTS))


def _run(graph, feed):
    from mrl.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(graph, ["CPUExecutionProvider"]).run(feed)


def test_left_padding_needs_and_gets_the_raw_attention_mask(fused_artifact, tmp_path, monkeypatch):
    """The optimizer's default mask index assumes right padding; with left padding it gives wrong vectors."""
    feed = _left_padded(fused_artifact)
    assert feed["attention_mask"][0, 0] == 0  # the short text really is padded on the left
    portable = _run(fused_artifact / "d32-fp32.onnx", feed)
    right = np.abs(_run(fused_artifact / "d32-fp32.ort-cpu.onnx", feed) - portable).max()
    assert right < 1e-5
    # the same fusion without the raw mask: what export must not write
    options = ortopt.fusion_options()
    options.attention_mask_format = 0  # AttentionMaskFormat.MaskIndexEnd, the optimizer's default
    monkeypatch.setattr(ortopt, "fusion_options", lambda: options)
    pooled = onnx.load(str(fused_artifact / "d32-fp32.onnx"), load_external_data=False)
    onnx.load_external_data_for_model(pooled, str(fused_artifact))
    wrong = ortopt.optimize(pooled, {"num_attention_heads": 2, "hidden_size": 32}).model
    onnx.save_model(wrong, str(tmp_path / "wrong.onnx"), save_as_external_data=True)
    wrong = np.abs(_run(tmp_path / "wrong.onnx", feed) - portable).max()
    assert wrong > 1e-3 and wrong > 100 * right, (wrong, right)


def test_too_old_onnxruntime_is_refused_not_written_unfused(tiny_st_dir, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"onnxruntime 1\.30\.0 is too old to fuse.*onnxruntime>=1\.31"):
        ortopt.check_fusing_support("1.30.0")
    assert ortopt.check_fusing_support("1.31.0") == "1.31.0"
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.30.1")
    with pytest.raises(ExportError, match="too old to fuse"):
        export(tiny_st_dir, tmp_path / "strict", (16,), ("fp32",), ort_cpu="optimized")
    assert not (tmp_path / "strict").exists()
    # auto: the portable graph, and the manifest says why
    m = load_manifest(export(tiny_st_dir, tmp_path / "auto", (16,), ("fp32",), ort_cpu="auto"))
    assert m.ort_cpu[0].graph == "portable" and "too old to fuse" in m.ort_cpu[0].reason
    assert m.profiles[0].ort_cpu is None


def test_decoder_style_model_keeps_the_portable_graph_and_says_why(tmp_path):
    model = save_sentence_transformer(tmp_path / "llama", arch="llama", pooling="lasttoken")
    m = load_manifest(export(model, tmp_path / "a", (32,), ("fp32",), ort_cpu="optimized"))
    assert m.ort_cpu[0].graph == "portable"
    assert "fuses no attention in llama graphs" in m.ort_cpu[0].reason
    assert m.profiles[0].ort_cpu is None
    assert Embedder.load(tmp_path / "a").embed(["hello"]).shape == (1, 32)


def test_portable_export_writes_no_cpu_graphs(tiny_st_dir, tmp_path):
    m = load_manifest(export(tiny_st_dir, tmp_path / "a", (16,), ("fp32",), ort_cpu="portable"))
    assert m.ort_cpu == () and m.profiles[0].ort_cpu is None
    assert not list((tmp_path / "a").glob("*.ort-cpu.*"))
