"""tritonclient calls for the Triton tests, run by .venv-triton's Python: a JSON list of calls in, results out.

A call: {"protocol": "grpc"|"http", "url": "127.0.0.1:PORT", "op": "infer"|"statistics"|"metadata"|"config",
"model": NAME, "texts": [...], "parameters": {...}, "clients": N, "repeat": R}. "infer" with "clients" N
sends the request R times in a row from each of N threads at once (each its own client) and returns
the N x R results.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpc_client
import tritonclient.http as http_client
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException


def _module(protocol: str):
    return grpc_client if protocol == "grpc" else http_client


def infer(c: dict) -> dict:
    """One inference request: the EMBEDDING rows, or the error Triton answered."""
    mod = _module(c["protocol"])
    client = mod.InferenceServerClient(c["url"])
    texts = np.array([[t.encode("utf-8")] for t in c["texts"]], dtype=object)
    text = mod.InferInput("TEXT", list(texts.shape), "BYTES")
    text.set_data_from_numpy(texts)
    try:
        result = client.infer(c["model"], [text], parameters=c.get("parameters"))
    except InferenceServerException as e:
        return {"error": e.message(), "status": str(e.status())}
    finally:
        client.close()
    vectors = result.as_numpy("EMBEDDING")
    return {"embedding": vectors.tolist(), "dtype": str(vectors.dtype)}


def statistics(c: dict) -> dict:
    """The model's inference and execution counts (requests served, batches run)."""
    client = _module(c["protocol"]).InferenceServerClient(c["url"])
    stats = client.get_inference_statistics(c["model"])
    if c["protocol"] == "grpc":
        stats = json_format.MessageToDict(stats, preserving_proto_field_name=True)
    (model,) = stats["model_stats"]
    return {
        "inference_count": int(model.get("inference_count", 0)),
        "execution_count": int(model.get("execution_count", 0)),
    }


def metadata(c: dict) -> dict:
    """The model's inputs and outputs as Triton reports them."""
    client = _module(c["protocol"]).InferenceServerClient(c["url"])
    meta = client.get_model_metadata(c["model"])
    if c["protocol"] == "grpc":
        meta = json_format.MessageToDict(meta, preserving_proto_field_name=True)
    return {"inputs": meta["inputs"], "outputs": meta["outputs"]}


def run(c: dict) -> dict | list[dict]:
    """One call of any kind."""
    op = c.get("op", "infer")
    if op == "statistics":
        return statistics(c)
    if op == "metadata":
        return metadata(c)
    n = c.get("clients", 0)
    if not n:
        return infer(c)

    def client_loop(_: int) -> list[dict]:
        return [infer(c) for _ in range(c.get("repeat", 1))]

    with ThreadPoolExecutor(n) as pool:
        return [r for results in pool.map(client_loop, range(n)) for r in results]


def main() -> None:
    """Read the calls, run them in order, print the results."""
    calls = json.load(sys.stdin)
    json.dump([run(c) for c in calls], sys.stdout)


if __name__ == "__main__":
    main()
