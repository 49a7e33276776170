#!/usr/bin/env bash
# mrl-serve and Triton serving the same artifact, side by side in one `mrl-bench serve` run.
#   bash scripts/bench_triton.sh ARTIFACT TRITON_REPO TEXTS OUT.json [mrl-bench serve flags...]
# ARTIFACT from `mrl-export`, TRITON_REPO from `mrl-export triton ARTIFACT --encoder python` (this
# tritonserver has no ONNX Runtime backend). Both servers run with their defaults on loopback ports,
# each idle while the other is measured; both are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ARTIFACT=$1 REPO=$2 TEXTS=$3 OUT=$4
shift 4
bash scripts/setup.sh
bash scripts/setup_triton.sh
. "${MRL_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
MRL_PORT=${MRL_BENCH_PORT:-50071}
TRITON_HTTP=${TRITON_BENCH_PORT:-18100}
TRITON_GRPC=$((TRITON_HTTP + 1))
NAME=$(python -c 'import sys; print(sorted(p.name for p in __import__("pathlib").Path(sys.argv[1]).glob("*_tokenize"))[0].removesuffix("_tokenize"))' "$REPO")
LOGS=$(mktemp -d)

mrl-serve "$ARTIFACT" --port "$MRL_PORT" --log-level WARNING 2>"$LOGS/mrl-serve.log" &
MRL_PID=$!
"${MRL_TRITON_VENV:-.venv-triton}/bin/mrl-tritonserver" --model-repository "$REPO" \
    --http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1 \
    --http-port "$TRITON_HTTP" --grpc-port "$TRITON_GRPC" --metrics-port $((TRITON_HTTP + 2)) \
    --exit-timeout-secs 5 >"$LOGS/tritonserver.log" 2>&1 &
TRITON_PID=$!
trap 'kill -TERM $MRL_PID $TRITON_PID 2>/dev/null || true; wait $MRL_PID $TRITON_PID 2>/dev/null || true' EXIT

python - "$MRL_PORT" "$TRITON_HTTP" <<'PY'
import sys, time, urllib.request
from mrl.serving.client import EmbedClient

deadline = time.monotonic() + 180
with EmbedClient(f"127.0.0.1:{sys.argv[1]}", timeout=2) as client:
    while True:
        try:
            mrl = all(m.ready for m in client.list_models())
        except Exception:
            mrl = False
        try:
            triton = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/v2/health/ready", timeout=2).status == 200
        except OSError:
            triton = False
        if mrl and triton:
            break
        if time.monotonic() > deadline:
            sys.exit(f"servers not ready within 180 s (mrl-serve {mrl}, triton {triton})")
        time.sleep(1)
PY
echo "both servers ready (logs in $LOGS)" >&2
mrl-bench serve --target "mrl=127.0.0.1:$MRL_PORT" --target "triton=127.0.0.1:$TRITON_GRPC" \
    --triton-model "$NAME" --client-python "${MRL_TRITON_VENV:-.venv-triton}/bin/python" \
    --server-pid "$MRL_PID" --server-pid "$TRITON_PID" --texts "$TEXTS" --offline-baseline "$ARTIFACT" \
    --out "$OUT" "$@"
# What Triton's batchers did: requests (inference_count) and batches (execution_count) per model.
python -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://127.0.0.1:$TRITON_HTTP/v2/models/stats" >"${OUT%.json}-triton-stats.json"
