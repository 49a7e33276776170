"""int8 that holds parity on Gemma-like models: smoothing, per-node error, the fp32 last resort, checked advice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tinymodels import export, save_sentence_transformer

from mrl.export import int8, parity, precision, sensitivity, smooth
from mrl.export.errors import ParityError
from mrl.export.profiles import int8_refusal
from mrl.runtime import Embedder, load_manifest
from mrl.runtime.manifest import Parity
from mrl.runtime.tokenize import TextTokenizer


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    return save_sentence_transformer(tmp_path_factory.mktemp("gemma") / "model", arch="gemma-like")


@pytest.fixture(scope="module")
def gemma_artifact(gemma_like, tmp_path_factory):
    return export(gemma_like, tmp_path_factory.mktemp("gemma-art") / "a", (32, 64), ("fp32", "int8"))


def _parity(mean: float, low: float, passed: bool) -> Parity:
    return Parity(
        reference="r", n_texts=21, max_abs_diff=0.1, min_cosine=low, mean_cosine=mean, threshold="t", passed=passed
    )


def _feeds_and_reference(artifact):
    m = load_manifest(artifact)
    tokenizer = TextTokenizer.load(artifact, m.tokenizer)
    texts = parity.validation_texts()
    return tokenizer, texts, parity.embed_graph(artifact / "d64-fp32.onnx", tokenizer, texts)


def test_quantising_every_product_unsmoothed_fails_on_the_gemma_like_model(gemma_artifact, tmp_path):
    """The premise: int8 without smoothing loses the model everywhere, as it did the 300M Gemma3 encoder."""
    tokenizer, texts, reference = _feeds_and_reference(gemma_artifact)
    plain = precision.to_int8(onnx.load(str(gemma_artifact / "d64-fp32.onnx")), tmp_path)
    onnx.save_model(plain, str(tmp_path / "plain.onnx"), save_as_external_data=True)
    result = parity.compare(parity.embed_graph(tmp_path / "plain.onnx", tokenizer, texts), reference, 64, "int8", "x")
    assert not result.passed and result.mean_cosine < 0.95 and result.min_cosine < 0.8, result


def test_the_loss_is_spread_over_every_product_and_smoothing_removes_it(gemma_artifact, tmp_path):
    """Per-node error: most products' typical input channel is wiped out (so keeping a few in fp32 cannot help);
    after smoothing none is."""
    tokenizer, texts, _ = _feeds_and_reference(gemma_artifact)
    fp32_graph = onnx.load(str(gemma_artifact / "d64-fp32.onnx"))
    feeds = parity.batches(tokenizer, texts)
    ranked = sensitivity.node_errors(fp32_graph, feeds, tmp_path, group=5)  # several groups, one answer
    assert len(ranked) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    assert sum(e.score > 0.5 for e in ranked) > len(ranked) / 2, ranked
    smoothed = smooth.smooth(fp32_graph, feeds, tmp_path)
    assert smoothed.inputs == 4 * 4 and smoothed.smoothed == smoothed.inputs, smoothed  # qkv, o, gate+up, down
    # No Mul for 12 of them: the two norms and the gated MLP's up projection of each layer took the scales; the
    # attention outputs (made by softmax(QK) V, unfused here) need one.
    assert (smoothed.folded, smoothed.inserted) == (12, 4), smoothed
    after = sensitivity.node_errors(smoothed.model, feeds, tmp_path)
    assert max(e.score for e in after) < 0.1, after[:3]


def test_export_smooths_and_passes_with_every_product_quantised(gemma_artifact):
    m = load_manifest(gemma_artifact)
    q = m.quantization
    assert q is not None and q.kept_fp32 == () and q.reduce_range, q
    assert q.smoothed == 16 and q.smoothing_muls == 4 and "smoothed" in q.method, q
    for p in (p for p in m.profiles if p.precision == "int8"):
        assert p.parity.mean_cosine >= 0.99 and p.parity.min_cosine >= 0.97, p.parity
    graph = onnx.load(str(gemma_artifact / "d64-int8.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 28  # every weight product is integer (attention's own stay float)
    texts = ["a sentence", "and another, somewhat longer sentence"]
    fp32 = Embedder.load(gemma_artifact, precision="fp32").embed(texts)
    int8 = Embedder.load(gemma_artifact, precision="int8").embed(texts)
    assert np.sum(fp32 * int8, axis=1).min() > 0.99


def test_exclusion_steps_double_up_to_half_of_the_nodes():
    ranked = [
        sensitivity.NodeError(node=f"n{i}", op_type="MatMul", score=1.0 - i / 20, input_max=1.0) for i in range(20)
    ]
    steps = sensitivity.exclusion_steps(ranked)
    assert [len(s) for s in steps] == [1, 2, 4, 8, 10]
    assert steps[1] == ["n0", "n1"]


def test_quantise_dequantise_is_per_tensor_uint8():
    x = np.array([[0.0, 1.0, 2.0, 255.0]], dtype=np.float32)
    np.testing.assert_allclose(sensitivity.quantise_dequantise(x), x)  # a step of exactly 1
    tiny = np.array([[1e-3, 2e-3, 1000.0]], dtype=np.float32)
    assert sensitivity.quantise_dequantise(tiny)[0, :2].tolist() == [0.0, 0.0]  # wiped out by the outlier


def test_refusal_advises_only_what_was_checked():
    summary = "int8 mean cosine 0.9, min 0.5"
    ok = int8_refusal(summary, _parity(0.99999, 0.99998, True))
    assert "use fp16 (checked: min cosine 0.999980) or fp32" in ok
    nan = int8_refusal(summary, _parity(-1.0, -1.0, False))
    assert "use fp32 (fp16 fails on this model too, checked: NaN: its activations overflow fp16)" in nan
    assert "fp16" not in int8_refusal(summary, None).split("use fp32")[0]


def test_int8_that_cannot_be_rescued_is_refused_with_advice_that_works(tmp_path):
    """Outliers in every LayerNorm output: every attention and MLP input loses its typical channel."""
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = save_sentence_transformer(tmp_path / "model", dense=32)
    st = SentenceTransformer(str(model_dir), device="cpu")
    with torch.no_grad():
        for module in st[0].auto_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[[3, 17]] = 6e4
        st[2].linear.weight[:, [3, 17]] = 0  # the model's output does not read those channels
    st.save(str(model_dir))
    with pytest.raises(ParityError, match=r"int8 cannot hold parity for this model.*keeping up to 6 of 12") as e:
        export(model_dir, tmp_path / "out", (16,), ("fp32", "int8"))
    assert not (tmp_path / "out").exists()
    advised = str(e.value).split(". use ")[1].split(" (checked")[0]
    assert advised == "fp16"  # checked on this model during the refusal: and it does export
    m = load_manifest(export(model_dir, tmp_path / "advised", (16,), ("fp32", advised)))
    assert all(p.parity.passed for p in m.profiles)


def test_a_manifest_from_before_smoothing_still_loads(gemma_artifact, tmp_path):
    """Written when int8 meant full-range weights, unsmoothed: it loads, and says so."""
    import json
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(gemma_artifact, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["quantization"] = {
        "method": "dynamic: activations uint8 per tensor, weights int8 per channel",
        "kept_fp32": ["node_linear_6"],
        "reason": "all quantised: mean cosine 0.8668, min 0.4567 (fails); ...",
    }
    (copy / "manifest.json").write_text(json.dumps(data))
    q = load_manifest(copy).quantization
    assert q.kept_fp32 == ("node_linear_6",) and not q.reduce_range and q.smoothed == 0 and q.smoothing_muls == 0


def test_the_fp32_last_resort_keeps_the_worst_products_until_parity_holds(gemma_artifact, tmp_path):
    """Driven by a check that passes once two products are float, the steps go 1, 2 and stop there."""
    fp32_graph = onnx.load(str(gemma_artifact / "d64-fp32.onnx"))
    tokenizer, texts, _ = _feeds_and_reference(gemma_artifact)
    feeds = parity.batches(tokenizer, texts)
    seen = []

    def check(model: onnx.ModelProto) -> Parity:
        weights = {t.name for t in model.graph.initializer}
        floats = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        seen.append(len(floats))
        return _parity(0.999 if len(floats) >= 2 else 0.9, 0.99, len(floats) >= 2)

    result = int8.quantise(fp32_graph, tmp_path, check=check, feeds=feeds)
    assert seen == [0, 1, 2] and len(result.kept_fp32) == 2, seen
    assert result.parity.passed and "2 of 28 matrix products" in result.reason and "kept in fp32" in result.reason
    ranked = [e.node for e in sensitivity.node_errors(result.smoothing.model, feeds, tmp_path)]
    assert list(result.kept_fp32) == ranked[:2]  # the worst two
