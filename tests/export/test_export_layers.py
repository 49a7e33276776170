"""Layer-truncated profiles (2D Matryoshka): each graph runs only its first L layers and gives what the loss trained."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses.adaptive_layer import TransformerDecorator
from tinymodels import export, save_onnx_encoder, save_sentence_transformer

from mrl.export.cli import main
from mrl.runtime import BackendUnavailableError, Embedder, LayersError, load_manifest, truncate_normalize

TEXTS = ["first text", "a second, rather longer text about something else entirely", "x " * 30, "short"]
MODELS = {  # name -> (arch, pooling, dense)
    "bert-mean-dense": ("bert", "mean", 24),
    "llama-lasttoken": ("llama", "lasttoken", None),
    "llama-mean": ("llama", "mean", None),
}


def as_trained(st: SentenceTransformer, texts: list[str], layers: int) -> np.ndarray:
    """The embeddings AdaptiveLayerLoss computes at depth `layers`, through sentence-transformers' own decorator."""
    transformer = st[0]
    decorator = TransformerDecorator(transformer, transformer.forward)
    transformer.forward = decorator
    try:
        features = st.preprocess(texts)
        with torch.no_grad():
            st(features)  # the full pass caches every layer's output in `features`, as in training
            decorator.set_layer_idx(layers)
            out = st(features)["sentence_embedding"]
    finally:
        del transformer.forward
    return out.numpy()


@pytest.fixture(scope="module", params=list(MODELS))
def model_2d(request, tmp_path_factory):
    """(source dir, artifact) for a 3-layer tiny model exported at layers 1,3 in fp32, fp16 and int8."""
    arch, pooling, dense = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = save_sentence_transformer(root / "model", arch=arch, pooling=pooling, dense=dense, layers=3, init_std=0.2)
    artifact = export(model, root / "artifact", (8, 16), ("fp32", "fp16", "int8"), layers=(1, 3))
    return model, artifact


def test_profiles_are_named_by_layers_dims_and_precision(model_2d):
    _, artifact = model_2d
    manifest = load_manifest(artifact)
    assert manifest.total_layers == 3 and manifest.trained_layers is None
    names = {p.name: p.layers for p in manifest.profiles}
    for prec in ("fp32", "fp16", "int8"):
        for d in (8, 16):
            assert names[f"d{d}-{prec}"] is None  # full depth keeps the names artifacts had before layers
            assert names[f"l1-d{d}-{prec}"] == 1
    for p in manifest.profiles:
        assert p.parity.passed, p
        if p.layers == 1:
            assert "hidden_states[1]" in p.parity.reference


def test_each_depth_gives_what_the_training_loss_evaluated(model_2d):
    model, artifact = model_2d
    st = SentenceTransformer(str(model), device="cpu")
    embedder = Embedder.load(artifact)
    for layers in (1, 3):
        want = truncate_normalize(as_trained(st, TEXTS, layers), 8)
        got = embedder.embed(TEXTS, dims=8, layers=layers)
        assert np.sum(got * want, axis=1).min() >= 0.9999, layers
    # and cutting layers really changes the vectors (so the check above could fail)
    shallow, full = embedder.embed(TEXTS, dims=16, layers=1), embedder.embed(TEXTS, dims=16)
    assert np.sum(shallow * full, axis=1).min() < 0.99


def test_a_truncated_graph_runs_only_its_layers(model_2d):
    _, artifact = model_2d

    def count(name: str, ops: tuple[str, ...]) -> int:
        graph = onnx.load(str(artifact / f"{name}.onnx"), load_external_data=False).graph
        return sum(1 for node in graph.node if node.op_type in ops)

    assert count("l1-d16-fp32", ("MatMul",)) * 3 <= count("d16-fp32", ("MatMul",)) + 3
    if load_manifest(artifact).pooling != "lasttoken":
        return
    # Llama: two RMSNorms per layer, and the final norm only at full depth (as hidden_states[L] has it)
    assert count("l1-d16-fp32", ("Pow",)) == 2 and count("d16-fp32", ("Pow",)) == 7


