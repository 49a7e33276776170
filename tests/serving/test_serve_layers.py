"""Serving profiles that keep fewer layers: `layers` over gRPC and HTTP on real servers, refusals before any
tokenising, batches that never mix depths (but still mix dims), the model listings, and the lone-batch path."""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import grpc
import numpy as np
import pytest
from serving_helpers import GatedModel, cosines, running, sentences, wait_until

from mrl.runtime import Embedder
from mrl.runtime.manifest import Profile
from mrl.runtime.tokenize import Encoded
from mrl.serving.client import AsyncEmbedClient, build_request
from mrl.serving.config import BatcherConfig, ModelSpec
from mrl.serving.model import ServedModel

# The tiny 2D artifact: 3 layers, profiles at layers 1 and 3 (full) x dims 8, 16, 32.
SERVED = "served layers: 1, 3 (the model has 3)"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


def check_batches(model: GatedModel, plan: list[tuple[list[str], int | None, int | None]]) -> None:
    """Every batch held texts of the depth its graph runs; at each depth, some batch mixed texts wanting different
    dims. `plan`: (texts, layers, dims) as asked (unset layers: full depth, 3; unset dims: 32)."""
    assert model.batches, "no batch ran"
    once = [(t, n, d) for t, n, d in plan if sum(t == u for u, _, _ in plan) == 1]  # texts asked for once
    depth_of = {model.ids(t[0]): n or 3 for t, n, _ in once}
    dims_of = {model.ids(t[0]): d or 32 for t, _, d in once}
    for graph, batch in zip(model.graphs, model.batches, strict=True):
        depths = {depth_of[tuple(e.ids)] for e in batch if tuple(e.ids) in depth_of}
        assert depths <= {graph.layers or 3}, f"a batch of the {graph.name} graph held texts of depths {depths}"
    mixed = model.dims_mixed(dims_of)
    for depth in (1, 3):
        assert any((model.graphs[i].layers or 3) == depth for i in mixed), (
            f"texts of depth {depth} wanting different dims never shared a batch"
        )


# (layers asked for, dims asked for): unset layers is full depth, and 3 names it too.
PLAN = [(1, 8), (3, 16), (None, 12), (1, 32), (1, None), (3, 8), (None, None), (1, 5)]


def test_grpc_requests_of_mixed_depths_and_dims_match_the_offline_embedder_and_never_share_a_batch(
    tiny_2d_artifact,
):
    model = GatedModel.open(tiny_2d_artifact, BatcherConfig(max_batch_size=64, max_padding=1.0, workers=1))
    texts = sentences(120, seed=7)
    plan = [([t], *PLAN[i % len(PLAN)]) for i, t in enumerate(texts)]

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}") as client:
            model.gate.clear()  # hold the first batch so the rest queue up together
            first = asyncio.ensure_future(client.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            calls = [client.embed_response(t, layers=n, dims=d, timeout=120) for t, n, d in plan]
            calls = [asyncio.ensure_future(c) for c in calls]
            await wait_until(lambda: model.batcher.queued_jobs >= len(plan), "every request to queue")
            model.gate.set()
            got = await asyncio.gather(*calls)
            await first
            return got

    responses = run(scenario())
    offline = Embedder.load(tiny_2d_artifact)
    for (t, layers, dims), response in zip(plan, responses, strict=True):
        vectors = np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
        assert response.dimensions == (dims or 32) and response.layers == (layers or 3)
        assert cosines(vectors, offline.embed(t, dims=dims, layers=layers)).min() >= 0.99999
    # Depth 1 really is another model: its vectors are not full depth's.
    shallow = offline.embed(texts[:4], dims=32, layers=1)
    assert cosines(shallow, offline.embed(texts[:4], dims=32)).max() < 0.99
    check_batches(model, plan)


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, data=json.dumps(body).encode()) as r:
        return r.status, json.loads(await r.read())


