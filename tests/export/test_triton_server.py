"""A repository from `mrl-export triton --encoder python` served by a real tritonserver (2.51, from
nvidia-pytriton), called with tritonclient over gRPC and HTTP, against `Embedder.embed`.

The server binary has the Python backend only, so the ONNX Runtime repository is loaded as far as it
can be: its tokenizer under --strict-model-config, and its encoder's load fails on the missing backend,
not on its configuration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from acceptance_helpers import copy_artifact, disagree
from triton_helpers import as_nobody, call, require_triton, tritonserver, wait_exit

from mrl.export.triton import write_repository
from mrl.export.triton_config import Batching
from mrl.export.triton_plan import TritonOptions
from mrl.runtime import Embedder

pytestmark = pytest.mark.slow
DIMS = (8, 32)
SENTENCE = "embedding models map sentences to vectors so that similar meanings land close together in space"


def texts(n: int, offset: int = 0) -> list[str]:
    """`n` texts of 1 to 14 words (all under the tiny model's 48 tokens)."""
    words = SENTENCE.split()
    return [" ".join(words[(i + offset) % 5 : (i + offset) % 5 + 1 + (i * 7 + offset) % 14]) for i in range(n)]


@pytest.fixture(scope="module")
def embedder(tiny_artifact):
    return Embedder.load(tiny_artifact)


@pytest.fixture(scope="module")
def triton(tiny_artifact, tmp_path_factory):
    require_triton()
    root = tmp_path_factory.mktemp("triton-serve")
    options = TritonOptions(name="tiny", dims=DIMS, encoder="python", batching=Batching(max_batch_size=32, instances=1))
    write_repository(tiny_artifact, root / "repo", options)
    with tritonserver(root / "repo", root / "server.log", "--strict-model-config=true") as server:
        yield server


def _cosines(result: dict, want: np.ndarray) -> np.ndarray:
    assert "embedding" in result, result
    got = np.asarray(result["embedding"], dtype=np.float32)
    assert got.shape == want.shape and result["dtype"] == "float32"
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    return np.sum(got * want, axis=1)


def test_ensembles_match_the_embedder(triton, embedder):
    calls, wanted = [], []
    for protocol, url in (("grpc", triton.grpc), ("http", triton.http)):
        for dims in DIMS:
            for n in (1, 32):
                batch = texts(n, offset=dims)
                calls.append({"protocol": protocol, "url": url, "model": f"tiny_d{dims}", "texts": batch})
                wanted.append(embedder.embed(batch, dims=dims))
    for c, result, want in zip(calls, call(calls), wanted, strict=True):
        assert _cosines(result, want).min() >= 0.9999, (c["protocol"], c["model"], len(c["texts"]))


def test_prompt_and_truncation_are_request_parameters(triton, embedder):
    long = ["a short one", "word " * 100]
    base = {"protocol": "grpc", "url": triton.grpc, "model": "tiny_d32"}
    query, plain, refused, cut, unknown, http_refused = call(
        [
            {**base, "texts": texts(4), "parameters": {"prompt_name": "query"}},
            {**base, "texts": texts(4)},
            {**base, "texts": long},
            {**base, "texts": long, "parameters": {"truncate": True}},
            {**base, "texts": texts(1), "parameters": {"prompt_name": "nope"}},
            {**base, "protocol": "http", "url": triton.http, "texts": long},
        ]
    )
    assert _cosines(query, embedder.embed(texts(4), dims=32, prompt_name="query")).min() >= 0.9999
    assert _cosines(plain, embedder.embed(texts(4), dims=32)).min() >= 0.9999
    assert _cosines(plain, embedder.embed(texts(4), dims=32, prompt_name="query")).min() < 0.999  # the prompt counts
    assert "INVALID_ARGUMENT" in refused["status"]
    assert "text 1 is longer than the model's max of 48 tokens" in refused["error"]
    assert _cosines(cut, embedder.embed(long, dims=32, truncate=True)).min() >= 0.9999
    assert "unknown prompt_name 'nope'; this model's prompts: document, query" in unknown["error"]
    assert http_refused["status"] == "400" and "longer than the model's max" in http_refused["error"]


def _stats(triton, model: str) -> dict:
    (result,) = call([{"op": "statistics", "protocol": "http", "url": triton.http, "model": model}])
    return result


def test_concurrent_clients_are_batched_together(triton, embedder):
    batch = texts(1, offset=3)
    want = embedder.embed(batch, dims=8)
    before = _stats(triton, "tiny_encode_d8")
    clients, repeat = 16, 4
    results = call(
        [
            {
                "protocol": "grpc",
                "url": triton.grpc,
                "model": "tiny_d8",
                "texts": batch,
                "clients": clients,
                "repeat": repeat,
            }
        ]
    )[0]
    assert len(results) == clients * repeat
    for result in results:
        assert _cosines(result, want).min() >= 0.9999
    after = _stats(triton, "tiny_encode_d8")
    requests = after["inference_count"] - before["inference_count"]
    batches = after["execution_count"] - before["execution_count"]
    assert requests == clients * repeat
    assert batches < requests, f"{requests} requests ran as {batches} batches: Triton's batcher merged none"


def test_metadata_says_what_clients_send_and_get(triton):
    grpc_meta, http_meta = call(
        [
            {"op": "metadata", "protocol": "grpc", "url": triton.grpc, "model": "tiny_d32"},
            {"op": "metadata", "protocol": "http", "url": triton.http, "model": "tiny_d32"},
        ]
    )
    assert http_meta["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}]
    assert http_meta["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 32]}]
    assert [i["name"] for i in grpc_meta["inputs"]] == ["TEXT"]


def _load(http: str, model: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http}/v2/repository/models/{model}/load", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_onnxruntime_repository_loads_what_this_triton_can(tiny_artifact, tmp_path):
    require_triton()
    write_repository(tiny_artifact, tmp_path / "repo", TritonOptions(name="tiny", dims=(8,), encoder="onnxruntime"))
    args = ("--strict-model-config=true", "--model-control-mode=explicit", "--load-model=tiny_tokenize")
    with tritonserver(tmp_path / "repo", tmp_path / "server.log", *args) as server:
        assert _load(server.http, "tiny_tokenize")[0] == 200
        status, body = _load(server.http, "tiny_encode_d8")
        message = json.loads(body)["error"]
        # It got as far as looking for the ONNX Runtime backend, which this binary does not ship.
        assert status == 400 and "onnxruntime" in message, message


def test_minilm_at_64_and_256_dims(minilm_artifact, tmp_path):
    """The real all-MiniLM-L6-v2 through Triton, against Embedder.embed, at the dims the issue names."""
    require_triton()
    options = TritonOptions(name="minilm", dims=(64, 256), encoder="python", batching=Batching(instances=1))
    write_repository(minilm_artifact, tmp_path / "repo", options)
    embedder = Embedder.load(minilm_artifact)
    batch = [*texts(31), "Matryoshka embeddings keep their meaning when cut short. " * 12]
    with tritonserver(tmp_path / "repo", tmp_path / "server.log", "--strict-model-config=true") as server:
        calls = [
            {"protocol": protocol, "url": url, "model": f"minilm_d{dims}", "texts": batch}
            for protocol, url in (("grpc", server.grpc), ("http", server.http))
            for dims in (64, 256)
        ]
        results = call(calls)
    for c, result in zip(calls, results, strict=True):
        dims = int(c["model"].rsplit("_d", 1)[1])
        assert _cosines(result, embedder.embed(batch, dims=dims)).min() >= 0.9999, c["model"]


def test_a_tritonserver_running_as_nobody_serves_the_repository(tiny_artifact, tmp_path_factory):
    """Triton images and Kubernetes pods often run as an unprivileged user: the repository must be readable
    by others, as a user's umask says (its directories were 0644 once: Permission denied on config.pbtxt)."""
    require_triton()
    prefix = as_nobody()
    shared = Path(tempfile.mkdtemp(prefix="mrl-triton-nobody-"))
    try:
        shared.chmod(0o755)  # what a user's own directory lets others do; the repository inside is the test
        old = os.umask(0o022)
        try:
            options = TritonOptions(name="tiny", dims=(8,), encoder="python", batching=Batching(instances=1))
            write_repository(tiny_artifact, shared / "repo", options)
        finally:
            os.umask(old)
        log = tmp_path_factory.mktemp("triton-nobody") / "server.log"
        with tritonserver(shared / "repo", log, "--strict-model-config=true", prefix=prefix) as server:
            (result,) = call([{"protocol": "http", "url": server.http, "model": "tiny_d8", "texts": texts(3)}])
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert _cosines(result, Embedder.load(tiny_artifact).embed(texts(3), dims=8)).min() >= 0.9999


def test_a_python_encoder_on_a_machine_that_disagrees_fails_to_load(tiny_artifact, tmp_path):
    """The encoder runs the artifact's acceptance test when Triton loads it: refused, with the numbers in the log."""
    require_triton()
    artifact = copy_artifact(tiny_artifact, tmp_path / "art")
    disagree(artifact)
    options = TritonOptions(name="tiny", dims=(8,), encoder="python", batching=Batching(instances=1))
    write_repository(artifact, tmp_path / "repo", options)
    code, log = wait_exit(tmp_path / "repo", tmp_path / "server.log", "--strict-model-config=true")
    assert code != 0, log[-3000:]
    failure = next((line for line in log.splitlines() if "AcceptanceError" in line), "")
    assert "tiny_encode_d8" in failure and "d8-fp32: mean cosine 0.9" in failure, log[-3000:]
    assert "(needs min_cosine >= 0.9999); on onnxruntime-cpu [CPUExecutionProvider], CPU " in failure
    assert "serve_unverified" in failure


def test_a_python_encoder_that_passes_says_so(triton):
    assert "tiny_encode_d8: d8-fp32 on onnxruntime-cpu" in triton.log_tail(100_000)
    assert "acceptance test passed on this machine (min cosine" in triton.log_tail(100_000)
