"""gRPC serving of exported artifacts: `mrl-serve`, the dynamic batcher, health, metrics, auth and clients.

Never imports torch or transformers: a serving image needs numpy, tokenizers, onnxruntime, grpcio and protobuf.
"""

from mrl.serving.config import BatcherConfig, ModelSpec, ServerConfig, TlsConfig

__all__ = ["BatcherConfig", "ModelSpec", "ServerConfig", "TlsConfig"]