def test_http_layers_round_trip_and_share_batches_of_their_depth_with_grpc(tiny_2d_artifact):
    model = GatedModel.open(tiny_2d_artifact, BatcherConfig(max_batch_size=64, max_padding=1.0, workers=1))
    texts = sentences(40, seed=8)
    plan = [([t], *PLAN[i % len(PLAN)]) for i, t in enumerate(texts)]

    async def scenario():
        async with (
            running([model], http_port=0) as server,
            aiohttp.ClientSession() as session,
            AsyncEmbedClient(f"127.0.0.1:{server.port}") as client,
        ):
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            model.gate.clear()
            first = asyncio.ensure_future(client.embed(["hold"], timeout=60))
            await wait_until(lambda: model.batches, "the first batch")
            bodies = [{"input": t, **({} if n is None else {"layers": n}), "dimensions": d} for t, n, d in plan]
            http = [asyncio.ensure_future(post(session, url, b)) for b in bodies]
            grpc_calls = [asyncio.ensure_future(client.embed(t, layers=n, dims=d, timeout=60)) for t, n, d in plan]
            await wait_until(lambda: model.batcher.queued_jobs >= 2 * len(plan), "every request to queue")
            model.gate.set()
            got = await asyncio.gather(*http), await asyncio.gather(*grpc_calls)
            await first
            return got

    (http, over_grpc) = run(scenario())
    offline = Embedder.load(tiny_2d_artifact)
    for (t, layers, dims), (status, body), vectors in zip(plan, http, over_grpc, strict=True):
        assert status == 200, body
        assert body["layers"] == (layers or 3) and body["dimensions"] == (dims or 32)
        rows = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        expected = offline.embed(t, dims=dims, layers=layers)
        assert cosines(rows, expected).min() >= 0.99999 and cosines(vectors, expected).min() >= 0.99999
    check_batches(model, plan)


def test_layers_no_profile_runs_are_refused_before_tokenising_with_the_depths_served(tiny_2d_artifact):
    model = GatedModel.open(tiny_2d_artifact)
    too_long = "word " * 200  # tokenising this would be refused for its length: layers must be refused first

    async def scenario():
        async with (
            running([model], http_port=0) as server,
            aiohttp.ClientSession() as session,
            AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=30) as client,
        ):
            refusals = []
            for layers, words in ((2, SERVED), (4, SERVED), (0, "at least 1")):
                with pytest.raises(grpc.RpcError) as info:
                    await client.embed([too_long], layers=layers)
                refusals.append((info.value.code(), info.value.details(), words))
            url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
            http = [await post(session, url, {"input": too_long, "layers": n}) for n in (2, 0)]
            with pytest.raises(grpc.RpcError) as info:
                await client.embed(["a"], layers=1, dims=33)
            return refusals, http, info.value

    refusals, http, dims = run(scenario())
    for code, details, words in refusals:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
    (status, body), (zero_status, zero) = http
    assert status == 400 and body["error"]["code"] == "invalid_argument" and SERVED in body["error"]["message"]
    assert zero_status == 400 and zero["error"]["param"] == "layers" and "at least 1" in zero["error"]["message"]
    assert dims.code() == grpc.StatusCode.INVALID_ARGUMENT and "above the largest profile" in dims.details()
    assert model.batches == [], "a refused request reached the model"


def test_model_listings_name_the_depths_served_and_each_profiles_depth(tiny_2d_artifact):
    model = GatedModel.open(tiny_2d_artifact)

    async def scenario():
        async with (
            running([model], http_port=0) as server,
            aiohttp.ClientSession() as session,
            AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=30) as client,
        ):
            async with session.get(f"http://127.0.0.1:{server.http_port}/v1/models") as r:
                models = json.loads(await r.read())
            return await client.list_models(), await client.get_model(), models

    (listed,), got, models = run(scenario())
    assert listed == got
    assert (list(got.layers), got.default_layers, got.total_layers, list(got.trained_layers)) == ([1, 3], 3, 3, [])
    depths = {p.name: p.layers for p in got.profiles}
    assert depths == {"d8-fp32": 3, "d16-fp32": 3, "d32-fp32": 3, "l1-d8-fp32": 1, "l1-d16-fp32": 1, "l1-d32-fp32": 1}
    (entry,) = models["data"]
    assert (entry["layers"], entry["default_layers"], entry["total_layers"], entry["trained_layers"]) == (
        [1, 3], 3, 3, [],
    )  # fmt: skip
    assert {p["name"]: p["layers"] for p in entry["profiles"]} == depths


