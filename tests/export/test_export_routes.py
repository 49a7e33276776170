"""Every route into an artifact: sentence-transformers pipelines, transformers dirs, ONNX encoders."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from sentence_transformers import SentenceTransformer
from tinymodels import export, save_bert, save_onnx_encoder, save_sentence_transformer

from mrl.runtime import Embedder, load_manifest

TEXTS = ["first text", "a second, rather longer text about something else entirely", "x " * 80]


def _check_against(artifact, st_model, dims, min_cosine=0.9999, **encode_kw):
    got = Embedder.load(artifact).embed(TEXTS, dims=dims, truncate=True)
    want = st_model.encode(TEXTS, truncate_dim=dims, normalize_embeddings=True, **encode_kw)
    cos = np.sum(got * want, axis=1)
    assert cos.min() >= min_cosine, cos


@pytest.mark.parametrize(
    ("pooling", "dense", "arch"),
    [("cls", 24, "bert"), ("max", None, "bert"), ("weightedmean", None, "bert"), ("lasttoken", None, "llama")],
)
def test_sentence_transformers_pipelines(tmp_path, pooling, dense, arch):
    model_dir = save_sentence_transformer(tmp_path / "model", pooling=pooling, dense=dense, arch=arch)
    artifact = export(model_dir, tmp_path / "artifact", (8, 16))
    manifest = load_manifest(artifact)
    assert manifest.pooling == pooling
    assert manifest.full_dims == (dense or 32)
    if arch == "llama":
        assert manifest.tokenizer.padding_side == "left"
        assert manifest.tokenizer.inputs == ("input_ids", "attention_mask", "token_type_ids")
    st = SentenceTransformer(str(model_dir), device="cpu")
    for d in (8, 16):
        _check_against(artifact, st, d)


def test_graph_contract(tiny_artifact):
    m = onnx.load(str(tiny_artifact / "d16-fp32.onnx"), load_external_data=False)
    assert m.opset_import[0].version >= 17
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in m.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    (out,) = m.graph.output
    assert out.name == "sentence_embedding"
    dims = out.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 16
    # the weights live in the shared file, not in the graph
    assert (tiny_artifact / "d16-fp32.onnx").stat().st_size < (tiny_artifact / "weights-fp32.bin").stat().st_size / 4


def test_transformers_directory_with_pooling_flag(tmp_path):
    hf = save_bert(tmp_path / "hf")
    artifact = export(hf, tmp_path / "artifact", (16,), pooling="cls")
    assert load_manifest(artifact).source["kind"] == "transformers"
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tr = Transformer(str(hf))
    st = SentenceTransformer(modules=[tr, Pooling(32, pooling_mode="cls")], device="cpu")
    st.max_seq_length = load_manifest(artifact).tokenizer.max_length
    _check_against(artifact, st, 16)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
def test_onnx_encoder_gets_pooling_and_head_appended(tmp_path, pooling):
    hf, onnx_dir = save_onnx_encoder(tmp_path, with_pooled_output=False)
    artifact = export(onnx_dir, tmp_path / "artifact", (8, 32), pooling=pooling, max_length=40)
    manifest = load_manifest(artifact)
    assert manifest.source["kind"] == "onnx" and manifest.pooling == pooling
    assert all(p.parity.reference == "onnx-source-graph" and p.parity.passed for p in manifest.profiles)
    # and the result is what the same weights give through sentence-transformers
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    st = SentenceTransformer(modules=[Transformer(str(hf)), Pooling(32, pooling_mode=pooling)], device="cpu")
    st.max_seq_length = 40
    _check_against(artifact, st, 8)


def test_onnx_encoder_with_pooled_output_uses_it(tmp_path):
    _, onnx_dir = save_onnx_encoder(tmp_path, with_pooled_output=True)
    artifact = export(onnx_dir, tmp_path / "artifact", (16,), max_length=40)
    assert load_manifest(artifact).pooling == "model"


def test_trained_dims_from_model_card(tmp_path, caplog):
    model_dir = save_sentence_transformer(tmp_path / "model")
    card = model_dir / "README.md"
    card.write_text(card.read_text() + '\n```json\n{"matryoshka_dims": [32, 16, 8]}\n```\n')
    artifact = export(model_dir, tmp_path / "a", (8, 12))
    assert load_manifest(artifact).trained_dims == (32, 16, 8)
    assert "dims 12 not among the dims the model was trained for" in caplog.text


def test_manifest_is_plain_json_with_prompts(tiny_artifact):
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    assert data["prompts"]["query"] == "query: "
    assert data["tokenizer"]["file"] == "tokenizer.json"


def test_dynamo_exporter(tiny_st_dir, tmp_path):
    artifact = export(tiny_st_dir, tmp_path / "a", (8, 32), exporter="dynamo")
    manifest = load_manifest(artifact)
    assert manifest.source["exporter"] == "dynamo"
    assert onnx.load(str(artifact / "d8-fp32.onnx"), load_external_data=False).opset_import[0].version >= 18
    _check_against(artifact, SentenceTransformer(str(tiny_st_dir), device="cpu"), 8)
