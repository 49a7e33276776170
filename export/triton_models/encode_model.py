"""Triton Python-backend model `NAME_encode_dDIMS`, written by `mrl-export triton --encoder python` as `1/model.py`.

Token ids in (as `NAME_tokenize` writes them), `sentence_embedding` (FP32, `[n, DIMS]`, unit rows)
out, computed by `mrl.runtime` on the one-profile artifact in `1/artifact/`. For Triton images
without the ONNX Runtime backend; Triton's Python needs `mrl-toolkit` installed.

Every request of one call runs as one batch: requests padded to different widths are padded again
to the widest (padding is masked, so the embeddings do not change).

Parameters (config.pbtxt): `backend` (a `mrl.runtime` backend name; default auto, which means
onnxruntime-cpu on a KIND_CPU instance) and `intra_op_threads` (default: CPU cores / CPU instances).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

try:  # present inside Triton's Python backend; absent where tests import this file directly
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

OUTPUT = "sentence_embedding"


def repad(feeds: list[dict[str, np.ndarray]], pad_token_id: int, left: bool) -> dict[str, np.ndarray]:
    """Concatenate per-request inputs along the batch, padding each to the widest first."""
    width = max(f["input_ids"].shape[1] for f in feeds)
    out: dict[str, list[np.ndarray]] = {name: [] for name in feeds[0]}
    for feed in feeds:
        extra = width - feed["input_ids"].shape[1]
        for name, value in feed.items():
            fill = pad_token_id if name == "input_ids" else 0
            pad = ((0, 0), (extra, 0)) if left else ((0, 0), (0, extra))
            out[name].append(np.pad(value, pad, constant_values=fill) if extra else value)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def cpu_instances(config: dict[str, Any]) -> int:
    """How many CPU instances of this model Triton runs (for sharing the cores among them)."""
    groups = config.get("instance_group", [])
    return max(1, sum(int(g.get("count", 1)) for g in groups if g.get("kind", "KIND_CPU") == "KIND_CPU"))


class TritonPythonModel:
    """The Python-backend entry points."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the profile's graph with mrl.runtime (files checked against their sha256) and warm it up."""
        from mrl.runtime.backends import create_backend, resolve_backend
        from mrl.runtime.manifest import load_manifest

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"] / "artifact"
        manifest = load_manifest(directory)
        (profile,) = manifest.profiles
        on_cpu = args.get("model_instance_kind", "CPU") == "CPU"
        wanted = parameters.get("backend", "auto")
        name = resolve_backend("onnxruntime-cpu" if wanted == "auto" and on_cpu else wanted, directory, manifest)
        options: dict[str, Any] = {}
        if name.startswith("onnxruntime"):
            threads = parameters.get("intra_op_threads") or max(1, (os.cpu_count() or 1) // cpu_instances(config))
            options["intra_op_threads"] = int(threads)
        if not on_cpu:
            options["device_id"] = int(args.get("model_instance_device_id", "0"))
        self.backend = create_backend(name, directory, manifest, profile, **options)
        self.backend.warmup()
        self.inputs = manifest.tokenizer.inputs
        self.pad_token_id = manifest.tokenizer.pad_token_id
        self.left = manifest.tokenizer.padding_side == "left"
        pb_utils.Logger.log_info(f"{args['model_name']}: {profile.name} on {name} {self.backend.providers} {options}")

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run every request of this call as one batch and hand each its rows."""
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(np.int64) for name in self.inputs}
            for r in requests
        ]
        try:
            out = self.backend.run(repad(feeds, self.pad_token_id, self.left))
        except Exception as e:  # the caller gets the reason; the model stays up for the next call
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for feed in feeds:
            n = feed["input_ids"].shape[0]
            rows = np.ascontiguousarray(out[start : start + n], dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, rows)]))
            start += n
        return responses

    def finalize(self) -> None:
        """Release the backend."""
        self.backend.close()
