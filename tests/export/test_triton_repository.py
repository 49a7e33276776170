"""`mrl-export triton`: the repository's files and configs, the tokenizer model against the runtime's, bad input.

The configs are parsed by Triton's own ModelConfig schema (tritonclient's model_config_pb2, in
.venv-triton) and checked against the graphs' input and output names and types; the served
repository is tested in test_triton_server.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer
from triton_helpers import in_triton_env, require_triton

from mrl.export.cli import main as export_main
from mrl.export.errors import ExportError
from mrl.export.triton import write_repository
from mrl.export.triton_config import Batching
from mrl.export.triton_plan import TritonOptions, plan_repository
from mrl.runtime import Embedder, EmbedOptions
from mrl.runtime.manifest import Engine, ShapeRange, Span, load_manifest, sha256_file

MODELS = Path(__file__).resolve().parents[2] / "export" / "triton_models"
TEXTS = ["hello world", "a much longer sentence about the weather in paris in the spring", "x", "ünïcödé ✓"]
ONNX_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


def _load_model_file(name: str):
    """Import a Python-backend model file the way Triton would, without Triton (its utils are not needed)."""
    spec = importlib.util.spec_from_file_location(f"triton_{name.removesuffix('.py')}", MODELS / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _text_encoder(repo: Path, model: str):
    """The tokenizer model's TextEncoder as Triton would build it from the written config.pbtxt."""
    module = _load_model_file("tokenize_model.py")
    parameters = dict(_parameters((repo / model / "config.pbtxt").read_text()))
    tok = Tokenizer.from_file(str(repo / model / "1" / "tokenizer.json"))
    return module, module.TextEncoder(tok, module.Settings.from_parameters(parameters))


def _parameters(config: str) -> list[tuple[str, str]]:
    out = []
    for line in config.splitlines():
        if line.startswith("parameters {"):
            key = line.split("key: ", 1)[1].split(" value:", 1)[0]
            value = line.split("string_value: ", 1)[1].rsplit(" }", 2)[0]
            out.append((json.loads(key), json.loads(value)))
    return out


@pytest.fixture(scope="module")
def ort_repo(tiny_artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(tiny_artifact, out, TritonOptions(name="tiny", dims=(8, 32), batching=Batching(max_batch_size=32)))
    return out


def test_layout_and_names(ort_repo):
    names = sorted(p.name for p in ort_repo.iterdir())
    assert names == [
        "README.md",
        "tiny_d32",
        "tiny_d8",
        "tiny_encode_d32",
        "tiny_encode_d8",
        "tiny_tokenize",
    ]
    for model in names[1:]:
        assert (ort_repo / model / "config.pbtxt").is_file() and (ort_repo / model / "1").is_dir()
    version = ort_repo / "tiny_encode_d8" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "weights-fp32.bin"]
    assert sorted(p.name for p in (ort_repo / "tiny_tokenize" / "1").iterdir()) == ["model.py", "tokenizer.json"]
    readme = (ort_repo / "README.md").read_text()
    for needle in ("tritonserver --model-repository", "InferenceService", "/v2/models/tiny_d32/infer", "truncate"):
        assert needle in readme


