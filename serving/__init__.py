"""Serving of exported artifacts: `mrl-serve`, a transport-neutral core with a gRPC front end, and clients.

The core (`core.py`: models, limits, lifecycle; `model.py`; `batcher.py`; `metrics.py`) knows no wire
format; `grpc_service.py` translates gRPC to it. Never imports torch or transformers: a serving image needs
numpy, tokenizers, onnxruntime, grpcio and protobuf.
"""

from mrl.serving.config import BatcherConfig, ModelSpec, RequestLimits, ServerConfig, TlsConfig

__all__ = ["BatcherConfig", "ModelSpec", "RequestLimits", "ServerConfig", "TlsConfig"]
