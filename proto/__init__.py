"""The wire contract: `mrl/v1/embedder.proto` and its generated stubs.

`from mrl.proto import embedder_pb2, embedder_pb2_grpc` is short for `mrl.proto.mrl.v1.…`. The stubs
load on first use, so `python -m mrl.proto.generate` still runs when they are missing or stale.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_STUBS = ("embedder_pb2", "embedder_pb2_grpc")

__all__ = list(_STUBS)


def __getattr__(name: str) -> ModuleType:
    """Import a generated stub module on first access."""
    if name in _STUBS:
        module = importlib.import_module(f"mrl.proto.mrl.v1.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mrl.proto' has no attribute {name!r}")