def test_onnx_encoder_config_matches_its_graph(ort_repo, tiny_artifact):
    config = (ort_repo / "tiny_encode_d8" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 32" in config
    graph = onnx.load(str(ort_repo / "tiny_encode_d8" / "1" / "model.onnx"), load_external_data=False).graph
    for i in graph.input:
        assert f'{{ name: "{i.name}" data_type: {ONNX_TYPES[i.type.tensor_type.elem_type]} dims: [ -1 ] }}' in config
    (output,) = graph.output
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert output.type.tensor_type.shape.dim[1].dim_value == 8
    assert f'{{ name: "{output.name}" data_type: TYPE_FP32 dims: [ 8 ] }}' in config
    tokenize = (ort_repo / "tiny_tokenize" / "config.pbtxt").read_text()
    for i in graph.input:  # the tokenizer writes exactly what the encoder reads, in the same type
        assert f'{{ name: "{i.name}" data_type: {ONNX_TYPES[i.type.tensor_type.elem_type]} dims: [ -1 ] }}' in tokenize


def test_repository_files_reproduce_the_embedder(ort_repo, tiny_artifact):
    """The tokenizer model and the encoder's model.onnx (and weights) in the repository give Embedder's vectors."""
    _, encoder = _text_encoder(ort_repo, "tiny_tokenize")
    embedder = Embedder.load(tiny_artifact)
    session = ort.InferenceSession(str(ort_repo / "tiny_encode_d8" / "1" / "model.onnx"))
    for prompt in ("", "query"):
        encodings = encoder.encode(TEXTS, prompt, truncate=False)
        ids = [e.ids for e in encodings]
        assert ids == [e.ids for e in embedder.tokenize(embedder.plan(EmbedOptions(prompt_name=prompt or None)), TEXTS)]
        feed = encoder.pad(encodings, max(len(i) for i in ids) + 3)  # extra padding must not matter
        (got,) = session.run(None, feed)
        want = embedder.embed(TEXTS, dims=8, prompt_name=prompt or None)
        assert np.min(np.sum(got * want, axis=1)) >= 0.9999


def test_tokenizer_model_refuses_what_the_runtime_refuses(ort_repo, tiny_artifact):
    module, encoder = _text_encoder(ort_repo, "tiny_tokenize")
    long = "word " * 200
    with pytest.raises(module.RequestError, match=r"longer than the model's max of 48 tokens.*truncate=true"):
        encoder.encode(["fine", long], "", truncate=False)
    assert len(encoder.encode([long], "", truncate=True)[0].ids) == 48
    huge = "word " * 400_000  # 2 MB: only a prefix is tokenised, and it gives the runtime's ids
    with pytest.raises(module.RequestError, match="longer than the model's max"):
        encoder.encode([huge], "", truncate=False)
    cut = encoder.encode([huge, long], "query", truncate=True)
    embedder = Embedder.load(tiny_artifact)
    want = embedder.tokenize(embedder.plan(EmbedOptions(prompt_name="query", truncate=True)), [huge, long])
    assert [e.ids for e in cut] == [e.ids for e in want]
    with pytest.raises(module.RequestError, match="unknown prompt_name 'nope'; this model's prompts: document, query"):
        encoder.request_options({"prompt_name": "nope"})
    with pytest.raises(module.RequestError, match="truncate must be true or false"):
        encoder.request_options({"truncate": "yes"})
    with pytest.raises(module.RequestError, match="text 1 is empty"):
        encoder.encode(["a", ""], "", truncate=False)
    assert encoder.request_options({}) == ("", False)


def test_python_encoder_unpads_sorts_and_chunks_rows():
    module = _load_model_file("encode_model.py")
    a = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.array([[1, 1, 1]])}
    b = {"input_ids": np.array([[5, 0, 0], [8, 9, 0]]), "attention_mask": np.array([[1, 0, 0], [1, 1, 0]])}
    rows = module.unpad([a, b], left=False)
    assert [r["input_ids"].tolist() for r in rows] == [[5, 6, 7], [5], [8, 9]]
    left = {"input_ids": np.array([[2, 2, 4]]), "attention_mask": np.array([[0, 0, 1]])}
    assert module.unpad([left], left=True)[0]["input_ids"].tolist() == [4]
    batch = module.pad_rows([rows[1], rows[2]], pad_token_id=0, left=False)
    assert batch["input_ids"].tolist() == [[5, 0], [8, 9]] and batch["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert module.pad_rows([rows[1], rows[2]], pad_token_id=2, left=True)["input_ids"].tolist() == [[2, 5], [8, 9]]
    # Sorted by length; a chunk ends before it would hold more than 10% padding or more than max_rows rows.
    # 10, 10, 11: 31 of 33 tokens real; adding 12 would make 5 of 48 padding (10.4%); 29 and 30 go together.
    assert module.plan_chunks([10, 30, 11, 10, 29, 12], max_rows=32, max_padding=0.1) == [[0, 3, 2], [5], [4, 1]]
    assert module.plan_chunks([5] * 5, max_rows=2, max_padding=0.1) == [[0, 1], [2, 3], [4]]
    assert module.plan_chunks([], max_rows=2, max_padding=0.1) == []
    config = {"instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1, "kind": "KIND_GPU"}]}
    assert module.cpu_instances(config) == 2


def test_python_encoder_ships_a_one_profile_artifact(tiny_artifact, tmp_path):
    out = tmp_path / "repo"
    write_repository(tiny_artifact, out, TritonOptions(dims=(16,), encoder="python", name="m", prompt_name="query"))
    sub = out / "m_encode_d16" / "1" / "artifact"
    manifest = load_manifest(sub)  # every file present and matching its sha256
    assert [p.name for p in manifest.profiles] == ["d16-fp32"] and manifest.engines == ()
    assert (out / "m_encode_d16" / "1" / "model.py").read_text() == (MODELS / "encode_model.py").read_text()
    config = (out / "m_encode_d16" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "kind: KIND_CPU" in config
    assert '{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true }' in config
    assert 'parameters { key: "max_padding" value: { string_value: "0.1" } }' in config
    assert dict(_parameters((out / "m_tokenize" / "config.pbtxt").read_text()))["default_prompt_name"] == "query"


def _with_engines(artifact: Path, tmp_path: Path, input_dtype: str, seq_max: int = 32) -> Path:
    """A copy of the artifact whose manifest lists TensorRT engines for two GPUs (engine bytes are placeholders:
    nothing here runs them; the test checks the configuration written around them)."""
    copy = tmp_path / "with-engines"
    shutil.copytree(artifact, copy)
    manifest = load_manifest(copy)
    engines = []
    for cc, gpu in (("8.0", "A100"), ("9.0", "H100")):
        for p in manifest.profiles:
            path = copy / "engines" / f"{p.name}-{cc}.engine"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(f"placeholder {p.name} {cc}".encode())
            ranges = (ShapeRange(batch=Span(1, 16, 48), seq=Span(1, 16, seq_max)),)
            engines.append(
                Engine(
                    profile=p.name,
                    file=str(path.relative_to(copy)),
                    sha256=sha256_file(path),
                    cache_key="k" * 64,
                    gpu=gpu,
                    compute_capability=cc,
                    tensorrt_version="10.13.3",
                    onnx_sha256=p.sha256,
                    weights_sha256=None,
                    shape_ranges=ranges,
                    input_dtype=input_dtype,
                )
            )
    dataclasses.replace(manifest, engines=tuple(engines)).save(copy)
    return copy


def test_tensorrt_encoder_config(tiny_artifact, tmp_path):
    artifact = _with_engines(tiny_artifact, tmp_path, "int32")
    out = tmp_path / "repo"
    options = TritonOptions(dims=(8,), encoder="tensorrt", name="m", batching=Batching(max_batch_size=48))
    write_repository(artifact, out, options)
    config = (out / "m_encode_d8" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "kind: KIND_GPU" in config
    assert (
        'cc_model_filenames [ { key: "8.0" value: "model-sm80.plan" }, { key: "9.0" value: "model-sm90.plan" } ]'
        in config
    )
    assert "preferred_batch_size: [ 16, 48 ]" in config  # the engines' opt batch, then the largest
    # The engines were built from the profile's graph: the same input names, in the engines' type; its output.
    graph = onnx.load(str(artifact / "d8-fp32.onnx"), load_external_data=False).graph
    for i in graph.input:
        assert f'{{ name: "{i.name}" data_type: TYPE_INT32 dims: [ -1 ] }}' in config
    assert f'{{ name: "{graph.output[0].name}" data_type: TYPE_FP32 dims: [ 8 ] }}' in config
    assert sorted(p.name for p in (out / "m_encode_d8" / "1").iterdir()) == ["model-sm80.plan", "model-sm90.plan"]
    assert (out / "m_encode_d8" / "1" / "model-sm90.plan").read_bytes() == b"placeholder d8-fp32 9.0"
    tokenize = dict(_parameters((out / "m_tokenize" / "config.pbtxt").read_text()))
    assert tokenize["ids_dtype"] == "int32" and tokenize["max_length"] == "32"  # the engines take 32 tokens at most
    assert (
        '{ name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] }' in (out / "m_tokenize" / "config.pbtxt").read_text()
    )
    with pytest.raises(ExportError, match="--max-batch-size 64 is above what the engines take \\(48\\)"):
        plan_repository(load_manifest(artifact), dataclasses.replace(options, batching=Batching(max_batch_size=64)))


def test_configs_parse_as_triton_model_configs(ort_repo, tiny_artifact, tmp_path):
    require_triton()
    write_repository(tiny_artifact, tmp_path / "py", TritonOptions(dims=(8,), encoder="python"))
    write_repository(
        _with_engines(tiny_artifact, tmp_path, "int64"),
        tmp_path / "trt",
        TritonOptions(encoder="tensorrt", batching=Batching(max_batch_size=48)),
    )
    files = [
        str(p) for repo in (ort_repo, tmp_path / "py", tmp_path / "trt") for p in sorted(repo.glob("*/config.pbtxt"))
    ]
    code = (
        "import json, sys\n"
        "from google.protobuf import json_format, text_format\n"
        "from tritonclient.grpc import model_config_pb2\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    config = text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())\n"
        "    out[path] = json_format.MessageToDict(config, preserving_proto_field_name=True)\n"
        "print(json.dumps(out))\n"
    )
    parsed = json.loads(in_triton_env(code, *files))
    assert len(parsed) == len(files) == 5 + 3 + 7
    ensemble = parsed[str(ort_repo / "tiny_d8" / "config.pbtxt")]
    steps = ensemble["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["tiny_tokenize", "tiny_encode_d8"]
    assert steps[0]["output_map"] == steps[1]["input_map"]
    assert steps[1]["output_map"] == {"sentence_embedding": "EMBEDDING"}
    assert ensemble["output"] == [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": ["8"]}]
    tokenize = parsed[str(ort_repo / "tiny_tokenize" / "config.pbtxt")]
    assert tokenize["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    assert tokenize["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    trt = parsed[str(tmp_path / "trt" / "tiny-bert_encode_d32" / "config.pbtxt")]
    assert trt["cc_model_filenames"] == {"8.0": "model-sm80.plan", "9.0": "model-sm90.plan"}


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = export_main(["triton", *args, "-q"])
    return code, capsys.readouterr().err


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "out" / "repo"
    cases = [
        (["--dims", "8,12"], "no fp32 profile for dims 12 (it has d32-fp32, d16-fp32, d8-fp32)"),
        (["--precision", "int8"], "no int8 profiles; it has: fp32"),
        (["--encoder", "tensorrt"], "needs TensorRT engines, and the artifact has none for d8-fp32"),
        (["--prompt-name", "nope"], "unknown prompt name 'nope'"),
        (["--name", "bad name"], "must be letters, digits"),
        (["--max-batch-size", "0"], "must be at least 1"),
    ]
    for args, message in cases:
        code, err = _run_cli([str(tiny_artifact), "--out", str(out), *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), args
    code, err = _run_cli([str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err and not out.exists()


def test_existing_out_needs_force(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run_cli([str(tiny_artifact), "--out", str(out)], capsys)
    assert code == 2 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no partial directory left beside it
    code, err = _run_cli([str(tiny_artifact), "--out", str(out), "--force", "--dims", "8"], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "tiny-bert_d8",
        "tiny-bert_encode_d8",
        "tiny-bert_tokenize",
    ]


def test_layer_profiles_get_their_own_models(tiny_2d_artifact, tmp_path, capsys):
    """A 2D artifact: each depth's profiles are models of their own (NAME_lL_dDIMS), running that depth."""
    out = tmp_path / "repo"
    plan = write_repository(tiny_2d_artifact, out, TritonOptions(name="tiny", dims=(8,)))
    assert plan.model_names == ["tiny_tokenize", "tiny_encode_l1_d8", "tiny_l1_d8", "tiny_encode_d8", "tiny_d8"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*plan.model_names, "README.md"])
    assert "`tiny_l1_d8`" in (out / "README.md").read_text()
    embedder = Embedder.load(tiny_2d_artifact)
    _, encoder = _text_encoder(out, "tiny_tokenize")
    encodings = encoder.encode(TEXTS, "", truncate=False)
    feed = encoder.pad(encodings, max(len(e.ids) for e in encodings))
    for model, layers in (("tiny_encode_l1_d8", 1), ("tiny_encode_d8", None)):
        (got,) = ort.InferenceSession(str(out / model / "1" / "model.onnx")).run(None, feed)
        want = embedder.embed(TEXTS, dims=8, layers=layers)
        assert np.min(np.sum(got * want, axis=1)) >= 0.9999, model
    shallow = embedder.embed(TEXTS, dims=8, layers=1)
    assert np.max(np.sum(shallow * embedder.embed(TEXTS, dims=8), axis=1)) < 0.9999  # the depths differ

    full = plan_repository(load_manifest(tiny_2d_artifact), TritonOptions(name="tiny", dims=(8,), layers=(3,)))
    assert full.model_names == ["tiny_tokenize", "tiny_encode_d8", "tiny_d8"]  # the total is full depth
    for args, message in (
        (["--layers", "2"], "no fp32 profiles at layers 2 (it has d32-fp32"),
        (["--layers", "1,3", "--dims", "8,12"], "no fp32 profile for dims 12 at layers 1, dims 12 (it has"),
    ):
        code, err = _run_cli([str(tiny_2d_artifact), "--out", str(tmp_path / "bad"), *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists()
