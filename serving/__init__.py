"""Serving of exported artifacts: `mrl-serve`, a transport-neutral core with gRPC and HTTP front ends, and clients.

The core (`core.py`: models, limits, lifecycle; `model.py`; `batcher.py`; `metrics.py`) knows no wire
format. Each front end is a pure protocol module and a thin service: `grpc_protocol.py` + `grpc_service.py`
(with `grpc_interceptors.py`), `openai_protocol.py` + `http_service.py`; `server.py` holds the list of them.
Never imports torch or transformers: a serving image needs numpy, tokenizers, onnxruntime, grpcio, protobuf,
aiohttp and orjson.
"""

from mrl.serving.config import BatcherConfig, ModelSpec, RequestLimits, ServerConfig, TlsConfig

__all__ = ["BatcherConfig", "ModelSpec", "RequestLimits", "ServerConfig", "TlsConfig"]
