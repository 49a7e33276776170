#!/usr/bin/env bash
# GPU check anyone can run: reports GPU, driver, CUDA, TensorRT and onnxruntime providers, exports the
# demo model, then runs every GPU path that can run here (ONNX Runtime's CUDA and TensorRT providers,
# torch on CUDA in fp32/fp16/bf16, cuda-python device memory, TensorRT engines, `mrl-bench engine
# --baseline cuda`), each against ONNX Runtime CPU, and `mrl-export verify --backend B` on each backend
# (the artifact's acceptance test: the source model's vectors and the export's thresholds); prints one
# table last, naming what could not run.
#
#   bash scripts/gpu_check.sh            # on a GPU machine (exit 2 where there is no GPU)
#   bash scripts/gpu_check.sh --cpu-ok   # anywhere: without a GPU, runs the same path on the CPU
#   bash scripts/gpu_check.sh --out /tmp/check --model ./my-st-model
#
# Exit codes: 0 every check that could run passed, 1 a check failed, 2 no GPU (without --cpu-ok).
# Works from a checkout without installing mrl-toolkit; set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
