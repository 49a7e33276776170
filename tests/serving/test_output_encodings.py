"""Every output encoding over both transports, decoded back, against sentence-transformers' quantize_embeddings
with the artifact's calibrated ranges."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings
from serving_helpers import GatedModel, cosines, running

from mrl.proto import embedder_pb2 as pb
from mrl.runtime import Embedder, EmbedOptions, OutputSpec
from mrl.runtime.encodings import CALIBRATED, ENCODINGS, dtype_of
from mrl.serving.client import AsyncEmbedClient

TEXTS = ["how do I reset my password?", "the weather is lovely in spring", "a third, somewhat longer text to embed"]
DIMS = 16


async def fetch_all(server) -> dict[tuple[str, str], np.ndarray]:
    """(transport, encoding) -> the decoded rows: gRPC, HTTP JSON numbers, HTTP base64 with output_dtype."""
    got = {}
    url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    async with AsyncEmbedClient(f"127.0.0.1:{server.port}") as c, aiohttp.ClientSession() as s:
        info = await c.get_model(timeout=30)  # a calibrated artifact offers every encoding
        assert [pb.Encoding.Name(e) for e in info.encodings] == [f"ENCODING_{e.upper()}" for e in ENCODINGS]
        for encoding in ENCODINGS:
            response = await c.embed_response(TEXTS, dims=DIMS, encoding=encoding, timeout=30)
            assert response.encoding == pb.Encoding.Value(f"ENCODING_{encoding.upper()}")
            got["grpc", encoding] = await c.embed(TEXTS, dims=DIMS, encoding=encoding, timeout=30)
            json_format = "float" if encoding == "float32" else encoding
            for name, body in (
                ("http-json", {"input": TEXTS, "dimensions": DIMS, "encoding_format": json_format}),
                (
                    "http-base64",
                    {"input": TEXTS, "dimensions": DIMS, "encoding_format": "base64", "output_dtype": encoding},
                ),
            ):
                async with s.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    reply = await r.json()
                assert reply["output_dtype"] == encoding and reply["dimensions"] == DIMS
                rows = [d["embedding"] for d in reply["data"]]
                if name == "http-base64":
                    dtype = dtype_of(encoding).newbyteorder("<")
                    rows = [np.frombuffer(base64.b64decode(r), dtype=dtype) for r in rows]
                got[name, encoding] = np.array(rows, dtype=dtype_of(encoding))
    return got


def test_every_encoding_on_both_transports_matches_quantize_embeddings(tiny_artifact):
    model = GatedModel.open(tiny_artifact)

    async def scenario():
        async with running([model], http_port=0) as server:
            return await fetch_all(server)

    got = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
    offline = Embedder.load(tiny_artifact)
    floats = offline.embed(TEXTS, dims=DIMS)
    int8 = EmbedOptions(outputs=(OutputSpec(dims=DIMS, encoding="int8"),))
    ranges = offline.plan(int8).outputs[0].ranges  # the manifest's, written at export
    for (transport, encoding), rows in got.items():
        where = f"{transport} {encoding}"
        assert rows.dtype == dtype_of(encoding), where
        if encoding == "float32":
            assert rows.shape == (3, DIMS) and cosines(rows, floats).min() >= 0.99999, where
        elif encoding == "float16":
            np.testing.assert_allclose(rows.astype(np.float32), floats, atol=1e-3, err_msg=where)
        else:
            want = quantize_embeddings(floats, encoding, ranges=ranges)
            assert rows.shape == want.shape, where
            if encoding in CALIBRATED:
                assert np.abs(rows.astype(int) - want.astype(int)).max() <= 1, where  # within one step
            else:
                np.testing.assert_array_equal(rows, want, err_msg=where)  # binary: exactly