def test_an_artifact_that_does_not_record_its_depth_lists_none_and_refuses_layers(tiny_2d_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_2d_artifact, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data.pop("total_layers"), data.pop("trained_layers")
    data["profiles"] = [p for p in data["profiles"] if p.pop("layers") is None]
    (copy / "manifest.json").write_text(json.dumps(data))
    model = GatedModel.open(copy)
    info = model.info()
    assert (info.layers, info.default_layers, info.total_layers) == ((), None, None)
    assert {p.layers for p in info.profiles} == {None}

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            listed = await client.get_model()
            response = await client.embed_response(["a text"], dims=8)
            with pytest.raises(grpc.RpcError) as refused:
                await client.embed(["a text"], layers=1)
            return listed, response, refused.value

    listed, response, refused = run(scenario())
    assert (list(listed.layers), listed.default_layers, listed.total_layers) == ([], 0, 0)
    assert response.layers == 0 and response.dimensions == 8
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "full depth only" in refused.details()


class LoneRecorder(ServedModel):
    """A ServedModel that records the batches it runs on its wide, lone-batch session."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lone_graphs: list[Profile] = []

    def run_lone_batch(self, graph: Profile, encoded: list[Encoded]) -> np.ndarray:
        """Record, then run."""
        self.lone_graphs.append(graph)
        return super().run_lone_batch(graph, encoded)


def test_a_lone_batch_runs_its_own_depth_on_the_wide_session(tiny_2d_artifact):
    spec = ModelSpec(artifact_dir=tiny_2d_artifact, lone_batch_threads=2, intra_op_threads=1)
    model = LoneRecorder.load(spec, BatcherConfig(workers=2))
    assert model.lone is not None, "the lone-batch session was not opened"
    texts = ["a lone text at one layer"]  # one text: an idle server runs it alone

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            model.lone_graphs.clear()  # warm-up ran each depth once
            shallow = await client.embed(texts, layers=1, dims=8)
            full = await client.embed(texts, dims=16)
            for graph in model.lone.graphs.values():  # one wide session per depth, spinning only while it runs
                options = model.lone.backend_for(graph).session_options
                assert options.get_session_config_entry("session.force_spinning_stop") == "1"
            return shallow, full

    shallow, full = run(scenario())
    assert [g.name for g in model.lone_graphs] == ["l1-d32-fp32", "d32-fp32"]
    offline = Embedder.load(tiny_2d_artifact)
    assert cosines(shallow, offline.embed(texts, dims=8, layers=1)).min() >= 0.99999
    assert cosines(full, offline.embed(texts, dims=16)).min() >= 0.99999


def test_build_request_sets_layers_only_when_given():
    assert not build_request(["a"]).HasField("layers")
    assert build_request(["a"], layers=np.int64(3)).layers == 3
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="layers must be a whole number of at least 0"):
            build_request(["a"], layers=bad)


def test_a_stream_of_mixed_depths_answers_each_at_its_own(tiny_2d_artifact):
    model = GatedModel.open(tiny_2d_artifact)
    texts = sentences(12, seed=9)
    requests = [build_request([t], layers=(1, 3)[i % 2], dims=16, request_id=str(i)) for i, t in enumerate(texts)]

    async def scenario():
        async with running([model]) as server, AsyncEmbedClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            return [r async for r in client.embed_stream(requests)]

    responses = run(scenario())
    offline = Embedder.load(tiny_2d_artifact)
    assert [r.request_id for r in responses] == [str(i) for i in range(len(texts))]
    for i, (text, response) in enumerate(zip(texts, responses, strict=True)):
        assert response.layers == (1, 3)[i % 2] and not response.HasField("error")
        got = np.array([response.embeddings[0].values], dtype=np.float32)
        assert cosines(got, offline.embed([text], dims=16, layers=response.layers)).min() >= 0.99999
