"""fp16 and int8 profiles: precision in the graph, parity, shared weights, failure without leftovers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tinymodels import export, save_sentence_transformer

from mrl.export.errors import ParityError
from mrl.runtime import Embedder, load_manifest


@pytest.fixture(scope="module")
def mixed_artifact(tiny_st_dir, tmp_path_factory):
    return export(tiny_st_dir, tmp_path_factory.mktemp("mixed") / "a", (8, 16, 24, 32), ("fp32", "fp16", "int8"))


def _ops(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_every_precision_passes_its_threshold(mixed_artifact):
    m = load_manifest(mixed_artifact)
    assert {(p.dims, p.precision) for p in m.profiles} == {
        (d, p) for d in (8, 16, 24, 32) for p in ("fp32", "fp16", "int8")
    }
    for p in m.profiles:
        assert p.parity.passed, p
    fp16 = [p.parity.min_cosine for p in m.profiles if p.precision == "fp16"]
    assert min(fp16) >= 0.999
    # --ort-cpu auto: fused CPU graphs where they were measured to pay (fp32, int8), never for fp16 (a GPU precision)
    assert [(c.precision, c.graph) for c in m.ort_cpu] == [("fp32", "optimized"), ("int8", "optimized")]
    assert {p.precision for p in m.profiles if p.ort_cpu is not None} == {"fp32", "int8"}


def test_int8_graph_is_quantised_per_channel(mixed_artifact):
    assert "DynamicQuantizeLinear" in _ops(mixed_artifact / "d16-int8.onnx")
    assert "MatMulInteger" in _ops(mixed_artifact / "d16-int8.onnx")


def test_fp16_graph_keeps_fragile_ops_and_output_in_fp32(mixed_artifact):
    model = onnx.load(str(mixed_artifact / "d16-fp16.onnx"), load_external_data=False)
    weight_types = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in weight_types
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # LayerNormalization runs on fp32 inputs (behind Cast nodes), not on fp16 ones
    produced_by = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert produced_by[node.input[0]].op_type == "Cast"


def test_each_precision_loads_and_embeds(mixed_artifact):
    texts = ["one", "two words", "three words here"]
    full = Embedder.load(mixed_artifact, precision="fp32").embed(texts, dims=24, truncate=True)
    for precision in ("fp16", "int8"):
        got = Embedder.load(mixed_artifact, precision=precision).embed(texts, dims=24, truncate=True)
        assert np.sum(got * full, axis=1).min() > 0.95


def test_dims_profiles_share_one_weights_file(tiny_st_dir, mixed_artifact, tmp_path):
    single = export(tiny_st_dir, tmp_path / "single", (32,))
    size = lambda d, suffix: sum(f.stat().st_size for f in d.iterdir() if f.name.endswith(suffix))  # noqa: E731
    one = size(single, "fp32.onnx") + size(single, "fp32.bin")
    four = size(mixed_artifact, "fp32.onnx") + size(mixed_artifact, "fp32.bin")
    assert four <= 1.2 * one, (four, one)


def test_fp16_overflow_fails_parity_and_leaves_nothing(tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = save_sentence_transformer(tmp_path / "model")
    st = SentenceTransformer(str(model_dir), device="cpu")
    with torch.no_grad():  # activations far above fp16's 65504, which LayerNorm handles in fp32
        st[0].auto_model.embeddings.word_embeddings.weight.mul_(2e6)
        st[0].auto_model.embeddings.position_embeddings.weight.mul_(2e6)
    st.save(str(model_dir))
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="fp16 overflows"):
        export(model_dir, out, (16,), ("fp32", "fp16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-hf"]
