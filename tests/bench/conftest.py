"""A real `mrl-serve` on 127.0.0.1 (gRPC and OpenAI-compatible HTTP) for the load-generator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bench_servers import Served, free_loopback_port, serve


@pytest.fixture(scope="session")
def served(tiny_artifact) -> Iterator[Served]:
    """`mrl-serve` on the tiny artifact, gRPC and HTTP on free loopback ports; stopped after the session."""
    with serve(tiny_artifact) as running:
        yield running


@pytest.fixture(scope="session")
def server(served) -> str:
    """The session server's gRPC address."""
    return served.grpc


@pytest.fixture(scope="session")
def http_server(served) -> str:
    """The session server's HTTP address (OpenAI embeddings at /v1/embeddings)."""
    return served.http


@pytest.fixture(scope="session")
def served_2d(tiny_2d_artifact) -> Iterator[Served]:
    """`mrl-serve` on the tiny 2D artifact (layers 1 and 3), gRPC and HTTP; stopped after the session."""
    with serve(tiny_2d_artifact) as running:
        yield running


@pytest.fixture(scope="session")
def server_2d(served_2d) -> str:
    """The 2D server's gRPC address."""
    return served_2d.grpc


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on right now, on the loopback interface."""
    return free_loopback_port()
