"""Triton Python-backend model `NAME_encode_dDIMS`, written by `mrl-export triton --encoder python` as `1/model.py`.

Token ids in (as `NAME_tokenize` writes them), `sentence_embedding` (FP32, `[n, DIMS]`, unit rows)
out, computed by `mrl.runtime` on the one-profile artifact in `1/artifact/`. For Triton images
without the ONNX Runtime backend; Triton's Python needs `mrl-toolkit` installed.

Its inputs allow ragged batches, so Triton's batcher merges requests that the tokenizer padded to
different widths. Each call then strips every row's padding, sorts the rows by length and runs them
in chunks of similar length (as mrl-serve's batcher does): on a CPU, padding is wasted compute.

Parameters (config.pbtxt): `backend` (a `mrl.runtime` backend name; default auto, which means
onnxruntime-cpu on a KIND_CPU instance), `intra_op_threads` (default: CPU cores / CPU instances),
`max_rows` (texts per chunk, default 32), `max_padding` (the share of a chunk that may be
padding, default 0.1) and `serve_unverified` ("true" loads the model even where the artifact's
acceptance test fails on this machine, with a warning; default: it fails to load).
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


def unpad(feeds: list[dict[str, np.ndarray]], left: bool) -> list[dict[str, np.ndarray]]:
    """Every row of every request, with its padding (attention_mask 0) cut off."""
    rows = []
    for feed in feeds:
        for r, n in enumerate(feed["attention_mask"].sum(axis=1)):
            span = slice(feed["attention_mask"].shape[1] - int(n), None) if left else slice(0, int(n))
            rows.append({name: value[r, span] for name, value in feed.items()})
    return rows


def plan_chunks(lengths: list[int], max_rows: int, max_padding: float) -> list[list[int]]:
    """Row indices sorted by length, cut into chunks of at most `max_rows` rows and `max_padding` padding."""
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending: row i is the widest of the chunk it joins.
        wasted = 1 - (tokens + lengths[i]) / (lengths[i] * (len(current) + 1))
        if current and (len(current) == max_rows or wasted > max_padding):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return [*chunks, current] if current else chunks


def pad_rows(rows: list[dict[str, np.ndarray]], pad_token_id: int, left: bool) -> dict[str, np.ndarray]:
    """One padded batch from unpadded rows."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for name in rows[0]:
        batch = np.full((len(rows), width), pad_token_id if name == "input_ids" else 0, dtype=np.int64)
        for i, r in enumerate(rows):
            k = len(r[name])
            if left:
                batch[i, width - k :] = r[name]
            else:
                batch[i, :k] = r[name]
        out[name] = batch
    return out


def cpu_instances(config: dict[str, Any]) -> int:
    """How many CPU instances of this model Triton runs (for sharing the cores among them)."""
    groups = config.get("instance_group", [])
    return max(1, sum(int(g.get("count", 1)) for g in groups if g.get("kind", "KIND_CPU") == "KIND_CPU"))


class TritonPythonModel:
    """The Python-backend entry points."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the profile's graph with mrl.runtime (files checked against their sha256, the artifact's acceptance
        test run on this backend: a model this machine computes differently fails to load) and warm it up."""
        from mrl.runtime import Embedder
        from mrl.runtime.backends import capabilities, resolve_backend
        from mrl.runtime.manifest import load_manifest

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"] / "artifact"
        manifest = load_manifest(directory, verify=False)  # to resolve the backend; Embedder.load verifies
        (profile,) = manifest.profiles
        on_cpu = args.get("model_instance_kind", "CPU") == "CPU"
        wanted = parameters.get("backend", "auto")
        name = resolve_backend("onnxruntime-cpu" if wanted == "auto" and on_cpu else wanted, directory, manifest)
        options: dict[str, Any] = {}
        if capabilities(name).threads:
            threads = parameters.get("intra_op_threads") or max(1, (os.cpu_count() or 1) // cpu_instances(config))
            options["intra_op_threads"] = int(threads)
        if not on_cpu:
            options["device_id"] = int(args.get("model_instance_device_id", "0"))
        embedder = Embedder.load(directory, name, precision=profile.precision, acceptance=False, **options)
        verdict = self.accept(embedder, args["model_name"], parameters.get("serve_unverified", "false") == "true")
        self.backend = embedder.backend_for(profile)
        self.backend.warmup()
        self.max_rows = int(parameters.get("max_rows", "32"))
        self.max_padding = float(parameters.get("max_padding", "0.1"))
        self.inputs = manifest.tokenizer.inputs
        self.pad_token_id = manifest.tokenizer.pad_token_id
        self.dims = profile.dims
        self.left = manifest.tokenizer.padding_side == "left"
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {profile.name} on {name} {self.backend.providers} {options}; {verdict}"
        )

    @staticmethod
    def accept(embedder: Any, model: str, serve_unverified: bool) -> str:
        """The artifact's acceptance test here: raises where it fails (unless `serve_unverified`); how it went."""
        from mrl.runtime.acceptance import check
        from mrl.runtime.errors import AcceptanceError

        verdict = check(embedder)
        if verdict.passed:
            worst = min(c.parity.min_cosine for c in verdict.checks)
            return f"acceptance test passed on this machine (min cosine {worst:.6f})"
        if not verdict.checked:
            return "no acceptance test in the artifact: nothing checked"
        if not serve_unverified:
            anyway = 'parameters { key: "serve_unverified" value: { string_value: "true" } } serves it anyway'
            raise AcceptanceError(f"{model}: refusing {verdict.refusal()} ({anyway})")
        pb_utils.Logger.log_warn(f"{model} is served UNVERIFIED (serve_unverified): {verdict.refusal()}")
        return "acceptance test FAILED: served unverified"

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the rows of every request in length-sorted chunks and hand each request its rows."""
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(np.int64) for name in self.inputs}
            for r in requests
        ]
        rows = unpad(feeds, self.left)
        try:
            out = np.empty((len(rows), self.dims), dtype=np.float32)
            for chunk in plan_chunks([len(r["input_ids"]) for r in rows], self.max_rows, self.max_padding):
                out[chunk] = self.backend.run(pad_rows([rows[i] for i in chunk], self.pad_token_id, self.left))
        except Exception as e:  # the caller gets the reason; the model stays up for the next call
            error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for feed in feeds:
            n = feed["input_ids"].shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, out[start : start + n])]))
            start += n
        return responses

    def finalize(self) -> None:
        """Release the backend."""
        self.backend.close()
