"""A reference point for latency measurements, not a server to deploy: the least a gRPC server can do.

It answers `mrl.v1.Embedder/Embed` by embedding each request on its own, at once, with every core
(no batching, no queue, no limits, no health), so `mrl-bench serve` against it measures what
Python gRPC and the client cost on top of the model. `mrl-serve` at concurrency 1 is held against
it in BENCHMARKS.md.

    python scripts/floor_server.py artifacts/minilm --port 51004
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from mrl.proto import embedder_pb2 as pb
from mrl.proto import embedder_pb2_grpc as pb_grpc
from mrl.runtime import Embedder


class FloorService(pb_grpc.EmbedderServicer):
    """Embed inline on the event loop: the fastest a lone request can be answered, and no more."""

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Embed the request's texts at once."""
        dims = request.dimensions if request.HasField("dimensions") else None
        vectors = self._embedder.embed(list(request.inputs), dims, truncate=request.truncate)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=row) for row in vectors.tolist()],
            dimensions=vectors.shape[1],
            encoding=pb.ENCODING_FLOAT32,
        )


async def serve(artifact: str, port: int) -> None:
    """Load, warm up and serve until killed."""
    embedder = Embedder.load(artifact, verify=False)
    embedder.warmup()
    server = grpc.aio.server()
    pb_grpc.add_EmbedderServicer_to_server(FloorService(embedder), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor server serving on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Parse the flags and serve."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--port", type=int, default=51004)
    args = p.parse_args()
    asyncio.run(serve(args.artifact, args.port))


if __name__ == "__main__":
    main()