def test_depths_share_their_weights(model_2d):
    _, artifact = model_2d

    def stored(name: str) -> set[tuple[str, str]]:
        graph = onnx.load(str(artifact / f"{name}.onnx"), load_external_data=False).graph
        entries = [{e.key: e.value for e in t.external_data} for t in graph.initializer if t.external_data]
        return {(e["offset"], e["length"]) for e in entries}

    for prec in ("fp32", "int8"):
        shallow, full = stored(f"l1-d8-{prec}"), stored(f"d8-{prec}")
        assert shallow and shallow <= full, prec  # every tensor of the 1-layer graph is one the full graph uses


def test_torch_backend_refuses_a_truncated_profile(model_2d):
    _, artifact = model_2d
    embedder = Embedder.load(artifact, backend="torch")
    try:
        assert embedder.embed(["hello"], dims=8).shape == (1, 8)
        assert embedder.layers_served == [3]  # it runs the source model, which cannot stop early
        with pytest.raises(LayersError, match=r"not served; served layers: 3 \(the model has 3\) \(the torch backend"):
            embedder.embed(["hello"], dims=8, layers=1)
    finally:
        embedder.close()  # the torch backend shares loaded models process-wide
    cut_only = dataclasses.replace(embedder.manifest, profiles=[p for p in embedder.manifest.profiles if p.layers])
    with pytest.raises(BackendUnavailableError, match="full depth only: use an onnxruntime or tensorrt backend"):
        Embedder(artifact, cut_only, embedder.tokenizer, backend="torch", precision="fp32", backend_options={})


def test_trained_layers_come_from_a_real_training_card(tmp_path, caplog):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    st = SentenceTransformer(str(save_sentence_transformer(tmp_path / "base", layers=3)), device="cpu")
    pairs = Dataset.from_dict({"anchor": ["a b", "c d", "e f", "g h"], "positive": ["b a", "d c", "f e", "h g"]})
    loss = losses.Matryoshka2dLoss(st, losses.MultipleNegativesRankingLoss(st), [32, 16, 8])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    SentenceTransformerTrainer(model=st, args=args, train_dataset=pairs, loss=loss).train()
    st.save(str(tmp_path / "trained"))
    with caplog.at_level(logging.WARNING, logger="mrl"):
        artifact = export(tmp_path / "trained", tmp_path / "artifact", (8, 16), layers=(2, 3))
    manifest = load_manifest(artifact)
    assert manifest.trained_layers == (1, 2, 3) and manifest.trained_dims == (32, 16, 8)
    assert "trained" not in caplog.text


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_untrained_layers_warn_and_trained_layers_are_recorded(capsys, tmp_path):
    model = save_sentence_transformer(tmp_path / "model", layers=3)
    code, err = _cli(capsys, model, "--dims", "8", "--layers", "1,2", "--out", tmp_path / "a", "-q")
    assert code == 0 and "never trained" in err and "layers 2,1" in err
    code, err = _cli(
        capsys, model, "--dims", "8", "--layers", "1,2", "--trained-layers", "2,3", "--out", tmp_path / "b"
    )
    assert code == 0 and "layers 1 not among the depths the model was trained for (2,3)" in err
    manifest = load_manifest(tmp_path / "b")
    assert manifest.trained_layers == (2, 3) and [p.name for p in manifest.profiles] == ["l2-d8-fp32", "l1-d8-fp32"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--layers", "0"), "layers must be at least 1"),
        (("--layers", "2,x"), "layers must be whole numbers"),
        (("--layers", "4"), "layers 4 is above the model's 3 layers"),
        (("--layers", "1", "--trained-layers", "5"), "trained layers 5 is above the model's 3 layers"),
    ],
)
def test_bad_layers_are_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    model = save_sentence_transformer(tmp_path / "model", layers=3)
    code, err = _cli(capsys, model, "--dims", "8", *argv, "--out", tmp_path / "a")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "a").exists()


def test_an_onnx_encoder_cannot_be_cut(capsys, tmp_path):
    _, encoder = save_onnx_encoder(tmp_path)
    code, err = _cli(capsys, encoder, "--dims", "8", "--layers", "1", "--out", tmp_path / "a")
    assert code == 2 and "--layers cannot cut an existing ONNX encoder" in err and "Traceback" not in err
    # its full depth is still fine, and the manifest records the layers its config names
    code, _ = _cli(capsys, encoder, "--dims", "8", "--layers", "2", "--out", tmp_path / "b", "--max-length", 40, "-q")
    assert code == 0 and load_manifest(tmp_path / "b").total_layers == 2
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["profiles"][0]["layers"] is None
