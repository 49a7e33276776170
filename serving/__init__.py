"""Serving of exported artifacts: `mrl-serve`, a transport-neutral core with gRPC and HTTP front ends, and clients.

The core (`core.py`: models, limits, lifecycle; `model.py`; `batcher.py`; `metrics.py`) knows no wire
format; `grpc_service.py` translates gRPC to it, `http_service.py` the OpenAI-compatible HTTP API (its
protocol in `openai_protocol.py`). Never imports torch or transformers: a serving image needs numpy,
tokenizers, onnxruntime, grpcio, protobuf, aiohttp and orjson.
"""

from mrl.serving.config import BatcherConfig, ModelSpec, RequestLimits, ServerConfig, TlsConfig

__all__ = ["BatcherConfig", "ModelSpec", "RequestLimits", "ServerConfig", "TlsConfig"]
